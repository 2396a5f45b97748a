"""Flower-independent core of the Re-Basin strategies: screen client updates, align, average.

Both strategy front ends (the Message API :class:`~strategies.rebasin_fedavg.ReBasinFedAvg`
and the legacy :class:`~strategies.legacy.ReBasinFedAvgLegacy`) turn their Flower objects
into :class:`ClientUpdate` values and call :func:`rebasin_aggregate`, which

1. drops every update that is unusable (the front end's own finding, a weight that is not a
   whole number of examples in ``[1, MAX_NUM_EXAMPLES]``, arrays that cannot be read, a state
   dict that differs from the global model in keys, shapes or dtypes, or holds NaN/Inf, or
   one whose magnitude is far outside the global model's, see
   :func:`rebasin.permute.magnitude_problem`),
   with one warning naming the node;
2. keeps the previous global model when fewer than ``min_valid`` updates remain (every
   update is still checked, so that each bad one is named);
3. otherwise aligns each update to the reference by weight matching (warm-started from the
   node's permutations of its last round when that start is better than the identity) and
   averages the aligned models weighted by their number of examples; or, with the
   ``"merge-many"`` reference, aligns all of them to each other (MergeMany) and takes
   :func:`rebasin.merge.merge_many`'s average. An update whose matching fails is dropped
   with the reason, and the round goes on without it;
4. keeps the previous global model, with a warning, if the merged model is not finite.

The average to a reference uses FedAvg's own floating-point arithmetic
(``sum_i x_i * (w_i / W)``, accumulated in the parameters' dtype, in reply order), so that
when matching finds the identity the result is bit for bit what Flower's FedAvg returns;
MergeMany's average is :func:`rebasin.merge.average` (accumulated in float64). Each update
is converted to tensors twice, to be checked and to be merged, so that, except for MergeMany,
only one client model is held at a time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from rebasin.matching import MatchingError, weight_matching
from rebasin.merge import align_many, average
from rebasin.permute import (
    Perms,
    apply_permutation,
    is_finite,
    magnitude_problem,
    model_norm,
    validate_state_dict,
)
from rebasin.spec import PermutationSpec, SpecError, StateDict, is_running_stat

# A child of Flower's logger, so that these lines reach Flower's console handler (and
# `flwr log`) in the same format as FedAvg's own; records still propagate to the root logger.
logger = logging.getLogger("flwr.rebasin")

Reference = Literal["global", "largest", "merge-many"]
REFERENCES: tuple[str, ...] = ("global", "largest", "merge-many")
NodeId = Hashable

# More examples than any client holds: a larger count is a bug or an attack, and counts up
# to it sum exactly in float64 over any realistic number of clients.
MAX_NUM_EXAMPLES = 10**12
DEFAULT_MAX_NORM_RATIO = 1e3


class ReBasinOptions(BaseModel):
    """How the strategies match and merge; validated once, shared by both front ends.

    Attributes
    ----------
    reference
        What client models are aligned to: ``"global"`` the global model sent this round,
        ``"largest"`` the valid reply with the most examples, ``"merge-many"`` no reference
        (MergeMany, Ainsworth et al., appendix).
    max_iter
        Most weight-matching sweeps per client.
    seed
        Seeds the order in which permutations are visited. Every client of a round gets the
        same seed, so identical client models are permuted identically.
    device
        Where matching runs: ``"cuda"`` when available, else ``"cpu"`` by default.
    max_norm_ratio
        A reply whose L2 norm (over all floating-point entries) exceeds this many times
        ``max(||global model||, 1)`` is dropped before it is matched or averaged (see
        :func:`magnitude_problem`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    reference: Reference = "global"
    max_iter: int = Field(default=100, ge=1)
    seed: int = 0
    device: str | None = None
    max_norm_ratio: float = Field(default=DEFAULT_MAX_NORM_RATIO, gt=0)

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            device = torch.device(value)
        except RuntimeError as exc:
            raise ValueError(f"unknown torch device {value!r}: {exc}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {value!r} asked for, but CUDA is not available")
        return value

    @property
    def torch_device(self) -> torch.device:
        """The matching device, with the default filled in."""
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply, as the Flower-independent core sees it.

    Attributes
    ----------
    node_id
        Who sent it (a Message API node id, or a legacy client id).
    weight
        The reported number of examples, unchecked (checked by :func:`rebasin_aggregate`).
    load
        Converts the reply's arrays to a state dict of CPU tensors; called at most twice (to
        check the reply, then to merge it), returning equal tensors each time. May raise on
        malformed arrays: the reply is then dropped with the error's message.
    problem
        Set when the front end already found the reply unusable (for example an error reply);
        the reply is then dropped with this reason.
    """

    node_id: NodeId
    weight: object = None
    load: Callable[[], Mapping[str, torch.Tensor]] | None = None
    problem: str | None = None


@dataclass(frozen=True)
class NodeAlignment:
    """How one client's model was aligned this round.

    With the ``"merge-many"`` reference a client is matched several times, against the
    weighted mean of the other clients' models as aligned so far (see
    :class:`rebasin.merge.ManyAlignment`); the fields then sum over those matchings.

    Attributes
    ----------
    perms
        Permutation name -> LongTensor on the CPU, applied to the client's model before
        averaging (identity for the reference model itself).
    sweeps
        Weight-matching sweeps performed (0 for the reference model). MergeMany: summed over
        all the client's matchings.
    seconds
        Wall time of matching this client. MergeMany: this client's share of the alignment,
        the time of the steps in which it was matched (the shares add up to about the whole
        MergeMany alignment; the final average is not included).
    objective_gain
        ``sum_w <ref_w, pi(client_w)>`` after matching minus its value without permuting:
        how much more similar to the reference the client became. MergeMany: the sum over
        the client's matchings of the objective after minus before, each against the mean of
        the others at that moment (a moving target, so not a gain against one model).
    warm_start
        Whether matching started from this node's permutations of its previous round (never
        with MergeMany, which always starts from the identity).
    """

    perms: Perms
    sweeps: int
    seconds: float
    objective_gain: float
    warm_start: bool


@dataclass
class RoundReport:
    """What happened to the replies of one round (exposed on the strategies for metrics).

    Attributes
    ----------
    reference
        The reference choice used.
    received
        Replies received (valid or not).
    valid
        Node ids whose models were merged, in reply order.
    dropped
        Node id -> why its reply was not used.
    alignments
        Node id -> how its model was aligned.
    kept_previous
        True when the previous global model was kept; ``reason`` says why.
    """

    reference: str
    received: int
    valid: list[NodeId] = field(default_factory=list)
    dropped: dict[NodeId, str] = field(default_factory=dict)
    alignments: dict[NodeId, NodeAlignment] = field(default_factory=dict)
    kept_previous: bool = False
    reason: str = ""

    @property
    def perms(self) -> dict[NodeId, Perms]:
        """Node id -> the permutations applied to its model."""
        return {node: a.perms for node, a in self.alignments.items()}

    @property
    def objective_gains(self) -> dict[NodeId, float]:
        """Node id -> objective gain of matching (see :class:`NodeAlignment`)."""
        return {node: a.objective_gain for node, a in self.alignments.items()}


def resolve_spec(
    model: nn.Module | None,
    spec: PermutationSpec | None,
    example_input: torch.Tensor | None = None,
) -> PermutationSpec:
    """The permutation spec a strategy works with, from an explicit spec or a model.

    A model's own ``permutation_spec()`` is preferred; otherwise the model is traced with
    :func:`rebasin.trace.spec_from_module`. When both are given, ``spec`` is used and must fit
    the model's state dict.

    Raises
    ------
    ValueError
        If neither is given.
    SpecError
        If the spec does not fit the model.
    """
    if spec is None and model is None:
        raise ValueError("give model= (its permutation spec is derived) or spec=")
    if spec is None:
        own = getattr(model, "permutation_spec", None)
        if callable(own):
            spec = own()
        else:
            from rebasin.trace import spec_from_module  # tracing needs torch.fx: load lazily

            spec = spec_from_module(model, example_input)
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    if model is not None:
        spec.check(model.state_dict())
    return spec


def check_global_model(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise unless the global model fits ``spec`` and holds only finite values."""
    try:
        spec.check(state_dict)
    except SpecError as exc:
        raise SpecError(f"the global model does not fit the permutation spec: {exc}") from exc
    validate_state_dict(state_dict, state_dict, name="global model")


def weight_problem(value: object, key: str) -> str | None:
    """Why ``value`` cannot weight a client's model, or ``None`` if it can.

    A weight is a count of examples: a whole number in ``[1, MAX_NUM_EXAMPLES]`` (an int, or a
    float with an integral value).
    """
    if value is None:
        return f"no {key!r} in its metrics"
    if isinstance(value, bool) or not isinstance(value, Real):
        return f"{key!r} must be a single number, got {type(value).__name__} {value!r}"
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        return f"{key!r} must be positive and finite, got {value!r}"
    if not number.is_integer():
        return f"{key!r} must be a whole number of examples, got {value!r}"
    if number > MAX_NUM_EXAMPLES:
        return f"{key!r} = {value!r} is more than the {MAX_NUM_EXAMPLES:.0e} examples allowed"
    return None


def log_dropped(node_id: NodeId, problem: str) -> None:
    """The one warning line written for every reply that is not used."""
    logger.warning("Dropping the reply from node %s: %s", node_id, problem)


def rebasin_aggregate(
    spec: PermutationSpec,
    global_model: Mapping[str, torch.Tensor],
    updates: Sequence[ClientUpdate],
    *,
    options: ReBasinOptions,
    warm_starts: Mapping[NodeId, Perms],
    min_valid: int,
    weight_key: str = "num-examples",
    scale_in_float64: bool = False,
) -> tuple[StateDict | None, RoundReport]:
    """Screen ``updates``, align the valid ones to the reference, and average them.

    Parameters
    ----------
    spec
        Permutation spec of the model.
    global_model
        The global model sent this round (CPU tensors): every client model must match its
        keys, shapes and dtypes; with reference ``"global"`` it is also the reference.
    updates
        The round's replies, in reply order.
    options
        Reference choice, matching sweeps, seed and device.
    warm_starts
        Node id -> that node's permutations of its previous round. Used as the starting point
        of matching when it already aligns the client better than the identity does (a client
        that keeps its own model between rounds); ignored otherwise (a client that restarted
        from the global model, which is already in the reference's basin). Not used by the
        ``"merge-many"`` reference, whose permutations still go into the report.
    min_valid
        Fewest valid updates needed to merge; with fewer, ``None`` is returned.
    weight_key
        Name of the weight in messages (for log lines).
    scale_in_float64
        Multiply each model by its weight factor in float64 before rounding to the model's
        dtype (the legacy FedAvg's arithmetic); otherwise multiply in the model's dtype (the
        Message API FedAvg's arithmetic).

    Returns
    -------
    tuple[StateDict | None, RoundReport]
        The merged model (CPU tensors, the global model's key order and dtypes), or ``None``
        when the previous global model should be kept; and what happened to every update.
    """
    report = RoundReport(reference=options.reference, received=len(updates))
    loader = _Loader(global_model, report, options.max_norm_ratio)
    # Every reply is checked before any is merged: each bad one is named even in a round
    # that cannot merge, and the sum's total weight is known exactly (FedAvg's arithmetic).
    candidates = [c for c in _screen(updates, weight_key, report) if loader.check(c)]
    if len(candidates) < max(min_valid, 1):
        return None, _keep_previous(report, len(candidates), min_valid)

    if options.reference == "merge-many":
        merged = _merge_many(spec, candidates, loader, options, min_valid)
    else:
        merged = _align_and_average(
            spec, global_model, candidates, loader, options, warm_starts, scale_in_float64
        )
    report.valid = [u.node_id for u in candidates if u.node_id not in report.dropped]
    if merged is None or len(report.valid) < max(min_valid, 1):
        return None, _keep_previous(report, len(report.valid), min_valid)
    for key, tensor in merged.items():
        if tensor.is_floating_point() and not is_finite(tensor):
            return None, _keep_previous(
                report, len(report.valid), min_valid, f"the merged model is not finite in {key!r}"
            )
    logger.info(
        "Re-Basin merge: %d valid replies of %d (reference: %s)",
        len(report.valid),
        report.received,
        options.reference,
    )
    return {key: merged[key] for key in global_model}, report


# --- internals ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    node_id: NodeId
    weight: float
    load: Callable[[], Mapping[str, torch.Tensor]]


def _screen(
    updates: Sequence[ClientUpdate], weight_key: str, report: RoundReport
) -> list[_Candidate]:
    """Drop the updates that are unusable before any array is read."""
    candidates: list[_Candidate] = []
    seen: set[NodeId] = set()
    for update in updates:
        if update.node_id in seen:
            # Not recorded in `report.dropped`, which holds the node's first reply's fate.
            log_dropped(update.node_id, "a second reply from the same node in one round")
            continue
        seen.add(update.node_id)
        problem = update.problem
        if problem is None:
            problem = weight_problem(update.weight, weight_key)
        if problem is None and update.load is None:
            problem = "no arrays in the reply"
        if problem is not None:
            report.dropped[update.node_id] = problem
            log_dropped(update.node_id, problem)
            continue
        assert update.load is not None
        candidates.append(_Candidate(update.node_id, float(update.weight), update.load))
    return candidates


class _Loader:
    """Checks a candidate's arrays against the global model (keys, shapes, dtypes,
    finiteness, then magnitude), and reads them again, trusted, when they are merged.

    Reading twice keeps one client model in memory at a time: the reply's bytes are held
    by the message anyway, and converting them costs little next to matching.
    """

    def __init__(
        self, global_model: Mapping[str, torch.Tensor], report: RoundReport, max_norm_ratio: float
    ) -> None:
        self._global = global_model
        self._global_norm = model_norm(global_model)
        self._max_norm_ratio = max_norm_ratio
        self.report = report

    def check(self, candidate: _Candidate) -> bool:
        """Whether the candidate's model is usable; if not, it is dropped with the reason."""
        try:
            state_dict = dict(candidate.load())
        except Exception as exc:  # malformed client data: any failure must only drop it
            self.drop(candidate.node_id, f"its arrays cannot be read: {exc}")
            return False
        try:
            validate_state_dict(state_dict, self._global, name="model")
        except ValueError as exc:
            self.drop(candidate.node_id, str(exc))
            return False
        problem = magnitude_problem(state_dict, self._global_norm, self._max_norm_ratio)
        if problem is not None:
            self.drop(candidate.node_id, problem)
            return False
        return True

    def __call__(self, candidate: _Candidate) -> StateDict:
        """The checked candidate's model, as CPU tensors."""
        return dict(candidate.load())

    def drop(self, node_id: NodeId, problem: str) -> None:
        """Record and log that ``node_id``'s reply is not used."""
        self.report.dropped[node_id] = problem
        log_dropped(node_id, problem)


def _keep_previous(
    report: RoundReport, valid: int, min_valid: int, reason: str | None = None
) -> RoundReport:
    report.kept_previous = True
    report.valid = []
    report.alignments = {}
    report.reason = reason or (
        f"{valid} valid replies of {report.received}, fewer than the {max(min_valid, 1)} "
        "needed to merge"
    )
    logger.warning("Keeping the previous global model: %s", report.reason)
    return report


def _align_and_average(
    spec: PermutationSpec,
    global_model: Mapping[str, torch.Tensor],
    candidates: list[_Candidate],
    loader: _Loader,
    options: ReBasinOptions,
    warm_starts: Mapping[NodeId, Perms],
    scale_in_float64: bool,
) -> StateDict | None:
    """Reference ``global`` or ``largest``: stream the clients through matching into a sum."""
    device = options.torch_device
    reference_id: NodeId | None = None
    held: dict[NodeId, StateDict] = {}
    if options.reference == "largest":
        # The heaviest client is the reference (the first one on ties).
        largest = max(candidates, key=lambda c: c.weight)
        reference_id, reference = largest.node_id, loader(largest)
        held[reference_id] = reference
    else:
        reference = global_model
    reference_on_device = {k: v.to(device) for k, v in reference.items()}
    matcher = _Matcher(spec, reference_on_device, options, device)

    acc = _FedAvgSum(sum(c.weight for c in candidates), scale_in_float64)
    alignments = loader.report.alignments
    for candidate in candidates:
        state_dict = held.pop(candidate.node_id, None)
        if state_dict is None:
            state_dict = loader(candidate)
        if candidate.node_id == reference_id:
            alignment = _identity_alignment(spec, state_dict)
            aligned = state_dict
        else:
            try:
                alignment = matcher.align(candidate.node_id, state_dict, warm_starts)
            except MatchingError as exc:
                loader.drop(candidate.node_id, f"weight matching failed: {exc}")
                continue
            aligned = apply_permutation(spec, alignment.perms, state_dict)
        alignments[candidate.node_id] = alignment
        acc.add(aligned, candidate.weight)
        _log_alignment(candidate.node_id, alignment)
    if acc.empty:
        return None
    valid_total = sum(c.weight for c in candidates if c.node_id not in loader.report.dropped)
    return acc.result(valid_total)


def _merge_many(
    spec: PermutationSpec,
    candidates: list[_Candidate],
    loader: _Loader,
    options: ReBasinOptions,
    min_valid: int,
) -> StateDict | None:
    """Reference ``merge-many``: every valid model in memory, aligned to each other.

    The result is :func:`rebasin.merge.merge_many`'s, bit for bit (the same alignment, then
    the same average); each valid node's alignment goes into the report. A model whose
    matching fails is dropped and the others are aligned again without it.
    """
    device = options.torch_device
    node_ids = [c.node_id for c in candidates]
    weights = [c.weight for c in candidates]
    models = [{k: v.to(device) for k, v in loader(c).items()} for c in candidates]
    start = time.perf_counter()
    while True:
        if len(models) < max(min_valid, 1):
            return None
        try:
            result = align_many(spec, models, weights, seed=options.seed, max_iter=options.max_iter)
            break
        except MatchingError as exc:
            if exc.model is None:
                raise
            loader.drop(node_ids[exc.model], f"weight matching failed: {exc}")
            for values in (node_ids, models, weights):
                del values[exc.model]
    merged = average(result.aligned, weights)
    logger.info(
        "\tMergeMany over %d models: %d rounds in %.3f s",
        len(models),
        result.rounds,
        time.perf_counter() - start,
    )
    for i, node_id in enumerate(node_ids):
        alignment = NodeAlignment(
            perms=result.perms[i],
            sweeps=result.sweeps[i],
            seconds=result.seconds[i],
            objective_gain=result.objective_gains[i],
            warm_start=False,
        )
        loader.report.alignments[node_id] = alignment
        _log_alignment(node_id, alignment)
    return {k: v.cpu() for k, v in merged.items()}


def _log_alignment(node_id: NodeId, alignment: NodeAlignment) -> None:
    logger.info(
        "\tnode %s: %d matching sweeps in %.3f s, objective gain %.6g%s",
        node_id,
        alignment.sweeps,
        alignment.seconds,
        alignment.objective_gain,
        " (warm start)" if alignment.warm_start else "",
    )


def _identity_alignment(
    spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor]
) -> NodeAlignment:
    sizes = spec.perm_sizes(state_dict)
    perms = {p: torch.arange(n) for p, n in sizes.items()}
    return NodeAlignment(perms=perms, sweeps=0, seconds=0.0, objective_gain=0.0, warm_start=False)


class _Matcher:
    """Weight matching of client models to one reference held on the matching device."""

    def __init__(
        self,
        spec: PermutationSpec,
        reference: Mapping[str, torch.Tensor],
        options: ReBasinOptions,
        device: torch.device,
    ) -> None:
        self.spec = spec
        self.reference = reference
        self.options = options
        self.device = device
        self.sizes = spec.perm_sizes(reference)
        # The weights the matching objective is made of (running statistics only follow).
        self.keys = [
            k
            for k, axes in spec.axes_to_perm.items()
            if any(p is not None for p in axes) and not is_running_stat(k)
        ]

    def align(
        self,
        node_id: NodeId,
        state_dict: Mapping[str, torch.Tensor],
        warm_starts: Mapping[NodeId, Perms],
    ) -> NodeAlignment:
        start = time.perf_counter()
        init = self._usable_warm_start(warm_starts.get(node_id))
        identity_objective: float | None = None
        if init is not None:
            identity_objective = self._objective(state_dict, None)
            if self._objective(state_dict, init) <= identity_objective:
                init = None  # the client restarted from the global model: identity is better
        result = weight_matching(
            self.spec,
            self.reference,
            state_dict,
            seed=self.options.seed,
            init=init,
            max_iter=self.options.max_iter,
            device=self.device,
        )
        if identity_objective is None:
            identity_objective = result.objective[0]
        return NodeAlignment(
            perms=result.perms,
            sweeps=result.sweeps,
            seconds=time.perf_counter() - start,
            objective_gain=result.objective[-1] - identity_objective,
            warm_start=init is not None,
        )

    def _usable_warm_start(self, perms: Perms | None) -> Perms | None:
        if perms is None or set(perms) != set(self.sizes):
            return None
        if any(perms[p].numel() != n for p, n in self.sizes.items()):
            return None
        return perms

    def _objective(self, state_dict: Mapping[str, torch.Tensor], perms: Perms | None) -> float:
        """``sum_w <ref_w, pi(client_w)>`` over the matched weights, as the matcher computes it."""
        weights = {k: state_dict[k] for k in self.keys}
        if perms is not None:
            weights = apply_permutation(self.spec, perms, weights)
        total = 0.0
        for key in self.keys:
            ref = self.reference[key]
            dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
            a = ref.detach().to(device=self.device, dtype=dtype).flatten()
            b = weights[key].detach().to(device=self.device, dtype=dtype).flatten()
            total += float(torch.vdot(a, b))
        return total


class _FedAvgSum:
    """``sum_i x_i * (w_i / W)`` with FedAvg's floating-point arithmetic, one model at a time.

    ``W`` must be known before the first model arrives; if some models are dropped later, the
    sum is rescaled to the weights actually added. Integer entries (such as
    ``num_batches_tracked``) cannot be averaged without changing their dtype: they take the
    value of the heaviest model.
    """

    def __init__(self, expected_total: float, scale_in_float64: bool) -> None:
        if not expected_total > 0:
            raise ValueError(f"total weight must be positive, got {expected_total}")
        self._expected_total = expected_total
        self._scale_in_float64 = scale_in_float64
        self._sum: dict[str, torch.Tensor] = {}
        self._heaviest = -math.inf

    @property
    def empty(self) -> bool:
        return not self._sum

    def add(self, state_dict: Mapping[str, torch.Tensor], weight: float) -> None:
        factor = weight / self._expected_total
        heaviest = weight > self._heaviest
        for key, tensor in state_dict.items():
            tensor = tensor.detach().cpu()
            if tensor.is_floating_point():
                if self._scale_in_float64:
                    term = (tensor.double() * factor).to(tensor.dtype)
                else:
                    term = tensor * factor
                if key in self._sum:
                    self._sum[key].add_(term)
                else:
                    self._sum[key] = term
            elif heaviest:
                self._sum[key] = tensor.clone()
        if heaviest:
            self._heaviest = weight

    def result(self, total: float) -> StateDict:
        if total == self._expected_total:
            return dict(self._sum)
        rescale = self._expected_total / total
        return {k: v * rescale if v.is_floating_point() else v for k, v in self._sum.items()}
