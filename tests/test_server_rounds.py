"""The ServerApp's rounds against the real ClientApp, in one process (no SuperLink).

Checks the run-config -> rounds -> checkpoints path, resuming, nodes that never answer and
the clients' training (independent start, weight decay) exactly and in seconds, through
:class:`server_grid.GridWithDeadNodes`. The same code runs under a real SuperLink in
tests/test_flower_e2e.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from server_grid import NODES, QUICK, UNAVAILABLE, GridWithDeadNodes, quick_config, state_of

from client.app import own_seed
from client.config import NodeDataConfig
from client.data import local_data
from rebasin.data import LabeledData
from rebasin.train import train as train_model
from server.app import METRICS_FILE, run_server
from server.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from server.config import ServerConfig
from server.identity import ModelIdentity

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("serverapp_run")]


def test_every_round_is_checkpointed_and_metrics_are_written(tmp_path: Path) -> None:
    run_config, config = quick_config(tmp_path)
    grid = GridWithDeadNodes(run_config)
    result = run_server(grid, config)

    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        METRICS_FILE,
        "round-0001.safetensors",
        "round-0002.safetensors",
    ]
    final = load_checkpoint(
        ckpt / "round-0002.safetensors", reference=config.build_model().state_dict()
    )
    assert final.round == 2
    assert final.metadata["model"] == "mlp" and final.metadata["width"] == "0.0625"
    for key, tensor in state_of(result.arrays).items():
        assert torch.equal(final.state_dict[key], tensor)

    metrics = json.loads((ckpt / METRICS_FILE).read_text())
    assert sorted(metrics["train-clientapp"]) == ["1", "2"]
    assert sorted(metrics["evaluate-clientapp"]) == ["1", "2"]
    assert sorted(metrics["evaluate-serverapp"]) == ["0", "1", "2"]
    for server_round, record in result.evaluate_metrics_serverapp.items():
        assert metrics["evaluate-serverapp"][str(server_round)] == dict(record)
        assert record["num-examples"] == 100
    # Both nodes trained and evaluated in both rounds, told the right round each time.
    assert sorted(grid.deliveries) == sorted(
        (node, kind, r) for node in NODES for kind in ("train", "evaluate") for r in (1, 2)
    )


def test_resume_continues_from_the_checkpoint(tmp_path: Path) -> None:
    run_config, config = quick_config(tmp_path, **{"num-server-rounds": 1})
    first = run_server(GridWithDeadNodes(run_config), config)

    checkpoint = tmp_path / "ckpt" / "round-0001.safetensors"
    run_config, config = quick_config(
        tmp_path, **{"num-server-rounds": 3, "resume-from": str(checkpoint)}
    )
    grid = GridWithDeadNodes(run_config)
    resumed = run_server(grid, config)

    # Clients are told the true rounds, 2 and 3; nothing is run twice.
    assert sorted({r for _, kind, r in grid.deliveries if kind == "train"}) == [2, 3]
    names = sorted(p.name for p in (tmp_path / "ckpt").glob("*.safetensors"))
    assert names == ["round-0001.safetensors", "round-0002.safetensors", "round-0003.safetensors"]
    # The resumed run starts from exactly the checkpointed model: its evaluation before
    # its first round is the first run's evaluation after round 1.
    assert dict(resumed.evaluate_metrics_serverapp[0]) == dict(first.evaluate_metrics_serverapp[1])
    metrics = json.loads((tmp_path / "ckpt" / METRICS_FILE).read_text())
    assert sorted(metrics["evaluate-serverapp"]) == ["0", "1", "2", "3"]
    assert sorted(metrics["train-clientapp"]) == ["1", "2", "3"]


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path: Path) -> None:
    other = ServerConfig.from_mapping({**QUICK, "width": 0.125}).build_model().state_dict()
    path = save_checkpoint(tmp_path, 1, other, ModelIdentity("mlp", "mnist", 0.125, "batch"))
    run_config, config = quick_config(tmp_path, **{"resume-from": str(path)})
    grid = GridWithDeadNodes(run_config)
    with pytest.raises(CheckpointError) as info:
        run_server(grid, config)
    assert str(info.value) == (
        f"checkpoint {path} was written for width='0.125', but this run has width='0.0625'"
    )
    assert grid.deliveries == []


def test_resume_refuses_a_finished_run(tmp_path: Path) -> None:
    run_config, config = quick_config(tmp_path)
    model = config.build_model()
    identity = ModelIdentity("mlp", "mnist", 0.0625, "batch")
    path = save_checkpoint(tmp_path, 2, model.state_dict(), identity)
    run_config, config = quick_config(tmp_path, **{"resume-from": str(path)})
    with pytest.raises(CheckpointError) as info:
        run_server(GridWithDeadNodes(run_config), config)
    assert str(info.value) == (
        f"checkpoint {path} is of round 2, but 'num-server-rounds' = 2: no rounds left to run"
    )


def test_a_dead_node_is_named_and_the_run_finishes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = NODES[1]
    run_config, config = quick_config(tmp_path, **{"round-timeout": 5.0})
    caplog.set_level(logging.INFO)
    result = run_server(GridWithDeadNodes(run_config, dead=[dead]), config)

    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert (tmp_path / "ckpt" / "round-0002.safetensors").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for server_round in (1, 2):
        for phase in ("train", "evaluate"):
            assert (
                f"round {server_round} {phase}: no reply from node {dead} within the round "
                "timeout (5 s); left out of this round"
            ) in warnings


def test_a_node_the_superlink_reports_unavailable_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gone = NODES[0]
    run_config, config = quick_config(tmp_path, **{"num-server-rounds": 1})
    caplog.set_level(logging.INFO)
    result = run_server(GridWithDeadNodes(run_config, unavailable=[gone]), config)

    assert sorted(result.train_metrics_clientapp) == [1]
    ours = [
        r.getMessage()
        for r in caplog.records
        if r.name == "flwr.rebasin.server.rounds" and r.levelno == logging.WARNING
    ]
    # The error reply comes from the SuperLink (node 1), yet the node it is about is named.
    assert ours == [
        f"round 1 train: node {gone} failed: {UNAVAILABLE}",
        f"round 1 evaluate: node {gone} failed: {UNAVAILABLE}",
    ]


def test_all_nodes_dead_keeps_the_previous_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_config, config = quick_config(tmp_path, **{"num-server-rounds": 1, "eval-on-server": False})
    caplog.set_level(logging.INFO)
    result = run_server(GridWithDeadNodes(run_config, dead=NODES), config)
    initial = config.build_model().state_dict()
    kept = load_checkpoint(tmp_path / "ckpt" / "round-0001.safetensors").state_dict
    assert all(torch.equal(kept[k], v) for k, v in initial.items())
    assert all(torch.equal(v, initial[k]) for k, v in state_of(result.arrays).items())
    assert "round 1: no new global model; keeping the previous one" in caplog.messages


@pytest.mark.parametrize("independent", [True, False])
def test_independent_start_trains_round_one_from_each_nodes_own_seed(
    tmp_path: Path, independent: bool
) -> None:
    run_config, config = quick_config(
        tmp_path,
        **{"num-server-rounds": 1, "independent-start": independent, "fraction-evaluate": 0.0},
    )
    grid = GridWithDeadNodes(run_config)
    run_server(grid, config)

    for i, node_id in enumerate(NODES):
        node = NodeDataConfig.from_mapping({"partition-id": i, "num-partitions": 2})
        seed = own_seed(config, node, node_id) if independent else None
        expected = config.build_model(seed=seed)  # None: the run seed, i.e. the global model
        data = local_data(config, node, train=True)
        loader = data.loader(config.batch_size, shuffle=True, seed=config.seed + 1)
        train_model(expected, loader, config.local_epochs, config.learning_rate)
        (reply,) = [r for r in grid.replies if r.metadata.src_node_id == node_id]
        got = state_of(reply.content.array_records["arrays"])
        assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
    assert (
        own_seed(config, NodeDataConfig.from_mapping({"partition-id": 1, "num-partitions": 2}), 0)
        == 2
    )
    assert own_seed(config, NodeDataConfig.from_mapping({"seed": 77}), 5) == 77


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_clients_train_with_the_run_configs_weight_decay(
    tmp_path: Path, weight_decay: float
) -> None:
    run_config, config = quick_config(
        tmp_path,
        **{
            "num-server-rounds": 1,
            "weight-decay": weight_decay,
            "fraction-evaluate": 0.0,
            "eval-on-server": False,
        },
    )
    grid = GridWithDeadNodes(run_config)
    run_server(grid, config)

    def trained(data: LabeledData, **decay: float) -> dict[str, torch.Tensor]:
        model = config.build_model()
        loader = data.loader(config.batch_size, shuffle=True, seed=config.seed + 1)
        train_model(model, loader, config.local_epochs, config.learning_rate, **decay)
        return model.state_dict()

    for i, node_id in enumerate(NODES):
        node = NodeDataConfig.from_mapping({"partition-id": i, "num-partitions": 2})
        data = local_data(config, node, train=True)
        (reply,) = [r for r in grid.replies if r.metadata.src_node_id == node_id]
        got = state_of(reply.content.array_records["arrays"])
        plain = trained(data)  # train() as called before weight-decay existed
        if weight_decay == 0.0:
            assert all(torch.equal(got[k], v) for k, v in plain.items())
        else:
            expected = trained(data, weight_decay=weight_decay)
            assert all(torch.equal(got[k], v) for k, v in expected.items())
            assert not all(torch.equal(got[k], v) for k, v in plain.items())


def test_weight_decay_reaches_the_optimiser() -> None:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    batches = [(x, y)]

    def one_step(**decay: float) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        train_model(model, batches, epochs=1, lr=0.1, **decay)
        return model.weight.detach().clone()

    torch.manual_seed(0)
    start = torch.nn.Linear(4, 3).weight.detach().clone()
    plain, zero, decayed = one_step(), one_step(weight_decay=0.0), one_step(weight_decay=0.5)
    assert torch.equal(plain, zero)
    # SGD's first step: w - lr * (grad + wd * w), so the two runs differ by lr * wd * w.
    torch.testing.assert_close(decayed, plain - 0.1 * 0.5 * start)
