"""Shared test settings: the data directory found as the CLI finds it, a cache folder of the
session's own, quiet Flower, few threads."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from datasets import REPO_ROOT, find_data_dir, require, synthetic_cifar10
from tiny_runs import TINY

DATA_DIR = find_data_dir()
os.environ["REBASIN_DATA_DIR"] = str(DATA_DIR)  # absolute: subprocesses find it from any cwd
# Decoded CIFAR-10 goes to the checkout's (git-ignored) cache folder, never to the data
# directory, which may be read-only; the cache is keyed by its source, so reuse is safe.
os.environ.setdefault("REBASIN_CACHE_DIR", str(REPO_ROOT / ".cache" / "rebasin-tests"))
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The data directory, with MNIST in it (a fresh machine has it after README's command 1)."""
    require("mnist", DATA_DIR)
    return DATA_DIR


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A data directory with the real MNIST and a small synthetic CIFAR-10 (ImageFolder of
    30 training and 10 test images per class), for tests that run CIFAR-10 models."""
    root = tmp_path_factory.mktemp("small-data")
    (root / "MNIST").symlink_to(data_dir / "MNIST", target_is_directory=True)
    return synthetic_cifar10(root, {"train": 30, "test": 10})


@pytest.fixture()
def serverapp_run() -> Iterator[None]:
    """Messages are stamped with the running ServerApp's run; act as one (server_grid tests)."""
    from simulations.local_grid import server_identity

    with server_identity(run_id=1):
        yield


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, dict, str]:
    """One tiny ``--mode both`` run over two seeds: (results dir, results.json, report.md)."""
    import json

    from typer.testing import CliRunner

    from simulations import cli

    out = tmp_path_factory.mktemp("sim") / "tiny"
    args = TINY + [
        "--seeds", "0", "1",
        "--mode", "both",
        "--rounds", "2",
        "--data-dir", str(data_dir),
        "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    return out, results, (out / "report.md").read_text()
