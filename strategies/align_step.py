"""The re-basin step in front of a strategy's aggregation: screen a round's replies, then
align the valid ones, one at a time where the reference allows it.

:class:`RoundAlignment` does, for one round,

1. drop every update that is unusable -- the front end's own finding, a weight that is not
   a whole number of examples in ``[1, MAX_NUM_EXAMPLES]``, arrays that cannot be read, a
   state dict that differs from the global model in keys, shapes or dtypes or holds NaN/Inf,
   or one far larger than the global model (:func:`rebasin.permute.magnitude_problem`) --
   with one warning naming the node. Every update is checked before any is aligned, so each
   bad one is named even in a round that cannot merge, and the total weight is known;
2. align the rest through the engine (:class:`rebasin.align.ReferenceAligner`, one client
   at a time, to the global model or the heaviest client, warm-started from the node's
   permutations of its last round when that start beats the identity; or
   :func:`rebasin.align.align_many` for ``"merge-many"``). A client whose matching fails is
   dropped with the reason, and the round goes on without it.

The consumers decide what to do with the aligned models: :func:`strategies.aggregate
.rebasin_aggregate` streams them into FedAvg's weighted sum; :class:`strategies.wrapper
.ReBasin` hands them to any Flower strategy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from rebasin.align import Alignment, ReferenceAligner, align_many, identity_alignment
from rebasin.matching import MatchingError
from rebasin.permute import Perms, magnitude_problem, model_norm, validate_state_dict
from rebasin.spec import PermutationSpec, StateDict
from strategies.core import (
    ClientUpdate,
    NodeId,
    ReBasinOptions,
    RoundReport,
    log_dropped,
    logger,
    weight_problem,
)


@dataclass(frozen=True)
class AlignedUpdate:
    """A valid client's model, aligned: who sent it, its weight, the model (CPU tensors)."""

    node_id: NodeId
    weight: float
    state_dict: StateDict
    alignment: Alignment


@dataclass(frozen=True)
class _Candidate:
    node_id: NodeId
    weight: float
    load: Callable[[], Mapping[str, torch.Tensor]]


class RoundAlignment:
    """One round's replies, screened; iterate over it to align the valid ones.

    Parameters
    ----------
    spec
        Permutation spec of the model.
    global_model
        The global model sent this round (CPU tensors): every client model must match its
        keys, shapes and dtypes; it is the magnitude yardstick, and with reference
        ``"global"`` the reference.
    updates
        The round's replies, in reply order.
    options
        Reference choice, matching sweeps, seed, device and norm bound.
    warm_starts
        Node id -> that node's permutations of its previous round (not used by
        ``"merge-many"``, which always starts from the identity).
    min_valid
        Fewest valid updates the consumer merges; MergeMany stops dropping and re-aligning
        below it.
    weight_key
        Name of the weight in messages (for log lines).

    Attributes
    ----------
    report : RoundReport
        What happened to every reply so far (complete once iterated).
    candidates : list
        The updates that passed the screen, in reply order.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        global_model: Mapping[str, torch.Tensor],
        updates: Sequence[ClientUpdate],
        *,
        options: ReBasinOptions,
        warm_starts: Mapping[NodeId, Perms],
        min_valid: int,
        weight_key: str = "num-examples",
    ) -> None:
        self.spec = spec
        self.options = options
        self.min_valid = max(min_valid, 1)
        self._global = global_model
        self._global_norm = model_norm(global_model)
        self._warm_starts = warm_starts
        self.report = RoundReport(reference=options.reference, received=len(updates))
        self.candidates = [c for c in _screen(updates, weight_key, self.report) if self._check(c)]

    @property
    def total_weight(self) -> float:
        """Sum of the screened candidates' weights."""
        return sum(c.weight for c in self.candidates)

    def __iter__(self) -> Iterator[AlignedUpdate]:
        """The valid clients' models, aligned, in reply order; failures go to the report."""
        if self.options.reference == "merge-many":
            yield from self._merge_many()
        else:
            yield from self._to_reference()
        self.report.valid = [
            c.node_id for c in self.candidates if c.node_id not in self.report.dropped
        ]

    # --- screening --------------------------------------------------------------------

    def _check(self, candidate: _Candidate) -> bool:
        """Whether the candidate's model is usable; if not, it is dropped with the reason.

        The arrays are read again, trusted, when aligned: that keeps one client model in
        memory at a time (the reply's bytes are held by the message anyway).
        """
        try:
            state_dict = dict(candidate.load())
        except Exception as exc:  # malformed client data: any failure must only drop it
            self.report.drop(candidate.node_id, f"its arrays cannot be read: {exc}")
            return False
        try:
            validate_state_dict(state_dict, self._global, name="model")
        except ValueError as exc:
            self.report.drop(candidate.node_id, str(exc))
            return False
        problem = magnitude_problem(state_dict, self._global_norm, self.options.max_norm_ratio)
        if problem is not None:
            self.report.drop(candidate.node_id, problem)
            return False
        return True

    # --- alignment --------------------------------------------------------------------

    def _to_reference(self) -> Iterator[AlignedUpdate]:
        """Reference ``global`` or ``largest``: one client at a time through the aligner."""
        if not self.candidates:
            return
        reference_id: NodeId | None = None
        reference: Mapping[str, torch.Tensor] = self._global
        held: dict[NodeId, StateDict] = {}
        if self.options.reference == "largest":
            largest = max(self.candidates, key=lambda c: c.weight)  # the first one on ties
            reference_id, reference = largest.node_id, dict(largest.load())
            held[reference_id] = reference
        aligner = ReferenceAligner(
            self.spec,
            reference,
            max_iter=self.options.max_iter,
            device=self.options.torch_device,
        )
        for candidate in self.candidates:
            state_dict = held.pop(candidate.node_id, None)
            if state_dict is None:
                state_dict = dict(candidate.load())
            if candidate.node_id == reference_id:
                aligned, alignment = state_dict, identity_alignment(self.spec, state_dict)
            else:
                try:
                    aligned, alignment = aligner.align(
                        state_dict,
                        seed=self.options.seed,
                        init=self._warm_starts.get(candidate.node_id),
                        check=False,
                    )
                except MatchingError as exc:
                    self.report.drop(candidate.node_id, f"weight matching failed: {exc}")
                    continue
            yield self._aligned(candidate, aligned, alignment)

    def _aligned(
        self, candidate: _Candidate, aligned: Mapping[str, torch.Tensor], alignment: Alignment
    ) -> AlignedUpdate:
        """Record and log how ``candidate`` was aligned; its model as CPU tensors."""
        self.report.alignments[candidate.node_id] = alignment
        _log_alignment(candidate.node_id, alignment)
        cpu = {k: v.cpu() for k, v in aligned.items()}
        return AlignedUpdate(candidate.node_id, candidate.weight, cpu, alignment)

    def _merge_many(self) -> Iterator[AlignedUpdate]:
        """Reference ``merge-many``: every valid model in memory, aligned to each other; a
        model whose matching fails is dropped and the others are aligned again without it."""
        device = self.options.torch_device
        kept = list(self.candidates)
        models = [{k: v.to(device) for k, v in c.load().items()} for c in kept]
        start = time.perf_counter()
        while True:
            if len(kept) < self.min_valid:
                return
            try:
                many = align_many(
                    self.spec,
                    models,
                    [c.weight for c in kept],
                    seed=self.options.seed,
                    max_iter=self.options.max_iter,
                )
                break
            except MatchingError as exc:
                if exc.model is None:
                    raise
                self.report.drop(kept[exc.model].node_id, f"weight matching failed: {exc}")
                del kept[exc.model], models[exc.model]
        logger.info(
            "\tMergeMany over %d models: %d rounds in %.3f s",
            len(kept),
            many.rounds,
            time.perf_counter() - start,
        )
        for candidate, aligned, alignment in zip(kept, many.aligned, many.alignments):
            yield self._aligned(candidate, aligned, alignment)


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
            report.drop(update.node_id, problem)
            continue
        assert update.load is not None
        candidates.append(_Candidate(update.node_id, float(update.weight), update.load))
    return candidates


def _log_alignment(node_id: NodeId, alignment: Alignment) -> None:
    logger.info(
        "\tnode %s: %d matching sweeps in %.3f s, objective gain %.6g%s",
        node_id,
        alignment.sweeps,
        alignment.seconds,
        alignment.objective_gain,
        " (warm start)" if alignment.warm_start else "",
    )
