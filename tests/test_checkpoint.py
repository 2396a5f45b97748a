"""Checkpoints: exact round trip, atomic writes, and a clear error for every kind of bad file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rebasin.zoo import build_model
from server.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from server.identity import ModelIdentity

pytestmark = pytest.mark.timeout(60)

VGG = ModelIdentity("vgg", "cifar10", 0.0625)


@pytest.fixture()
def state_dict() -> dict[str, torch.Tensor]:
    # VGG with BatchNorm: float weights plus the int64 `num_batches_tracked` buffers.
    return build_model("vgg", "cifar10", width=0.0625, seed=0).state_dict()


def test_round_trip_is_exact(tmp_path: Path, state_dict: dict) -> None:
    path = save_checkpoint(tmp_path, 3, state_dict, VGG)
    assert path == tmp_path / "round-0003.safetensors" == checkpoint_path(tmp_path, 3)
    checkpoint = load_checkpoint(path, reference=state_dict, identity=VGG)
    assert checkpoint.round == 3
    assert checkpoint.metadata == {
        "format": CHECKPOINT_FORMAT,
        "round": "3",
        "model": "vgg",
        "dataset": "cifar10",
        "width": "0.0625",
        "norm": "batch",
    }
    assert set(checkpoint.state_dict) == set(state_dict)
    for key, tensor in state_dict.items():
        assert checkpoint.state_dict[key].dtype == tensor.dtype
        assert torch.equal(checkpoint.state_dict[key], tensor)
    # Only the checkpoint itself is left in the directory: no temporary files.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-0003.safetensors"]


def test_latest_checkpoint_picks_the_highest_round(tmp_path: Path, state_dict: dict) -> None:
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for server_round in (2, 10, 9):
        save_checkpoint(tmp_path, server_round, state_dict)
    (tmp_path / "round-0099.safetensors.tmp").write_bytes(b"half written")
    assert latest_checkpoint(tmp_path) == tmp_path / "round-0010.safetensors"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "round-0001.safetensors"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == f"checkpoint {path} does not exist"


@pytest.mark.parametrize(
    ("name", "corrupt", "detail"),
    [
        ("garbage", lambda data: b"not a safetensors file at all", "header too large"),
        ("truncated", lambda data: data[:-100], "incomplete metadata, file not fully covered"),
        ("empty", lambda data: b"", "header too small"),
    ],
)
def test_corrupt_files_are_refused(
    tmp_path: Path, state_dict: dict, name: str, corrupt, detail: str
) -> None:
    good = save_checkpoint(tmp_path, 1, state_dict)
    bad = tmp_path / f"{name}.safetensors"
    bad.write_bytes(corrupt(good.read_bytes()))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    assert str(info.value) == (
        f"checkpoint {bad} is corrupt or not a safetensors file: "
        f"Error while deserializing header: {detail}"
    )


def test_foreign_safetensors_file_is_refused(tmp_path: Path, state_dict: dict) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"round": "1"})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == (f"checkpoint {path} has format None, expected '{CHECKPOINT_FORMAT}'")
    # Not integers, though some pass str.isdigit() ("²") or int() (" 3", "-1").
    for bad in ("x", "1.5", "²", " 3", "-1", ""):
        header = {"format": CHECKPOINT_FORMAT, "round": bad}
        save_file({"w": torch.zeros(2)}, str(path), metadata=header)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(info.value) == f"checkpoint {path} has a bad round {bad!r}"


def test_checkpoint_of_another_model_is_refused(tmp_path: Path, state_dict: dict) -> None:
    path = save_checkpoint(tmp_path, 1, state_dict, VGG)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, identity=ModelIdentity("vgg", "cifar10", 0.125))
    assert str(info.value) == (
        f"checkpoint {path} was written for width='0.0625', but this run has width='0.125'"
    )
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, identity=ModelIdentity("vgg", "cifar10", 0.0625, "layer"))
    assert str(info.value) == (
        f"checkpoint {path} was written for norm='batch', but this run has norm='layer'"
    )
    wider = build_model("vgg", "cifar10", width=0.125, seed=0).state_dict()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, reference=wider)
    assert str(info.value) == (
        f"checkpoint {path}: 'convs.0.weight' has shape (4, 3, 3, 3), expected (8, 3, 3, 3)"
    )


def test_non_finite_values_are_refused(tmp_path: Path, state_dict: dict) -> None:
    broken = dict(state_dict)
    broken["head.bias"] = broken["head.bias"].clone()
    broken["head.bias"][3] = float("nan")
    path = save_checkpoint(tmp_path, 1, broken)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, reference=state_dict)
    assert str(info.value) == f"checkpoint {path}: 'head.bias' has 1 non-finite values (NaN or Inf)"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == f"checkpoint {path}: 'head.bias' has non-finite values"


def test_save_refuses_bad_arguments(tmp_path: Path, state_dict: dict) -> None:
    with pytest.raises(CheckpointError, match=r"^server round must be >= 0, got -1$"):
        save_checkpoint(tmp_path, -1, state_dict)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(tmp_path, 1, {"w": [1.0, 2.0]})  # type: ignore[dict-item]
    assert str(info.value) == "'w' is a list, not a tensor"
    assert list(tmp_path.iterdir()) == []
