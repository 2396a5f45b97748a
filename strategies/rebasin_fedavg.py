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

:meth:`ReBasinFedAvg.aggregate_evaluate` drops unusable evaluation replies the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from torch import nn

from rebasin.permute import Perms
from rebasin.spec import PermutationSpec, StateDict
from strategies.aggregate import rebasin_aggregate
from strategies.core import (
    DEFAULT_MAX_NORM_RATIO,
    ClientUpdate,
    NodeId,
    ReBasinOptions,
    Reference,
    RoundReport,
    check_global_model,
    log_dropped,
    logger,
    resolve_spec,
    weight_problem,
)

MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]


class ReBasinFedAvg(FedAvg):
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
        )
        self.options = ReBasinOptions(
            reference=reference,
            max_iter=max_iter,
            seed=seed,
            device=device,
            max_norm_ratio=max_norm_ratio,
        )
        self.spec = resolve_spec(model, spec, example_input)
        self.warm_starts: dict[NodeId, Perms] = {}
        self.last_round: RoundReport | None = None
        self._global_arrays: ArrayRecord | None = None
        self._sent: list[Message] = []
        self._global_model: StateDict | None = None

    @property
    def last_perms(self) -> dict[NodeId, Perms]:
        """Node id -> permutations applied to its model in the last round."""
        return self.last_round.perms if self.last_round else {}

    @property
    def last_objective_gains(self) -> dict[NodeId, float]:
        """Node id -> objective gain of matching in the last round."""
        return self.last_round.objective_gains if self.last_round else {}

    def summary(self) -> None:
        """Log FedAvg's summary, then the re-basin settings."""
        super().summary()
        logger.info(
            "\t└──> Re-Basin: reference %s, max %d sweeps, seed %d, device %s, %d permutations",
            self.options.reference,
            self.options.max_iter,
            self.options.seed,
            self.options.torch_device,
            len(self.spec.perm_names),
        )

    def set_global_arrays(self, arrays: ArrayRecord) -> None:
        """Remember the global model that clients train from (done by ``configure_train``).

        Raises
        ------
        rebasin.spec.SpecError
            If the model does not fit the permutation spec.
        ValueError
            If it holds NaN or Inf.
        """
        if arrays is self._global_arrays:
            return
        state_dict = dict(arrays.to_torch_state_dict())
        check_global_model(self.spec, state_dict)
        self._global_arrays, self._global_model = arrays, state_dict

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's ``configure_train``, remembering ``arrays`` as this round's global model
        and the messages sent (the grid stamps their ids when it sends them)."""
        self.set_global_arrays(arrays)
        self._sent = list(super().configure_train(server_round, arrays, config, grid))
        return self._sent

    def _node_of(self, msg: Message) -> int:
        """The node a reply answers for. Error replies for a node that stopped sending
        heartbeats come from the SuperLink itself, so match by ``reply_to_message_id``."""
        for sent in self._sent:
            if (
                sent.metadata.message_id
                and sent.metadata.message_id == msg.metadata.reply_to_message_id
            ):
                return sent.metadata.dst_node_id
        return msg.metadata.src_node_id

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
        if self._global_model is None or self._global_arrays is None:
            raise RuntimeError(
                "aggregate_train needs the global model of the round: call configure_train "
                "(as Strategy.start does) or set_global_arrays first"
            )
        replies = list(replies)
        logger.info("aggregate_train (round %d): %d replies", server_round, len(replies))
        updates = [self._to_update(msg) for msg in replies]
        merged, report = rebasin_aggregate(
            self.spec,
            self._global_model,
            updates,
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

    # --- Flower records -> the core's ClientUpdate -------------------------------------

    def _to_update(self, msg: Message) -> ClientUpdate:
        node_id = self._node_of(msg)
        problem = self._metrics_problem(msg)
        if problem is not None:
            return ClientUpdate(node_id, problem=problem)
        record, problem = self._array_record(msg.content)
        if record is None:
            return ClientUpdate(node_id, problem=problem)
        weight = next(iter(msg.content.metric_records.values()))[self.weighted_by_key]
        return ClientUpdate(node_id, weight=weight, load=record.to_torch_state_dict)

    def _metrics_problem(self, msg: Message) -> str | None:
        """Why a reply's metrics cannot weight it (FedAvg reads its first MetricRecord)."""
        if msg.has_error():
            return f"error reply (code {msg.error.code}): {msg.error.reason}"
        if not msg.has_content():
            return "empty reply"
        metric_records = msg.content.metric_records
        if not metric_records:
            return f"no MetricRecord (it must hold {self.weighted_by_key!r})"
        first = next(iter(metric_records.values()))
        return weight_problem(first.get(self.weighted_by_key), self.weighted_by_key)

    def _array_record(self, content: RecordDict) -> tuple[ArrayRecord | None, str]:
        """The reply's model: the ArrayRecord under ``arrayrecord_key``, or its only one."""
        records = content.array_records
        if self.arrayrecord_key in records:
            return records[self.arrayrecord_key], ""
        if len(records) == 1:
            return next(iter(records.values())), ""
        if not records:
            return None, "no ArrayRecord in the reply"
        return None, (
            f"{len(records)} ArrayRecords {sorted(records)} and none named {self.arrayrecord_key!r}"
        )

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
