"""Two users' apps switched to re-basin by two lines each (plus the import): their
own hooks keep working, and the client models are aligned before their aggregation."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from plugin_apps.custom_fedavg import CustomFedAvg
from plugin_apps.dp_server import make_strategy
from strategy_messages import (
    _assert_close,
    _FakeGrid,
    _mlp,
    _permuted,
    _reply,
    _sd,
    _serverapp_identity,  # noqa: F401 (autouse fixture)
    _tensors,
)

APPS = Path(__file__).parent / "plugin_apps"


def _changed_lines(name: str) -> list[str]:
    return [line for line in (APPS / name).read_text().splitlines() if "# re-basin:" in line]


def test_each_app_changes_at_most_two_lines_besides_the_import() -> None:
    # The subclass: its class line (and `model=` where it is constructed, below).
    assert len(_changed_lines("custom_fedavg.py")) == 1
    assert len(_changed_lines("dp_server.py")) == 2


def test_a_fedavg_subclass_keeps_its_hooks_and_merges_aligned_models(tmp_path: Path) -> None:
    original = _sd(_mlp(1))
    seen_lr: dict[int, float] = {}

    def client(node_id: int, message: Message) -> Message:
        if message.metadata.message_type == MessageType.EVALUATE:
            metrics = MetricRecord({"num-examples": 5, "accuracy": 0.5 + 0.01 * node_id})
            return Message(RecordDict({"metrics": metrics}), reply_to=message)
        seen_lr[int(message.content["config"]["server-round"])] = float(
            message.content["config"]["lr"]
        )
        # Each node "trains" into its own basin: a permuted copy of the original.
        return _reply(node_id, _permuted(original, seed=node_id), 10 * node_id)

    results = tmp_path / "results.json"
    strategy = CustomFedAvg(model=_mlp(0), device="cpu", results_path=results,
                            min_available_nodes=3, min_train_nodes=3)  # fmt: skip
    random.seed(0)
    result = strategy.start(
        grid=_FakeGrid([1, 2, 3], client),  # type: ignore[arg-type]
        initial_arrays=ArrayRecord(original),
        num_rounds=3,
        train_config=ConfigRecord({"lr": 0.1}),
    )
    assert seen_lr == {1: 0.1, 2: 0.05, 3: 0.05}  # the user's schedule
    assert [r["round"] for r in json.loads(results.read_text())] == [1, 2, 3]  # their start
    assert strategy.best_round == 1
    _assert_close(_tensors(result.arrays), original)  # aligned: the permutations undone
    assert sorted(strategy.last_round.valid) == [1, 2, 3]


def test_a_dp_server_clips_the_aligned_updates() -> None:
    global_sd = _sd(_mlp(1))
    torch.manual_seed(0)
    trained = {k: v + 0.05 * torch.randn_like(v) for k, v in global_sd.items()}
    norm = float(sum(((trained[k] - global_sd[k]) ** 2).sum() for k in global_sd)) ** 0.5
    strategy = make_strategy(_mlp(0), num_nodes=3, clipping_norm=2 * norm, noise=0.0)

    def client(node_id: int, message: Message) -> Message:
        return _reply(node_id, _permuted(trained, seed=node_id), 10)

    grid = _FakeGrid([1, 2, 3], client)
    random.seed(0)
    sent = list(strategy.configure_train(1, ArrayRecord(global_sd), ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(1, grid.send_and_receive(sent, timeout=10))
    # Aligned, each update is the trained one, within the bound: nothing was clipped, and
    # the mean of the three aligned copies is the trained model.
    _assert_close(_tensors(arrays), trained, atol=1e-6)
