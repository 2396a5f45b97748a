"""The ServerApp's round logic against the real ClientApp, in one process (no SuperLink).

``simulations.local_grid.LocalGrid`` hands every message to ``client.app.app``; so this checks
the run-config -> rounds -> checkpoints path, resuming, nodes that never answer, the
independent start and the BatchNorm recalibration exactly and in seconds. The same code runs
under a real SuperLink in tests/test_flower_e2e.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

import client.app as client_app_module
import server.app as server_app_module
from client.app import app as client_app
from client.app import own_seed
from client.config import NodeDataConfig
from client.data import local_data
from rebasin.data import LabeledData, load_dataset
from rebasin.norm import batchnorm_stats, combine_batchnorm_stats
from rebasin.partition import region_split
from rebasin.spec import is_running_stat
from rebasin.train import train as train_model
from server.app import METRICS_FILE, run_server, server_evaluation
from server.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from server.config import ServerConfig
from server.identity import ModelIdentity
from server.recalibration import batchnorm_layer_sizes, recalibrate_batchnorm
from simulations.local_grid import FIRST_NODE_ID, LocalGrid, server_identity
from strategies.bn_query import QUERY_MESSAGE_TYPE, stats_from_record, stats_to_record
from strategies.run_config import RunConfigError, TrainingConfig

pytestmark = pytest.mark.timeout(120)

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


@pytest.fixture(autouse=True)
def _serverapp_identity() -> Iterator[None]:
    """Messages are stamped with the running ServerApp's run; act as one."""
    with server_identity(run_id=1):
        yield


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


def _config(tmp_path: Path, **overrides) -> tuple[dict, ServerConfig]:
    run_config = {**QUICK, "checkpoint-dir": str(tmp_path / "ckpt"), **overrides}
    return run_config, ServerConfig.from_mapping(run_config)


def _state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(arrays.to_torch_state_dict())


def test_every_round_is_checkpointed_and_metrics_are_written(tmp_path: Path) -> None:
    run_config, config = _config(tmp_path)
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
    for key, tensor in _state(result.arrays).items():
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
    run_config, config = _config(tmp_path, **{"num-server-rounds": 1})
    first = run_server(GridWithDeadNodes(run_config), config)

    checkpoint = tmp_path / "ckpt" / "round-0001.safetensors"
    run_config, config = _config(
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
    run_config, config = _config(tmp_path, **{"resume-from": str(path)})
    grid = GridWithDeadNodes(run_config)
    with pytest.raises(CheckpointError) as info:
        run_server(grid, config)
    assert str(info.value) == (
        f"checkpoint {path} was written for width='0.125', but this run has width='0.0625'"
    )
    assert grid.deliveries == []


def test_resume_refuses_a_finished_run(tmp_path: Path) -> None:
    run_config, config = _config(tmp_path)
    model = config.build_model()
    identity = ModelIdentity("mlp", "mnist", 0.0625, "batch")
    path = save_checkpoint(tmp_path, 2, model.state_dict(), identity)
    run_config, config = _config(tmp_path, **{"resume-from": str(path)})
    with pytest.raises(CheckpointError) as info:
        run_server(GridWithDeadNodes(run_config), config)
    assert str(info.value) == (
        f"checkpoint {path} is of round 2, but 'num-server-rounds' = 2: no rounds left to run"
    )


def test_a_dead_node_is_named_and_the_run_finishes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = NODES[1]
    run_config, config = _config(tmp_path, **{"round-timeout": 5.0})
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
    run_config, config = _config(tmp_path, **{"num-server-rounds": 1})
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
    run_config, config = _config(tmp_path, **{"num-server-rounds": 1, "eval-on-server": False})
    caplog.set_level(logging.INFO)
    result = run_server(GridWithDeadNodes(run_config, dead=NODES), config)
    initial = config.build_model().state_dict()
    kept = load_checkpoint(tmp_path / "ckpt" / "round-0001.safetensors").state_dict
    assert all(torch.equal(kept[k], v) for k, v in initial.items())
    assert all(torch.equal(v, initial[k]) for k, v in _state(result.arrays).items())
    assert "round 1: no new global model; keeping the previous one" in caplog.messages


@pytest.mark.parametrize("independent", [True, False])
def test_independent_start_trains_round_one_from_each_nodes_own_seed(
    tmp_path: Path, independent: bool
) -> None:
    run_config, config = _config(
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
        got = _state(reply.content.array_records["arrays"])
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
    run_config, config = _config(
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
        got = _state(reply.content.array_records["arrays"])
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


# --- server-side evaluation data -----------------------------------------------------------


def test_server_evaluation_reads_server_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("REBASIN_DATA_DIR", str(elsewhere))
    used: list[object] = []
    real_load = server_app_module.load_dataset

    def load_dataset_spy(*args, **kwargs):
        used.append(kwargs.get("data_dir"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(server_app_module, "load_dataset", load_dataset_spy)
    _, config = _config(tmp_path, **{"server-data-dir": str(data_dir)})
    arrays = ArrayRecord(config.build_model().state_dict())
    metrics = server_evaluation(config, round_offset=0)(1, arrays)
    assert metrics["num-examples"] == 100
    assert used == [data_dir]

    # Relative to the ServerApp's working directory.
    monkeypatch.chdir(data_dir.parent)
    _, config = _config(tmp_path, **{"server-data-dir": data_dir.name})
    assert server_evaluation(config, round_offset=0)(1, arrays)["num-examples"] == 100
    assert used[-1] == Path(data_dir.name)

    # Without the key: $REBASIN_DATA_DIR, as before (here a directory without the data).
    _, config = _config(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"MNIST not found in data directory {elsewhere}"):
        server_evaluation(config, round_offset=0)
    assert used[-1] == elsewhere


# --- BatchNorm recalibration --------------------------------------------------------------


def _synthetic_cifar(config, node: NodeDataConfig, train: bool) -> LabeledData:
    """Stand-in for a node's CIFAR-10 part: seeded noise, a different offset per node."""
    generator = torch.Generator().manual_seed(100 * node.partition_id + int(train))
    images = torch.randn(40, 3, 32, 32, generator=generator) + node.partition_id
    labels = torch.randint(0, 10, (40,), generator=generator)
    return LabeledData(images, labels, [str(c) for c in range(10)])


BN_RUN = {
    "model": "vgg",
    "dataset": "cifar10",
    "width": 0.0625,
    "batch-size": 16,
    "num-server-rounds": 1,
    "eval-on-server": False,
    "fraction-evaluate": 0.0,
}


def test_bn_recalibration_pools_the_clients_statistics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_app_module, "local_data", _synthetic_cifar)
    run_config, config = _config(tmp_path / "a", **BN_RUN, **{"bn-recalibration": True})
    grid = GridWithDeadNodes(run_config)
    run_server(grid, config)
    plain_config_items = _config(tmp_path / "b", **BN_RUN)
    run_server(GridWithDeadNodes(plain_config_items[0]), plain_config_items[1])

    assert [(n, kind) for n, kind, _ in grid.deliveries if kind.startswith("query")] == [
        (node, QUERY_MESSAGE_TYPE) for node in NODES
    ]
    recalibrated = load_checkpoint(tmp_path / "a" / "ckpt" / "round-0001.safetensors").state_dict
    merged = load_checkpoint(tmp_path / "b" / "ckpt" / "round-0001.safetensors").state_dict
    # Recalibration changes the running statistics only.
    for key, tensor in merged.items():
        if is_running_stat(key):
            if not key.endswith("num_batches_tracked"):
                assert not torch.equal(recalibrated[key], tensor), key
        else:
            assert torch.equal(recalibrated[key], tensor), key
    # ... to the clients' moments of the merged model, pooled by examples.
    model = config.build_model()
    model.load_state_dict(merged)
    stats = []
    for i in range(2):
        node = NodeDataConfig.from_mapping({"partition-id": i, "num-partitions": 2})
        loader = _synthetic_cifar(config, node, train=True).loader(config.batch_size)
        stats.append(batchnorm_stats(model, loader))
    for layer, (mean, var) in combine_batchnorm_stats(stats).items():
        assert torch.equal(recalibrated[f"{layer}.running_mean"], mean)
        assert torch.equal(recalibrated[f"{layer}.running_var"], var)


def test_bad_bn_replies_are_dropped_with_the_node_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = ServerConfig.from_mapping({**BN_RUN, "bn-recalibration": True})
    model = config.build_model()
    arrays = ArrayRecord(model.state_dict())
    sizes = batchnorm_layer_sizes(model)
    good_stats = batchnorm_stats(model, [torch.randn(8, 3, 32, 32)])

    def answers(message: Message, context) -> Message:
        node = message.metadata.dst_node_id
        if node == FIRST_NODE_ID:  # drops a layer
            content = stats_to_record(good_stats)
            arrays_record = content.array_records["bn-stats"]
            del arrays_record["norms.0.running_var"]
            return Message(content, reply_to=message)
        if node == FIRST_NODE_ID + 1:
            raise RuntimeError("out of memory")
        return Message(stats_to_record(good_stats), reply_to=message)

    grid = LocalGrid(answers, 3, {})
    caplog.set_level(logging.INFO)
    out = recalibrate_batchnorm(grid, arrays, config.build_model(), grid.get_node_ids(), 4, 30.0)
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "flwr.rebasin.server.recalibration"
    ]
    assert warnings[0] == (
        f"round 4 BatchNorm query: dropped the reply of node {FIRST_NODE_ID}: BatchNorm "
        "statistics: missing ['norms.0.running_var'], unexpected []"
    )
    assert warnings[1].startswith(f"round 4 BatchNorm query: node {FIRST_NODE_ID + 1} failed: ")
    assert "out of memory" in warnings[1]
    state = _state(out)
    for layer, (mean, var) in good_stats.moments.items():
        assert torch.equal(state[f"{layer}.running_mean"], mean)
        assert torch.equal(state[f"{layer}.running_var"], var)
    assert sizes["norms.0"] == 4


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda c: c.metric_records.pop("metrics"), "reply has no MetricRecord 'metrics'"),
        (lambda c: c.array_records.pop("bn-stats"), "reply has no ArrayRecord 'bn-stats'"),
        (
            lambda c: c.__setitem__("metrics", MetricRecord({"num-examples": 0})),
            "'num-examples' must be a positive integer, got 0",
        ),
        (
            lambda c: c.array_records["bn-stats"].__setitem__(
                "norms.1.running_mean",
                ArrayRecord({"x": torch.zeros(3)})["x"],
            ),
            "'norms.1.running_mean' must be a float tensor of shape (8,), got torch.float32 (3,)",
        ),
        (
            lambda c: c.array_records["bn-stats"].__setitem__(
                "norms.1.running_var",
                ArrayRecord({"x": torch.full((8,), float("inf"))})["x"],
            ),
            "'norms.1.running_var' has non-finite values",
        ),
        (
            lambda c: c.array_records["bn-stats"].__setitem__(
                "norms.1.running_var",
                ArrayRecord({"x": -torch.ones(8)})["x"],
            ),
            "'norms.1.running_var' has negative variances",
        ),
    ],
)
def test_bn_reply_checks(break_it, message: str) -> None:
    model = ServerConfig.from_mapping(BN_RUN).build_model()
    stats = batchnorm_stats(model, [torch.randn(4, 3, 32, 32)])
    content: RecordDict = stats_to_record(stats)
    back = stats_from_record(content, batchnorm_layer_sizes(model))
    assert back.count == 4
    for layer, (mean, var) in stats.moments.items():
        assert torch.equal(back.moments[layer][0], mean)
        assert torch.equal(back.moments[layer][1], var)
    break_it(content)
    with pytest.raises(ValueError) as info:
        stats_from_record(content, batchnorm_layer_sizes(model))
    assert str(info.value) == message


def test_synthetic_data_differs_between_nodes() -> None:
    # Guards the BN test above: identical client data would make pooling trivially exact.
    a = _synthetic_cifar(
        None, NodeDataConfig.from_mapping({"partition-id": 0, "num-partitions": 2}), True
    )
    b = _synthetic_cifar(
        None, NodeDataConfig.from_mapping({"partition-id": 1, "num-partitions": 2}), True
    )
    assert not np.isclose(float(a.images.mean()), float(b.images.mean()), atol=0.5)


# --- client data ----------------------------------------------------------------------------


def test_a_region_node_holds_its_region_of_the_data(data_dir: Path) -> None:
    config = TrainingConfig.from_mapping({"partitioning": "region", "seed": 3})
    node = NodeDataConfig.from_mapping({"region": "eu", "data-dir": str(data_dir)})
    got = local_data(config, node, train=False)
    full = load_dataset("mnist", train=False, data_dir=data_dir)
    expected = full.subset(region_split(full.labels.numpy(), 2, 0.8, seed=3)[1])
    assert torch.equal(got.labels, expected.labels)
    assert torch.equal(got.images, expected.images)
    # "eu" owns the digits 5-9: 80 % of each of them.
    counts = np.bincount(got.labels.numpy(), minlength=10)
    full_counts = np.bincount(full.labels.numpy(), minlength=10)
    assert np.array_equal(counts[5:], np.floor(0.8 * full_counts[5:] + 0.5).astype(int))


def test_a_region_node_needs_a_region_partitioning() -> None:
    node = NodeDataConfig.from_mapping({"region": "us"})
    with pytest.raises(RunConfigError) as info:
        local_data(TrainingConfig(), node, train=True)
    assert str(info.value) == (
        "node-config 'region' = 'us' needs run-config 'partitioning' = 'region', got 'iid'"
    )
