"""The in-process Grid of the simulations: copies in and out, exceptions as error replies."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from simulations.local_grid import FIRST_NODE_ID, LocalGrid, server_identity


def _echo_app() -> ClientApp:
    """A ClientApp that returns its partition id and changes the received arrays in place."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"]
        weights = arrays.to_torch_state_dict()["w"]
        if context.node_config["partition-id"] == 1:
            raise RuntimeError("disk full")
        msg.content.array_records["arrays"] = ArrayRecord({"w": weights + 1})  # must not leak
        metrics = MetricRecord(
            {"partition": context.node_config["partition-id"], "num-examples": 1}
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def test_local_grid_delivers_copies_and_turns_exceptions_into_error_replies() -> None:
    grid = LocalGrid(_echo_app(), 3, {"k": 1}, run_id=7, node_config={"data-dir": "/d"})
    assert list(grid.get_node_ids()) == [FIRST_NODE_ID, FIRST_NODE_ID + 1, FIRST_NODE_ID + 2]
    assert grid.contexts[FIRST_NODE_ID + 2].node_config == {
        "partition-id": 2,
        "num-partitions": 3,
        "data-dir": "/d",
    }
    record = ArrayRecord({"w": torch.zeros(2)})
    with server_identity(grid.run.run_id):
        messages = [
            Message(
                RecordDict({"arrays": record, "config": ConfigRecord({"server-round": 1})}),
                node,
                "train",
            )
            for node in grid.get_node_ids()
        ]
        replies = list(grid.send_and_receive(messages))
    assert [r.metadata.src_node_id for r in replies] == list(grid.get_node_ids())
    ok = [r for r in replies if not r.has_error()]
    assert [int(r.content["metrics"]["partition"]) for r in ok] == [0, 2]
    failed = [r for r in replies if r.has_error()]
    assert len(failed) == 1
    assert failed[0].error.code == 2  # Flower's CLIENT_APP_RAISED_EXCEPTION
    assert failed[0].error.reason == "<class 'RuntimeError'>:<'disk full'>"
    assert torch.equal(record.to_torch_state_dict()["w"], torch.zeros(2))  # server copy intact
    assert all(
        r.metadata.reply_to_message_id == m.metadata.message_id for r, m in zip(replies, messages)
    )
    assert list(grid.pull_messages([m.metadata.message_id for m in messages])) == []
    with pytest.raises(ValueError, match="message for unknown node 5"):
        with server_identity(7):
            grid.push_messages([Message(RecordDict(), 5, "train")])
