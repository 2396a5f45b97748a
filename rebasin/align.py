"""Alignment: permute models into one basin, the step between matching and merging.

Every caller that aligns models goes through this module: the Flower strategies (one client
model at a time, against the global model or the largest client), :mod:`rebasin.merge`
(``merge_to_reference``, ``merge_many``), the offline ``rebasin merge``, the experiments and
the benchmarks. Two forms:

* to a reference -- :class:`ReferenceAligner` holds the reference on the matching device
  and aligns one model per call (warm-started where that start beats the identity);
  :func:`align_to_reference` streams N models through it, holding one aligned copy at a time;
* to each other -- :func:`align_many`, MergeMany's alignment (Ainsworth et al., appendix):
  every model is matched to the weighted mean of the others until nothing changes.

Each aligned model comes with its :class:`Alignment`: permutations, sweeps, seconds and
objective gain. Inputs are checked once, where they enter (the reference when the aligner is
made, each model when it is aligned, unless the caller checked it already); matching then
trusts them. Permutations are applied on the device where matching ran.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rebasin.matching import MatchingError, matching_objective, weight_matching
from rebasin.permute import Perms, apply_permutation, validate_state_dict
from rebasin.spec import PermutationSpec, StateDict, keep_metadata


@dataclass(frozen=True)
class Alignment:
    """How one model was aligned.

    Attributes
    ----------
    perms
        Permutation name -> LongTensor on the CPU: ``apply_permutation(spec, perms, model)``
        is the aligned model (identity for a reference model).
    sweeps
        Weight-matching sweeps (0 for a reference model). MergeMany: summed over all the
        model's matchings.
    seconds
        Wall time of aligning it. MergeMany: the time of the steps in which it was matched.
    objective_gain
        ``sum_w <ref_w, pi(model_w)>`` after matching minus its value without permuting.
        MergeMany: summed over the model's matchings, each against the mean of the others at
        that moment (a moving target).
    warm_start
        Whether matching started from the given initial permutations (used only when they
        align the model better than the identity does).
    """

    perms: Perms
    sweeps: int
    seconds: float
    objective_gain: float
    warm_start: bool = False


@dataclass(frozen=True)
class AlignedModel:
    """One model of a stream, aligned: its position in the input, the model, and how."""

    index: int
    state_dict: StateDict
    alignment: Alignment


def identity_alignment(spec: PermutationSpec, model: Mapping[str, torch.Tensor]) -> Alignment:
    """The alignment of a model left as it is (the reference itself)."""
    perms = {p: torch.arange(n) for p, n in spec.perm_sizes(model).items()}
    return Alignment(perms=perms, sweeps=0, seconds=0.0, objective_gain=0.0)


class ReferenceAligner:
    """Aligns models to one reference, held on the matching device, one model per call.

    Parameters
    ----------
    spec
        The models' permutation spec.
    reference
        The model to align to; checked here (it must fit ``spec`` and be finite).
    max_iter
        Most weight-matching sweeps per model.
    device
        Where matching runs and permutations are applied; by default the reference's device.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        reference: Mapping[str, torch.Tensor],
        *,
        max_iter: int = 100,
        device: torch.device | str | None = None,
    ) -> None:
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        spec.check(reference)
        validate_state_dict(reference, reference, name="reference model")
        first = next(iter(reference.values()))
        self.device = torch.device(device) if device is not None else first.device
        self.spec = spec
        self.reference = {k: v.to(self.device) for k, v in reference.items()}
        self.max_iter = max_iter
        self.sizes = spec.perm_sizes(self.reference)

    def align(
        self,
        model: Mapping[str, torch.Tensor],
        *,
        seed: int = 0,
        init: Mapping[str, torch.Tensor] | None = None,
        check: bool = True,
    ) -> tuple[StateDict, Alignment]:
        """``model`` permuted into the reference's basin (on the matching device), and how.

        ``init`` (for example this client's permutations of the last round) is the starting
        point when it has the spec's permutations and sizes and aligns ``model`` better than
        the identity; otherwise matching starts from the identity. ``check=False`` trusts
        ``model`` to have the reference's keys, shapes and dtypes and finite values.

        Raises
        ------
        MatchingError
            If the objective or a similarity matrix is not finite.
        ValueError
            If ``check`` and ``model`` does not match the reference.
        """
        start = time.perf_counter()
        if check:
            validate_state_dict(model, self.reference, name="model to align")
        model = keep_metadata({k: v.to(self.device) for k, v in model.items()}, model)
        identity_objective = matching_objective(
            self.spec, self.reference, model, device=self.device, check=False
        )
        init = self._usable(init)
        if init is not None:
            started = matching_objective(
                self.spec, self.reference, model, init, device=self.device, check=False
            )
            if started <= identity_objective:
                init = None  # e.g. a client that restarted from the global model
        result = weight_matching(
            self.spec,
            self.reference,
            model,
            seed=seed,
            init=init,
            max_iter=self.max_iter,
            device=self.device,
            check=False,
        )
        on_device = {p: t.to(self.device) for p, t in result.perms.items()}
        aligned = apply_permutation(self.spec, on_device, model)
        alignment = Alignment(
            perms=result.perms,
            sweeps=result.sweeps,
            seconds=time.perf_counter() - start,
            objective_gain=result.objective[-1] - identity_objective,
            warm_start=init is not None,
        )
        return aligned, alignment

    def _usable(self, perms: Mapping[str, torch.Tensor] | None) -> Perms | None:
        if perms is None or set(perms) != set(self.sizes):
            return None
        if any(perms[p].numel() != n for p, n in self.sizes.items()):
            return None
        return dict(perms)


def align_to_reference(
    spec: PermutationSpec,
    models: Iterable[Mapping[str, torch.Tensor]],
    *,
    reference: int | Mapping[str, torch.Tensor] = 0,
    seed: int = 0,
    max_iter: int = 100,
    device: torch.device | str | None = None,
) -> Iterator[AlignedModel]:
    """Stream ``models`` aligned to a reference, one at a time (O(1) models held).

    ``reference`` is an index into ``models`` (that model passes through, unpermuted) or an
    outside state dict (such as last round's global model). Model ``i`` is matched with seed
    ``seed + i``. An index reference is read first: ``models`` must then be a sequence.

    Raises
    ------
    MatchingError
        Naming the model (``.model``: its index) whose matching failed.
    """
    if isinstance(reference, int):
        models = list(models)
        if not 0 <= reference < len(models):
            raise ValueError(f"reference {reference} is not an index of {len(models)} models")
        target: Mapping[str, torch.Tensor] = models[reference]
    else:
        target = reference
    aligner = ReferenceAligner(spec, target, max_iter=max_iter, device=device)
    for i, model in enumerate(models):
        if isinstance(reference, int) and i == reference:
            on_device = keep_metadata({k: v.to(aligner.device) for k, v in model.items()}, model)
            yield AlignedModel(i, on_device, identity_alignment(spec, model))
            continue
        try:
            aligned, alignment = aligner.align(model, seed=seed + i)
        except MatchingError as exc:
            raise MatchingError(f"model {i}: {exc}", model=i) from exc
        yield AlignedModel(i, aligned, alignment)


@dataclass(frozen=True)
class ManyAlignment:
    """What :func:`align_many` did, per model (in the order of the input models).

    Attributes
    ----------
    aligned
        The aligned state dicts.
    alignments
        How each was aligned (see :class:`Alignment`; ``perms`` map the input model to its
        aligned version).
    rounds
        Rounds over all the models that were run.
    """

    aligned: list[StateDict]
    alignments: list[Alignment]
    rounds: int

    @property
    def perms(self) -> list[Perms]:
        return [a.perms for a in self.alignments]

    @property
    def sweeps(self) -> list[int]:
        return [a.sweeps for a in self.alignments]

    @property
    def seconds(self) -> list[float]:
        return [a.seconds for a in self.alignments]

    @property
    def objective_gains(self) -> list[float]:
        return [a.objective_gain for a in self.alignments]


def align_many(
    spec: PermutationSpec,
    models: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    *,
    seed: int = 0,
    max_rounds: int = 20,
    max_iter: int = 100,
) -> ManyAlignment:
    """Bring N models into one basin without a reference (MergeMany's alignment).

    Repeat, over the models in a seeded random order: align model ``i`` to the weighted mean
    of all the others (as currently aligned). Stop after a round in which no permutation
    changed, or after ``max_rounds``.

    Raises
    ------
    MatchingError
        Naming the model (``.model``: its index) whose matching failed.
    """
    weights = check_models_and_weights(models, weights)
    for i, model in enumerate(models[1:], start=1):
        validate_state_dict(model, models[0], name=f"model {i}")
    spec.check(models[0])
    aligned = [keep_metadata(dict(m), m) for m in models]
    sizes = spec.perm_sizes(models[0])
    perms = [{p: torch.arange(n) for p, n in sizes.items()} for _ in models]
    sweeps = [0] * len(models)
    seconds = [0.0] * len(models)
    gains = [0.0] * len(models)
    rounds = 0
    rng = np.random.default_rng(seed)
    total = sum(weights)
    weighted_sum = _weighted_sum(aligned, weights) if len(aligned) > 1 else {}
    for _ in range(max_rounds if len(aligned) > 1 else 0):
        rounds += 1
        changed = False
        for i in rng.permutation(len(aligned)):
            start = time.perf_counter()
            w = weights[i]
            others_mean = {
                k: ((weighted_sum[k] - w * aligned[i][k].double()) / (total - w)).to(v.dtype)
                if v.is_floating_point()
                else v
                for k, v in aligned[i].items()
            }
            try:
                result = weight_matching(
                    spec,
                    others_mean,
                    aligned[i],
                    seed=int(rng.integers(2**31)),
                    max_iter=max_iter,
                    check=False,
                )
            except MatchingError as exc:
                raise MatchingError(f"model {i}: {exc}", model=int(i)) from exc
            sweeps[i] += result.sweeps
            gains[i] += result.objective[-1] - result.objective[0]
            if all(torch.equal(p, torch.arange(p.numel())) for p in result.perms.values()):
                seconds[i] += time.perf_counter() - start
                continue
            new = apply_permutation(spec, result.perms, aligned[i])
            for k, v in new.items():
                if v.is_floating_point():
                    weighted_sum[k] += w * (v.double() - aligned[i][k].double())
            aligned[i] = new
            # Applying q after p picks unit p[q[j]] of the input: compose once per change.
            perms[i] = {p: perms[i][p][result.perms[p]] for p in perms[i]}
            changed = True
            seconds[i] += time.perf_counter() - start
        if not changed:
            break
    alignments = [
        Alignment(perms=perms[i], sweeps=sweeps[i], seconds=seconds[i], objective_gain=gains[i])
        for i in range(len(models))
    ]
    return ManyAlignment(aligned, alignments, rounds)


def _weighted_sum(
    models: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    return {
        k: sum(w * m[k].double() for m, w in zip(models, weights))
        for k, v in models[0].items()
        if v.is_floating_point()
    }


def check_models_and_weights(
    models: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None
) -> list[float]:
    """The merge weights of ``models`` (1 each by default), checked positive and finite and
    scaled so that the largest is 1."""
    if len(models) == 0:
        raise ValueError("cannot merge an empty list of models")
    if weights is None:
        return [1.0] * len(models)
    if len(weights) != len(models):
        raise ValueError(f"got {len(weights)} weights for {len(models)} models")
    for w in weights:
        if not (w > 0 and np.isfinite(w)):
            raise ValueError(f"merge weights must be positive and finite, got {w}")
    # Relative to the largest, in float64: weights whose sum overflows (1e308 twice) still
    # give the right mean, never a silent zero.
    largest = max(float(w) for w in weights)
    return [float(w) / largest for w in weights]
