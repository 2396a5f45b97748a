"""The ServerApp's and ClientApp's data: the server-side evaluation set, a node's region.

The rounds are tests/test_server_rounds.py, the BatchNorm recalibration
tests/test_server_bn_recalibration.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from server_grid import quick_config

import server.app as server_app_module
from client.config import NodeDataConfig
from client.data import local_data
from rebasin.data import load_dataset
from rebasin.partition import region_split
from server.app import server_evaluation
from strategies.run_config import RunConfigError, TrainingConfig

pytestmark = pytest.mark.timeout(120)


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
    _, config = quick_config(tmp_path, **{"server-data-dir": str(data_dir)})
    arrays = ArrayRecord(config.build_model().state_dict())
    metrics = server_evaluation(config, round_offset=0)(1, arrays)
    assert metrics["num-examples"] == 100
    assert used == [data_dir]

    # Relative to the ServerApp's working directory.
    monkeypatch.chdir(data_dir.parent)
    _, config = quick_config(tmp_path, **{"server-data-dir": data_dir.name})
    assert server_evaluation(config, round_offset=0)(1, arrays)["num-examples"] == 100
    assert used[-1] == Path(data_dir.name)

    # Without the key: $REBASIN_DATA_DIR, as before (here a directory without the data).
    _, config = quick_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"MNIST not found in data directory {elsewhere}"):
        server_evaluation(config, round_offset=0)
    assert used[-1] == elsewhere


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
