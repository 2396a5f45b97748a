"""The ServerApp against the real ClientApp in one process: a grid whose nodes can fail.

``simulations.local_grid.LocalGrid`` hands every message to ``client.app.app``;
:class:`GridWithDeadNodes` adds nodes that never answer or that the SuperLink reports
unavailable, and records what was delivered and replied. Used by tests/test_server_*.py,
which run under the ``serverapp_run`` fixture (tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Error, Message
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from client.app import app as client_app
from server.config import ServerConfig
from simulations.local_grid import FIRST_NODE_ID, LocalGrid

NODES = (FIRST_NODE_ID, FIRST_NODE_ID + 1)
UNAVAILABLE = "Error: Node Unavailable (heartbeat overdue)"
QUICK = {
    "num-server-rounds": 2,
    "width": 0.0625,
    "max-examples": 64,
    "server-eval-examples": 100,
    "min-train-nodes": 1,
    "min-evaluate-nodes": 1,
}


class GridWithDeadNodes(LocalGrid):
    """A LocalGrid with failing nodes; deliveries and replies are recorded.

    ``dead`` nodes never answer (their messages time out). For ``unavailable`` nodes the
    grid answers as the SuperLink does once a node's heartbeat is overdue: an error reply
    *from the SuperLink* (node id 1) that refers to the message by its id.
    """

    def __init__(
        self,
        run_config: dict,
        num_nodes: int = 2,
        dead: Iterable[int] = (),
        unavailable: Iterable[int] = (),
    ) -> None:
        super().__init__(client_app, num_nodes, run_config)
        self.dead, self.unavailable = set(dead), set(unavailable)
        self.deliveries: list[tuple[int, str, int | None]] = []
        self.replies: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for message in messages:
            config = message.content.config_records.get("config")
            server_round = config.get("server-round") if config is not None else None
            node_id = message.metadata.dst_node_id
            self.deliveries.append((node_id, message.metadata.message_type, server_round))
        live = [m for m in messages if m.metadata.dst_node_id not in self.dead | self.unavailable]
        replies = list(super().send_and_receive(live, timeout=timeout))
        for message in messages:
            if message.metadata.dst_node_id in self.unavailable:
                message.metadata.__dict__["_message_id"] = f"id-{len(self.deliveries)}"
                reply = Message(Error(ErrorCode.NODE_UNAVAILABLE, UNAVAILABLE), reply_to=message)
                reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                replies.append(reply)
        self.replies.extend(replies)
        return replies


def quick_config(tmp_path: Path, **overrides) -> tuple[dict, ServerConfig]:
    """The run-config of a quick MLP run checkpointing to ``tmp_path/ckpt``, and its config."""
    run_config = {**QUICK, "checkpoint-dir": str(tmp_path / "ckpt"), **overrides}
    return run_config, ServerConfig.from_mapping(run_config)


def state_of(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """The state dict held by ``arrays``."""
    return dict(arrays.to_torch_state_dict())
