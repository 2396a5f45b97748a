"""``ReBasinFedAvg``: Flower's Message-API FedAvg, merging by Git Re-Basin weight matching.

A drop-in replacement for :class:`flwr.serverapp.strategy.FedAvg`::

    strategy = ReBasinFedAvg(model=Net(), fraction_train=0.5)   # was: FedAvg(fraction_train=0.5)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()), ...)

Differences from FedAvg, all in :meth:`ReBasinFedAvg.aggregate_train`:

* every client model is permuted into the reference's basin before the weighted average;
* unusable replies (error replies, no ArrayRecord, NaN/Inf, keys, shapes or dtypes that differ
  from the global model, a ``num-examples`` that is not a whole number in [1, 1e12], values
  so large that matching would overflow or a norm above ``max_norm_ratio`` times the global
  model's, a failed matching) are dropped with one warning each, where FedAvg stops the
  ServerApp; with fewer than ``min_train_nodes`` valid replies, or a merged model that is
  not finite, the previous global model is kept;
* when matching finds the identity (for example identical client models) the result is
  exactly FedAvg's.

It is :class:`strategies.wrapper.ReBasin` in front of FedAvg, with one difference: the
aligned models are streamed into FedAvg's weighted sum one at a time
(:func:`strategies.aggregate.rebasin_aggregate`) instead of being held until FedAvg's own
``aggregate_train`` runs; the result is the same, bit for bit (tested), except for
``"merge-many"``, whose mean is MergeMany's (in float64).

:meth:`ReBasinFedAvg.aggregate_evaluate` drops unusable evaluation replies the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from torch import nn

from rebasin.spec import PermutationSpec
from strategies.aggregate import rebasin_aggregate
from strategies.core import (
    DEFAULT_MAX_NORM_RATIO,
    Reference,
    log_dropped,
    logger,
)
from strategies.wrapper import ReBasin

MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]


class ReBasinFedAvg(ReBasin, FedAvg):
    """FedAvg that aligns client models by weight matching before averaging them.

    Parameters
    ----------
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, \
min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key, \
train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        As in :class:`flwr.serverapp.strategy.FedAvg`.
    model
        The torch model being trained; its permutation spec is its own ``permutation_spec()``
        if it has one, else traced by :func:`rebasin.trace.spec_from_module`.
    spec
        An explicit permutation spec, instead of (or to override that of) ``model``.
    reference
        ``"global"`` (default): align to the global model sent this round; ``"largest"``: to
        the valid reply with the most examples; ``"merge-many"``: MergeMany, no reference.
    max_iter
        Most weight-matching sweeps per client.
    seed
        Seed of the matching order (the same for every client).
    device
        Where matching runs; ``"cuda"`` when available, else ``"cpu"``, by default.
    example_input
        An input batch to help tracing ``model`` (only used when it is traced).
    max_norm_ratio
        A reply whose norm is more than this many times ``max(||global model||, 1)`` is
        dropped (a finite but huge reply would overflow matching or poison the average).

    Attributes
    ----------
    spec : PermutationSpec
        The permutation spec in use.
    options : ReBasinOptions
        The validated matching options.
    warm_starts : dict[int, dict[str, torch.Tensor]]
        Node id -> the permutations found for it in its last round (the next warm start).
    last_round : RoundReport | None
        What happened in the last ``aggregate_train`` call (valid and dropped replies,
        per-node permutations, sweeps, times and objective gains).
    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggregation | None = None,
        evaluate_metrics_aggr_fn: MetricsAggregation | None = None,
        *,
        model: nn.Module | None = None,
        spec: PermutationSpec | None = None,
        reference: Reference = "global",
        max_iter: int = 100,
        seed: int = 0,
        device: str | None = None,
        example_input: torch.Tensor | None = None,
        max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
            model=model,
            spec=spec,
            reference=reference,
            max_iter=max_iter,
            seed=seed,
            device=device,
            example_input=example_input,
            max_norm_ratio=max_norm_ratio,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop unusable replies, align the rest by weight matching, average them.

        Returns
        -------
        tuple[ArrayRecord | None, MetricRecord | None]
            The merged model, or the previous global model unchanged when fewer than
            ``min_train_nodes`` replies are valid; and FedAvg's aggregate of the valid
            replies' metrics.
        """
        global_model = self._round_global_model()
        replies = list(replies)
        logger.info("aggregate_train (round %d): %d replies", server_round, len(replies))
        merged, report = rebasin_aggregate(
            self.spec,
            global_model,
            [self._to_update(msg) for msg in replies],
            options=self.options,
            warm_starts=self.warm_starts,
            min_valid=self.min_train_nodes,
            weight_key=self.weighted_by_key,
        )
        self.last_round = report
        self.warm_starts.update(report.perms)
        valid = set(report.valid) if not report.kept_previous else set()
        metrics = self._aggregate_metrics(
            [m for m in replies if self._node_of(m) in valid], self.train_metrics_aggr_fn
        )
        if merged is None:
            return self._global_arrays, metrics
        arrays = ArrayRecord.from_torch_state_dict(merged)
        # The merged model is next round's global model: keep its tensors, not just its bytes.
        self._global_arrays, self._global_model = arrays, merged
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """FedAvg's ``aggregate_evaluate``, dropping (not failing on) unusable replies."""
        valid = []
        for msg in replies:
            problem = self._metrics_problem(msg)
            if problem is None:
                valid.append(msg)
            else:
                log_dropped(msg.metadata.src_node_id, f"evaluation reply: {problem}")
        logger.info("aggregate_evaluate (round %d): %d valid replies", server_round, len(valid))
        return self._aggregate_metrics(valid, self.evaluate_metrics_aggr_fn)

    def _aggregate_metrics(
        self, replies: list[Message], aggregate: MetricsAggregation
    ) -> MetricRecord | None:
        if not replies:
            return None
        try:
            return aggregate([msg.content for msg in replies], self.weighted_by_key)
        except (InconsistentMessageReplies, KeyError, TypeError, ValueError) as exc:
            # Metrics are for reporting only: their failure must not cost the round's model.
            logger.warning("Metrics of this round not aggregated: %s", exc)
            return None
