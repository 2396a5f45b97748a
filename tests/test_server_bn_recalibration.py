"""BatchNorm recalibration after a merge: the ServerApp's query to the real ClientApp, pooled
statistics, and the checks on every reply (one process, no SuperLink).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from server_grid import NODES, GridWithDeadNodes, quick_config, state_of

import client.app as client_app_module
from client.config import NodeDataConfig
from rebasin.data import LabeledData
from rebasin.norm import batchnorm_stats, combine_batchnorm_stats
from rebasin.spec import is_running_stat
from server.app import run_server
from server.checkpoint import load_checkpoint
from server.config import ServerConfig
from server.recalibration import batchnorm_layer_sizes, recalibrate_batchnorm
from simulations.local_grid import FIRST_NODE_ID, LocalGrid
from strategies.bn_query import QUERY_MESSAGE_TYPE, stats_from_record, stats_to_record

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("serverapp_run")]


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
    run_config, config = quick_config(tmp_path / "a", **BN_RUN, **{"bn-recalibration": True})
    grid = GridWithDeadNodes(run_config)
    run_server(grid, config)
    plain_config_items = quick_config(tmp_path / "b", **BN_RUN)
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
    state = state_of(out)
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
