"""An in-process Flower ``Grid``: the project's ServerApp logic talks to its ClientApp directly.

Flower 1.42's simulation runtime (``flwr run`` with the local SuperLink, or the deprecated
``flwr.simulation.run_simulation``) runs every ClientApp in a Ray actor. On a small CPU machine
Ray's start alone takes tens of seconds, and ``run_simulation`` cannot pass a run-config, so
the experiments here deliver the messages themselves: :class:`LocalGrid` implements Flower's
``Grid`` interface and hands every message to the real ``ClientApp`` object (``client.app``)
in this process, one node after the other, with the node's own ``Context``
(``partition-id``/``num-partitions`` node-config, the run-config, a persistent state).

What stays as in a Flower deployment: the strategies (Flower's ``FedAvg`` and
``ReBasinFedAvg``), the ServerApp's round loop (``server.app.run_server``), the ClientApp's
train / evaluate / query functions, and the messages themselves: each message and each reply
is deep-copied on the way, so neither side can see the other's objects, and an exception in a
ClientApp becomes an error reply with Flower's error code, as the SuperNode runtime sends it.
What differs: no network, no TTL expiry, and replies come back in sending order.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

logger = logging.getLogger(__name__)

# Node ids of the simulated SuperNodes: partition i is node FIRST_NODE_ID + i. Real node ids are
# random; fixed ones make runs reproducible (ReBasinFedAvg keys its warm starts by node id).
FIRST_NODE_ID = 1001

ReplyCallback = Callable[[Message], None]


class LocalGrid(Grid):
    """A ``Grid`` whose nodes are ClientApp calls in this process.

    Parameters
    ----------
    client_app
        The ClientApp every node runs.
    num_nodes
        Number of simulated SuperNodes; node ``i`` gets the node-config
        ``{"partition-id": i, "num-partitions": num_nodes}`` plus ``node_config``.
    run_config
        The run-config every node's context carries (kebab-case keys, as in pyproject).
    run_id
        The run's id (stamped on every message).
    node_config
        Extra node-config entries shared by all nodes (for example ``data-dir``).
    on_reply
        Called with every reply (for progress bars).
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: Mapping[str, Any],
        *,
        run_id: int = 1,
        node_config: Mapping[str, Any] | None = None,
        on_reply: ReplyCallback | None = None,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.client_app = client_app
        self.on_reply = on_reply
        self._run = Run.create_empty(run_id=run_id)
        self._run.override_config = dict(run_config)
        self.contexts: dict[int, Context] = {
            FIRST_NODE_ID + i: Context(
                run_id=run_id,
                node_id=FIRST_NODE_ID + i,
                node_config={
                    "partition-id": i,
                    "num-partitions": num_nodes,
                    **dict(node_config or {}),
                },
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}

    # -- Grid interface -----------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        """Replace the run this grid serves (its id is stamped on the nodes' contexts)."""
        if not isinstance(run, Run):
            raise TypeError(f"run must be a flwr Run, got {type(run).__name__}")
        self._run = run
        for context in self.contexts.values():
            context.run_id = run.run_id

    @property
    def run(self) -> Run:
        """The run this grid serves."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """An instruction message (the deprecated factory, kept for the interface)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Ids of the simulated nodes, all always connected."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver every message to its node's ClientApp now; return the message ids.

        Raises
        ------
        ValueError
            If a message is addressed to an unknown node or is itself a reply.
        """
        ids = []
        for message in messages:
            metadata = message.metadata
            if metadata.dst_node_id not in self.contexts:
                raise ValueError(
                    f"message for unknown node {metadata.dst_node_id}; nodes are "
                    f"{sorted(self.contexts)}"
                )
            if metadata.reply_to_message_id:
                raise ValueError("the ServerApp may only send instruction messages, not replies")
            metadata.__dict__["_message_id"] = str(uuid4())
            metadata.__dict__["_run_id"] = self._run.run_id
            reply = self._deliver(copy.deepcopy(message))
            self._replies[metadata.message_id] = reply
            ids.append(metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` that have not been pulled yet."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver ``messages`` and return every reply (``timeout`` cannot expire here)."""
        return list(self.pull_messages(self.push_messages(messages)))

    # -- delivery -----------------------------------------------------------------------------

    def _deliver(self, message: Message) -> Message:
        """Run the node's ClientApp on ``message``; an exception becomes an error reply."""
        context = self.contexts[message.metadata.dst_node_id]
        try:
            reply = self.client_app(message, context)
        except Exception as exc:  # noqa: BLE001 - a failing node must not stop the server
            logger.warning(
                "node %d raised in %s: %s",
                message.metadata.dst_node_id,
                message.metadata.message_type,
                exc,
                exc_info=logger.isEnabledFor(logging.DEBUG),
            )
            # The SuperNode runtime's error reply: code 2 and "<class>:<'message'>".
            reason = f"{type(exc)}:<'{exc}'>"
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)
        reply = copy.deepcopy(reply)
        if self.on_reply is not None:
            self.on_reply(reply)
        return reply


@contextlib.contextmanager
def server_identity(run_id: int) -> Iterator[None]:
    """Act as the SuperLink side of run ``run_id`` while the block runs.

    Flower stamps new messages with the process's ``TaskIdentity`` (run, node, task); a
    ServerApp process gets it from the runtime. The previous identity is restored afterwards.
    """
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
