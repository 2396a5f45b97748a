"""Shared test settings: the data directory beside the checkout, quiet Flower, few threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

os.environ.setdefault("REBASIN_DATA_DIR", str(SHARED_DATA))
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared, read-only data directory (MNIST IDX files, CIFAR-10 JPEG tarball)."""
    return Path(os.environ["REBASIN_DATA_DIR"])
