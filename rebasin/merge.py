"""Merge models after weight matching: to a reference, MergeMany, interpolation, barrier."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rebasin.matching import MatchingError, MatchResult, weight_matching
from rebasin.permute import Perms, apply_permutation, is_finite, validate_state_dict
from rebasin.spec import PermutationSpec, StateDict


def align_to_reference(
    spec: PermutationSpec,
    reference: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    *,
    seed: int = 0,
    init: Mapping[str, torch.Tensor] | None = None,
    max_iter: int = 100,
) -> tuple[StateDict, Perms]:
    """Permute ``other`` into ``reference``'s basin; return it and the permutations used."""
    result = weight_matching(spec, reference, other, seed=seed, init=init, max_iter=max_iter)
    return apply_permutation(spec, result.perms, other), result.perms


class WeightedAverage:
    """Streaming weighted average of state dicts: holds one running sum, never the models.

    Floating-point entries are averaged in float64 and returned in their own dtype;
    integer entries (such as ``num_batches_tracked``) take the value of the heaviest model.
    """

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self._total = 0.0
        self._heaviest = -1.0
        self._template: StateDict = {}

    def add(self, state_dict: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        if not (weight > 0 and np.isfinite(weight)):
            raise ValueError(f"merge weights must be positive and finite, got {weight}")
        if self._template:
            validate_state_dict(state_dict, self._template, name="model to average")
        for key, tensor in state_dict.items():
            if tensor.is_floating_point():
                term = tensor.detach().double() * weight
                self._sum[key] = self._sum[key] + term if key in self._sum else term
            elif weight > self._heaviest:
                self._sum[key] = tensor.detach().clone()
        if weight > self._heaviest:
            self._heaviest = weight
        if not self._template:
            self._template = {k: v.detach() for k, v in state_dict.items()}
        self._total += weight
        if not np.isfinite(self._total):
            raise ValueError(
                f"merge weights sum to {self._total}: give them relative to the largest"
            )

    def result(self) -> StateDict:
        """The weighted mean; ``ValueError`` naming the key if any entry is not finite."""
        if not self._template:
            raise ValueError("cannot average an empty list of models")
        mean = {
            key: (value / self._total).to(self._template[key].dtype)
            if self._template[key].is_floating_point()
            else value
            for key, value in self._sum.items()
        }
        for key, value in mean.items():
            if value.is_floating_point() and not is_finite(value):
                raise ValueError(f"the weighted average is not finite in {key!r}")
        return mean


def average(
    models: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> StateDict:
    """Naive (weighted) average of state dicts, as FedAvg does."""
    weights = _check_models_and_weights(models, weights)
    acc = WeightedAverage()
    for model, weight in zip(models, weights):
        acc.add(model, weight)
    return acc.result()


def merge_to_reference(
    spec: PermutationSpec,
    models: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    *,
    reference: int | Mapping[str, torch.Tensor] = 0,
    seed: int = 0,
    max_iter: int = 100,
    on_match: Callable[[int, MatchResult], None] | None = None,
) -> StateDict:
    """Align every model to a reference, then take the weighted average.

    ``reference`` is an index into ``models`` (that model is not permuted) or an outside
    state dict (such as last round's global model). Model ``i`` is matched with seed
    ``seed + i``. Work grows linearly with ``len(models)`` and only one aligned copy exists
    at a time. ``on_match(i, result)``, if given, is called after model ``i`` is matched
    (progress, per-model statistics).

    Raises
    ------
    MatchingError
        Naming the model (``.model``: its index) whose matching failed.
    ValueError
        If the weights are not positive and finite, or the average is not finite.
    """
    weights = _check_models_and_weights(models, weights)
    ref = models[reference] if isinstance(reference, int) else reference
    acc = WeightedAverage()
    for i, (model, weight) in enumerate(zip(models, weights)):
        if isinstance(reference, int) and i == reference:
            acc.add(model, weight)
            continue
        try:
            result = weight_matching(spec, ref, model, seed=seed + i, max_iter=max_iter)
        except MatchingError as exc:
            raise MatchingError(f"model {i}: {exc}", model=i) from exc
        acc.add(apply_permutation(spec, result.perms, model), weight)
        if on_match is not None:
            on_match(i, result)
    return acc.result()


def merge_many(
    spec: PermutationSpec,
    models: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    *,
    seed: int = 0,
    max_rounds: int = 20,
    max_iter: int = 100,
) -> StateDict:
    """MergeMany (Ainsworth et al., appendix): no reference model.

    The weighted mean of the models as aligned by :func:`align_many`.
    """
    weights = _check_models_and_weights(models, weights)
    aligned = align_many(
        spec, models, weights, seed=seed, max_rounds=max_rounds, max_iter=max_iter
    ).aligned
    return average(aligned, weights)


@dataclass(frozen=True)
class ManyAlignment:
    """What :func:`align_many` did, per model (in the order of the input models).

    Attributes
    ----------
    aligned
        The aligned state dicts.
    perms
        The permutations that map each input model to its aligned version.
    sweeps
        Weight-matching sweeps spent on each model, summed over all its matchings (0 when
        there is a single model, which is never matched).
    seconds
        Wall time of each model's matching steps (building the mean of the others, matching,
        permuting, updating the running sum); together about the whole alignment's time.
    objective_gains
        Per model, the sum over its matchings of the objective after matching minus before
        (``sum_w <mean_w, pi(model_w)>``, each against the weighted mean of the other models
        as aligned at that moment, so not against one fixed target).
    rounds
        Rounds over all the models that were run.
    """

    aligned: list[StateDict]
    perms: list[Perms]
    sweeps: list[int]
    seconds: list[float]
    objective_gains: list[float]
    rounds: int


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

    Returns
    -------
    ManyAlignment
        Per model: the aligned state dict, the permutations that map the input model to it
        (``apply_permutation(spec, perms[i], models[i])``), and what its matchings cost and
        gained.
    """
    weights = _check_models_and_weights(models, weights)
    for i, model in enumerate(models[1:], start=1):
        validate_state_dict(model, models[0], name=f"model {i}")
    aligned = [dict(m) for m in models]
    sizes = spec.perm_sizes(models[0])
    perms = [{p: torch.arange(n) for p, n in sizes.items()} for _ in models]
    sweeps = [0] * len(models)
    seconds = [0.0] * len(models)
    gains = [0.0] * len(models)
    rounds = 0
    if len(aligned) == 1:
        return ManyAlignment(aligned, perms, sweeps, seconds, gains, rounds)
    rng = np.random.default_rng(seed)
    total = sum(weights)
    weighted_sum = _weighted_sum(aligned, weights)
    for _ in range(max_rounds):
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
                    spec, others_mean, aligned[i], seed=int(rng.integers(2**31)), max_iter=max_iter
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
    return ManyAlignment(aligned, perms, sweeps, seconds, gains, rounds)


def interpolate(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], lam: float
) -> StateDict:
    """``(1 - lam) * a + lam * b`` for floating-point entries; integer entries from ``a``."""
    validate_state_dict(b, a, name="second model")
    return {
        k: torch.lerp(v, b[k], lam) if v.is_floating_point() else v.clone() for k, v in a.items()
    }


@dataclass(frozen=True)
class InterpolationCurve:
    """Loss and accuracy along ``(1 - lam) a + lam b``."""

    lambdas: list[float]
    losses: list[float]
    accuracies: list[float]

    @property
    def loss_barrier(self) -> float:
        return barrier(self.losses)

    @property
    def accuracy_barrier(self) -> float:
        """Largest drop of accuracy below the endpoints' mean (positive means worse)."""
        return barrier([-a for a in self.accuracies])


def interpolation_curve(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    evaluate: Callable[[StateDict], tuple[float, float]],
    lambdas: Iterable[float] = tuple(np.linspace(0.0, 1.0, 11)),
) -> InterpolationCurve:
    """Evaluate ``evaluate(state_dict) -> (loss, accuracy)`` along the linear path a -> b.

    ``evaluate`` owns whatever happens per point (for example a BatchNorm reset).
    """
    lams = [float(x) for x in lambdas]
    losses, accs = [], []
    for lam in lams:
        loss, acc = evaluate(interpolate(a, b, lam))
        losses.append(float(loss))
        accs.append(float(acc))
    return InterpolationCurve(lams, losses, accs)


def barrier(values: Sequence[float]) -> float:
    """Loss barrier of a path: ``max_i values[i]`` minus the mean of the two endpoints."""
    if len(values) < 2:
        raise ValueError("a barrier needs at least the two endpoints")
    return float(max(values) - 0.5 * (values[0] + values[-1]))


def _check_models_and_weights(
    models: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None
) -> list[float]:
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


def _weighted_sum(
    models: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    return {
        k: sum(w * m[k].double() for m, w in zip(models, weights))
        for k, v in models[0].items()
        if v.is_floating_point()
    }
