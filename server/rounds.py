"""The ServerApp's per-round duties around any Message-API strategy.

:class:`ServerRounds` wraps a strategy (ReBasinFedAvg or Flower's FedAvg) and is itself a
``Strategy``, so Flower's own ``Strategy.start`` loop drives it. Around the wrapped
strategy's steps it

* numbers rounds from ``round_offset + 1`` (a resumed run continues its numbering, and
  clients see the true ``server-round``);
* names every node that was sent work but failed it: an error reply (also the one the
  SuperLink sends for a node whose heartbeat stopped) or no reply within the round timeout
  (Flower's FedAvg only counts the replies it got);
* after each merge, runs the ``after_merge`` hook (BatchNorm recalibration) and then the
  ``on_round_end`` hook (checkpointing) with the round's final global model, also when the
  round kept the previous model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

logger = logging.getLogger("flwr.rebasin." + __name__)

AfterMerge = Callable[[int, ArrayRecord, list[int]], ArrayRecord]
RoundEnd = Callable[[int, ArrayRecord], None]


class ServerRounds(Strategy):
    """Runs ``strategy``'s rounds with round numbering, missing-reply logging and hooks.

    Parameters
    ----------
    strategy
        The wrapped Message-API strategy.
    round_timeout
        The timeout given to ``start`` (only used in log lines).
    round_offset
        Rounds already done before this run (a resumed run's checkpoint round).
    after_merge
        ``(round, merged arrays, node ids that replied) -> arrays``; runs only when the
        strategy produced a new model.
    on_round_end
        ``(round, global arrays)``; runs after every training round.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        round_timeout: float,
        round_offset: int = 0,
        after_merge: AfterMerge | None = None,
        on_round_end: RoundEnd | None = None,
    ) -> None:
        if round_offset < 0:
            raise ValueError(f"round_offset must be >= 0, got {round_offset}")
        self.strategy = strategy
        self.round_timeout = round_timeout
        self.round_offset = round_offset
        self.after_merge = after_merge
        self.on_round_end = on_round_end
        self._global: ArrayRecord | None = None
        self._sent: dict[str, list[Message]] = {"train": [], "evaluate": []}

    def summary(self) -> None:
        """Log the wrapped strategy's summary under its own name."""
        logger.info("\t├──> Wrapped strategy: %s", type(self.strategy).__name__)
        if self.round_offset:
            logger.info("\t├──> Resumed after round %d", self.round_offset)
        self.strategy.summary()

    def _record_sent(self, phase: str, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        self._sent[phase] = messages
        return messages

    def _report_failures(self, phase: str, server_round: int, replies: list[Message]) -> None:
        """Name every node whose work this phase failed: an error reply, or no reply at all.

        A reply is matched to the node it answers through its ``reply_to_message_id`` (the
        grid stamps message ids on the messages it sends): error replies that the SuperLink
        makes for a node that stopped sending heartbeats come from the SuperLink itself, not
        from that node.
        """
        node_of_message = {
            m.metadata.message_id: m.metadata.dst_node_id
            for m in self._sent[phase]
            if m.metadata.message_id
        }
        answered = set()
        for reply in replies:
            node_id = node_of_message.get(
                reply.metadata.reply_to_message_id, reply.metadata.src_node_id
            )
            answered.add(node_id)
            if reply.has_error():
                logger.warning(
                    "round %d %s: node %d failed: %s",
                    server_round, phase, node_id, reply.error.reason,
                )  # fmt: skip
        for node_id in sorted({m.metadata.dst_node_id for m in self._sent[phase]} - answered):
            logger.warning(
                "round %d %s: no reply from node %d within the round timeout (%.0f s); "
                "left out of this round",
                server_round, phase, node_id, self.round_timeout,
            )  # fmt: skip

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's training messages for the (offset) round."""
        self._global = arrays
        messages = self.strategy.configure_train(
            server_round + self.round_offset, arrays, config, grid
        )
        return self._record_sent("train", messages)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Merge with the wrapped strategy, then run the hooks on the round's global model."""
        round_number = server_round + self.round_offset
        replies = list(replies)
        self._report_failures("train", round_number, replies)
        arrays, metrics = self.strategy.aggregate_train(round_number, replies)
        if arrays is None or arrays is self._global:
            logger.warning("round %d: no new global model; keeping the previous one", round_number)
        elif self.after_merge is not None:
            trained = sorted(r.metadata.src_node_id for r in replies if not r.has_error())
            arrays = self.after_merge(round_number, arrays, trained)
        final = arrays if arrays is not None else self._global
        if self.on_round_end is not None and final is not None:
            self.on_round_end(round_number, final)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's evaluation messages for the (offset) round."""
        messages = self.strategy.configure_evaluate(
            server_round + self.round_offset, arrays, config, grid
        )
        return self._record_sent("evaluate", messages)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The wrapped strategy's aggregate of the evaluation metrics."""
        round_number = server_round + self.round_offset
        replies = list(replies)
        self._report_failures("evaluate", round_number, replies)
        return self.strategy.aggregate_evaluate(round_number, replies)
