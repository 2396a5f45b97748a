"""Re-basin in front of any Message-API strategy's aggregation.

:class:`ReBasin` is a mixin: in front of the strategy it is mixed into, its
``aggregate_train`` screens the round's replies, aligns the valid client models to the
reference (:class:`strategies.align_step.RoundAlignment`), writes the aligned models back
into the replies, and hands only the valid replies to the strategy's own ``aggregate_train``
-- FedAvg's mean, FedAdam's server optimiser, FedMedian, Krum, a DP wrapper's clipping and
noise, a user's own hooks. Three ways in, one mechanism:

* a strategy class of Flower's, as it is: ``rebasin(FedMedian)(model=Net(), ...)``;
* a strategy instance: ``with_rebasin(FedAdam(...), model=Net())``;
* a user's own subclass, keeping its overrides (``start``, ``configure_train``, ...):
  ``class CustomFedAvg(ReBasin, FedAvg)``, constructed with ``model=Net()``.

Order with Flower's DP wrappers: re-basin goes *in front of* the clipping, so that the
clipping bound holds for what is actually averaged: ``rebasin(DifferentialPrivacyServer
SideFixedClipping)(FedAvg(), ..., model=Net())`` aligns, then clips the aligned updates. The
other order, ``DifferentialPrivacyServerSideFixedClipping(rebasin(FedAvg)(...), ...)``, is
wrong: it clips the models as sent and aligns them afterwards. With the ``"largest"`` or
``"merge-many"`` reference that moves the clipped models towards a client's basin, and
their updates grow past the clipping norm, which the noise was sized for (tested). With
``"global"`` the bound survives (permutations keep norms, and matching only raises
``<global, pi(model)>``, so ``||pi(model) - global||`` only shrinks; BatchNorm running
statistics are outside the matching objective and are the exception), but the clipping
then acted on updates inflated by the permutation, not on what the client learnt.

Strategies with server-side state (FedAvgM's momentum, FedAdam's moments) receive models
aligned to the global model they sent, so their pseudo-gradient ``mean - global`` is taken
in the global model's own coordinates, round after round. With the ``"largest"`` or
``"merge-many"`` reference the mean lives in a client's basin instead and the
pseudo-gradient includes a relabelling of units, which mixes coordinate systems in the
server's state: use ``"global"`` with them (a warning says so).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvgM, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt
from torch import nn

from rebasin.permute import Perms, is_finite
from rebasin.spec import PermutationSpec, StateDict
from strategies.align_step import RoundAlignment
from strategies.core import (
    DEFAULT_MAX_NORM_RATIO,
    ClientUpdate,
    NodeId,
    ReBasinOptions,
    Reference,
    RoundReport,
    check_global_model,
    find_setting,
    in_front,
    log_dropped,
    logger,
    resolve_spec,
    weight_problem,
)


class ReBasin:
    """Mixin: re-basin alignment in front of the aggregation of the strategy class after it.

    Parameters
    ----------
    *args, **kwargs
        The strategy's own arguments.
    model, spec, reference, max_iter, seed, device, example_input, max_norm_ratio
        As in :class:`~strategies.rebasin_fedavg.ReBasinFedAvg`.

    Attributes
    ----------
    spec, options, warm_starts, last_round
        As in :class:`~strategies.rebasin_fedavg.ReBasinFedAvg`.

    The reply keys (``weighted_by_key``, ``arrayrecord_key``) and the fewest replies to merge
    (``min_train_nodes``) are the strategy's own, found on it or, for a wrapper such as
    Flower's DP strategies, on the strategy it wraps.
    """

    def __init__(
        self,
        *args: Any,
        model: nn.Module | None = None,
        spec: PermutationSpec | None = None,
        reference: Reference = "global",
        max_iter: int = 100,
        seed: int = 0,
        device: str | None = None,
        example_input: torch.Tensor | None = None,
        max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_rebasin(model, spec, reference, max_iter, seed, device, example_input,
                           max_norm_ratio)  # fmt: skip

    def _init_rebasin(
        self,
        model: nn.Module | None,
        spec: PermutationSpec | None,
        reference: Reference,
        max_iter: int,
        seed: int,
        device: str | None,
        example_input: torch.Tensor | None,
        max_norm_ratio: float,
    ) -> None:
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
        self._global_model: StateDict | None = None
        self._sent: list[Message] = []
        if reference != "global" and _stateful(self):
            logger.warning(
                "Re-Basin reference %r with a strategy that keeps server-side state (%s): "
                "its pseudo-gradient then mixes the units of two basins; use 'global'",
                reference,
                type(self).__name__,
            )

    @property
    def last_perms(self) -> dict[NodeId, Perms]:
        """Node id -> permutations applied to its model in the last round."""
        return self.last_round.perms if self.last_round else {}

    @property
    def last_objective_gains(self) -> dict[NodeId, float]:
        """Node id -> objective gain of matching in the last round."""
        return self.last_round.objective_gains if self.last_round else {}

    def summary(self) -> None:
        """The strategy's summary, then the re-basin settings."""
        super().summary()  # type: ignore[misc]
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
        """The strategy's ``configure_train``, remembering ``arrays`` as this round's global
        model and the messages sent (the grid stamps their ids when it sends them)."""
        self.set_global_arrays(arrays)
        self._sent = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        return self._sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop unusable replies, align the rest, and aggregate them with the strategy's own
        ``aggregate_train``; ``(None, None)`` (keep the model) when too few are valid."""
        global_model = self._round_global_model()
        replies = list(replies)
        logger.info("aggregate_train (round %d): %d replies", server_round, len(replies))
        min_valid = int(self._setting("min_train_nodes", 1))
        round_ = RoundAlignment(
            self.spec,
            global_model,
            [self._to_update(msg) for msg in replies],
            options=self.options,
            warm_starts=self.warm_starts,
            min_valid=min_valid,
            weight_key=self._weight_key,
        )
        report = self.last_round = round_.report
        if len(round_.candidates) < max(min_valid, 1):
            report.too_few(len(round_.candidates), min_valid)
            return None, None
        aligned = {update.node_id: update for update in round_}
        if len(report.valid) < max(min_valid, 1):
            report.too_few(len(report.valid), min_valid)
            return None, None
        self.warm_starts.update(report.perms)
        valid: list[Message] = []
        for msg in replies:
            update = aligned.pop(self._node_of(msg), None)  # the node's first reply only
            if update is not None:
                name, _ = self._array_record(msg.content)
                msg.content[name] = ArrayRecord.from_torch_state_dict(
                    {k: update.state_dict[k] for k in global_model}
                )
                valid.append(msg)
        arrays, metrics = super().aggregate_train(server_round, valid)  # type: ignore[misc]
        if arrays is not None:
            for key, tensor in arrays.to_torch_state_dict().items():
                if tensor.is_floating_point() and not is_finite(tensor):
                    report.keep_previous(f"the aggregated model is not finite in {key!r}")
                    return None, metrics
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The strategy's ``aggregate_evaluate`` on the usable replies (the others dropped,
        each with a log line, where Flower's strategies would stop the ServerApp)."""
        valid = []
        for msg in replies:
            problem = self._metrics_problem(msg)
            if problem is None:
                valid.append(msg)
            else:
                log_dropped(msg.metadata.src_node_id, f"evaluation reply: {problem}")
        logger.info("aggregate_evaluate (round %d): %d valid replies", server_round, len(valid))
        if not valid:
            return None
        return super().aggregate_evaluate(server_round, valid)  # type: ignore[misc]

    # --- Flower records -> the core's ClientUpdate -------------------------------------

    def _round_global_model(self) -> StateDict:
        if self._global_model is None:
            raise RuntimeError(
                "aggregate_train needs the global model of the round: call configure_train "
                "(as Strategy.start does) or set_global_arrays first"
            )
        return self._global_model

    def _setting(self, name: str, default: Any) -> Any:
        return find_setting(self, name, default)

    @property
    def _weight_key(self) -> str:
        return str(self._setting("weighted_by_key", "num-examples"))

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

    def _to_update(self, msg: Message) -> ClientUpdate:
        node_id = self._node_of(msg)
        problem = self._metrics_problem(msg)
        if problem is not None:
            return ClientUpdate(node_id, problem=problem)
        name, problem = self._array_record(msg.content)
        if name is None:
            return ClientUpdate(node_id, problem=problem)
        weight = next(iter(msg.content.metric_records.values()))[self._weight_key]
        return ClientUpdate(
            node_id, weight=weight, load=msg.content.array_records[name].to_torch_state_dict
        )

    def _metrics_problem(self, msg: Message) -> str | None:
        """Why a reply's metrics cannot weight it (FedAvg reads its first MetricRecord)."""
        if msg.has_error():
            return f"error reply (code {msg.error.code}): {msg.error.reason}"
        if not msg.has_content():
            return "empty reply"
        metric_records = msg.content.metric_records
        if not metric_records:
            return f"no MetricRecord (it must hold {self._weight_key!r})"
        first = next(iter(metric_records.values()))
        return weight_problem(first.get(self._weight_key), self._weight_key)

    def _array_record(self, content: RecordDict) -> tuple[str | None, str]:
        """The name of the reply's model: ``arrayrecord_key``, or its only ArrayRecord."""
        key = str(self._setting("arrayrecord_key", "arrays"))
        records = content.array_records
        if key in records:
            return key, ""
        if len(records) == 1:
            return next(iter(records)), ""
        if not records:
            return None, "no ArrayRecord in the reply"
        return None, f"{len(records)} ArrayRecords {sorted(records)} and none named {key!r}"


def rebasin(strategy_class: type[Strategy]) -> type[Strategy]:
    """``strategy_class`` with :class:`ReBasin` in front: takes the class's own arguments and
    re-basin's keyword arguments (``model=``, ``reference=``, ...). Made once per class."""
    return in_front(ReBasin, strategy_class, Strategy, f"ReBasin{strategy_class.__name__}")


def with_rebasin(strategy: Strategy, **options: Any) -> Strategy:
    """A copy of the ``strategy`` instance with :class:`ReBasin` in front (its state is
    shared, not copied); ``options`` are re-basin's keyword arguments (``model=``, ...)."""
    if isinstance(strategy, ReBasin):
        raise TypeError(f"{type(strategy).__name__} has re-basin in front already")
    wrapped = object.__new__(rebasin(type(strategy)))
    wrapped.__dict__.update(vars(strategy))
    # Re-basin's keyword arguments and their defaults, as ReBasin.__init__ declares them.
    defaults = {
        name: p.default
        for name, p in inspect.signature(ReBasin.__init__).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"unknown re-basin options {unknown}; known: {sorted(defaults)}")
    wrapped._init_rebasin(**{**defaults, **options})  # type: ignore[attr-defined]
    return wrapped


def _stateful(strategy: object) -> bool:
    """Whether the strategy (or one it wraps) keeps a server optimiser's state."""
    while strategy is not None:
        if isinstance(strategy, FedOpt | FedAvgM):
            return True
        strategy = vars(strategy).get("strategy")
    return False
