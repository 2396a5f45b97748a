"""Trained clients kept on disk: an interrupted seed resumes after the clients it finished, and
gives the very results an uninterrupted run gives; a stored client is taken only for the
client it was made for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_runs import TINY
from typer.testing import CliRunner

import simulations.oneshot
from rebasin.zoo import build_model
from simulations import cli
from simulations.client_store import CLIENT_FORMAT, ClientStore, ClientStoreError, client_key
from simulations.oneshot import OneShotConfig, run_oneshot

runner = CliRunner()

# A BatchNorm conv model with the CIFAR-10 recipe (augmentation, channels_last), so that the
# stored state holds BatchNorm statistics and integer counters too.
CFG = OneShotConfig(
    dataset="cifar10",
    model="vgg",
    width=0.0625,
    norm="batch",
    epochs=1,
    batch_size=32,
    lambdas=2,
    max_iter=20,
    repair_batches=2,
    centralized=False,
)


def _comparable(run: dict) -> dict:
    """A seed's results without what a rerun cannot repeat (merge timings) or only records."""
    return {k: v for k, v in run.items() if k not in ("merge_seconds", "clients_from_disk")}


def _recording(real_fit, trained: list[str]):
    """``fit`` that records each training's description in ``trained``."""

    def fit(cfg, model, data, description, seed, progress):
        trained.append(description)
        return real_fit(cfg, model, data, description, seed, progress)

    return fit


def _counting_fit(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    trained: list[str] = []
    monkeypatch.setattr(simulations.oneshot, "fit", _recording(simulations.oneshot.fit, trained))
    return trained


@pytest.mark.timeout(300)
def test_a_seed_resumed_from_stored_clients_gives_the_uninterrupted_results(
    tmp_path: Path, small_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained = _counting_fit(monkeypatch)
    store = ClientStore(tmp_path / "clients")
    fresh = run_oneshot(CFG, 0, small_data_dir, store=store)
    assert trained == ["seed 0: client 0", "seed 0: client 1"]
    assert "clients_from_disk" not in fresh
    paths = [store.path(0, i) for i in (0, 1)]
    assert [p.name for p in paths] == ["seed0-client0.safetensors", "seed0-client1.safetensors"]

    # As if the run had stopped while client 1 trained: client 0 is on disk, client 1 is not.
    paths[1].unlink()
    trained.clear()
    resumed = run_oneshot(CFG, 0, small_data_dir, store=ClientStore(store.directory, reuse=True))
    assert trained == ["seed 0: client 1"]
    assert resumed["clients_from_disk"] == [0]
    assert resumed["train_seconds"]["client 0"] == fresh["train_seconds"]["client 0"]
    # Every accuracy, loss, per-class figure and interpolation point is the same.
    for run in (fresh, resumed):
        run["train_seconds"].pop("client 1")
    assert _comparable(resumed) == _comparable(fresh)

    trained.clear()
    again = run_oneshot(CFG, 0, small_data_dir, store=ClientStore(store.directory, reuse=True))
    assert trained == []
    assert again["clients_from_disk"] == [0, 1]
    assert _comparable(again) == _comparable(fresh) | {"train_seconds": again["train_seconds"]}


def test_stored_clients_keep_every_tensor_and_name_the_model(tmp_path: Path) -> None:
    model = build_model("vgg", "cifar10", width=0.0625, norm="batch", seed=3)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.num_batches_tracked.fill_(7)
    store = ClientStore(tmp_path)
    path = store.save(CFG, 2, 1, model, 12.5)
    target = build_model("vgg", "cifar10", width=0.0625, norm="batch", seed=4)
    assert ClientStore(tmp_path, reuse=True).load(CFG, 2, 1, target) == 12.5
    for key, value in model.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
        assert target.state_dict()[key].dtype == value.dtype, key
    assert not target.training
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert {k: metadata[k] for k in ("format", "model", "dataset", "width", "norm")} == {
        "format": CLIENT_FORMAT,
        "model": "vgg",
        "dataset": "cifar10",
        "width": "0.0625",
        "norm": "batch",
    }
    assert json.loads(metadata["client"]) == client_key(CFG, 2, 1)
    # Without reuse, or without a file, nothing is loaded and the model is untouched.
    before = {k: v.clone() for k, v in target.state_dict().items()}
    other = build_model("vgg", "cifar10", width=0.0625, norm="batch", seed=5)
    assert ClientStore(tmp_path).load(CFG, 2, 1, other) is None
    assert ClientStore(tmp_path, reuse=True).load(CFG, 0, 1, other) is None
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_a_stored_client_is_refused_for_another_client_or_training(tmp_path: Path) -> None:
    model = build_model("vgg", "cifar10", width=0.0625, norm="batch", seed=3)
    store = ClientStore(tmp_path, reuse=True)
    path = store.save(CFG, 0, 0, model, 1.0)
    longer = CFG.model_copy(update={"epochs": 2, "label_smoothing": 0.2})
    with pytest.raises(ClientStoreError) as err:
        store.load(longer, 0, 0, model)
    assert str(err.value) == (
        f"{path} was trained otherwise than this run's seed 0 client 0 (settings.epochs, "
        "settings.label_smoothing, training.label_smoothing differ); delete it or use "
        "another --out"
    )
    # Settings only the merges read do not matter: the client is the same.
    merges = CFG.model_copy(update={"max_iter": 5, "lambdas": 7, "repair_batches": 9})
    assert store.load(merges, 0, 0, model) == 1.0
    # A file renamed to stand for another client is refused by what it holds.
    path.rename(store.path(0, 1))
    with pytest.raises(ClientStoreError, match=r"\(client differ\)"):
        store.load(CFG, 0, 1, model)


def test_unreadable_or_foreign_files_are_refused_by_name(tmp_path: Path) -> None:
    model = build_model("vgg", "cifar10", width=0.0625, norm="batch", seed=3)
    store = ClientStore(tmp_path, reuse=True)
    path = store.path(0, 0)
    path.write_bytes(b"\x00" * 40)
    with pytest.raises(ClientStoreError, match=rf"^cannot reuse stored client {path}: .*corrupt"):
        store.load(CFG, 0, 0, model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(ClientStoreError) as err:
        store.load(CFG, 0, 0, model)
    assert str(err.value) == f"{path}: not a stored client ({CLIENT_FORMAT})"
    # Our format, but its key is no JSON object: refused the same way.
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    for broken in ("[1, 2]", "{not json", None):
        header = {"format": CLIENT_FORMAT, "train_seconds": "1.0"}
        save_file(tensors, str(path), metadata=header | ({"client": broken} if broken else {}))
        with pytest.raises(ClientStoreError) as err:
            store.load(CFG, 0, 0, model)
        assert str(err.value) == f"{path}: not a stored client ({CLIENT_FORMAT})"
    # The right header over the wrong tensors: named by key.
    store.save(CFG, 0, 0, model, 1.0)
    tensors = load_file(str(path))
    tensors["head.weight"] = torch.full_like(tensors["head.weight"], float("nan"))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ClientStoreError, match="head.weight"):
        store.load(CFG, 0, 0, model)


@pytest.mark.timeout(300)
def test_simulate_resume_trains_only_the_clients_an_interrupted_seed_lacks(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    args = TINY + [
        "--seeds",
        "0",
        "--no-centralized",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
    ]
    real_fit = simulations.oneshot.fit
    trained: list[str] = []

    def stops_at_client_1(cfg, model, data, description, seed, progress):
        if description.endswith("client 1"):
            raise KeyboardInterrupt  # the session ends here
        trained.append(description)
        return real_fit(cfg, model, data, description, seed, progress)

    monkeypatch.setattr(simulations.oneshot, "fit", stops_at_client_1)
    result = runner.invoke(cli.app, args)
    assert result.exit_code != 0
    assert trained == ["seed 0: client 0"]
    assert not (out / "results.json").exists()
    assert (out / "clients" / "seed0-client0.safetensors").is_file()

    trained.clear()
    monkeypatch.setattr(simulations.oneshot, "fit", _recording(real_fit, trained))
    result = runner.invoke(cli.app, args + ["--resume"])
    assert result.exit_code == 0, result.output
    assert trained == ["seed 0: client 1"]
    (run,) = json.loads((out / "results.json").read_text())["one_shot"]["runs"]
    assert run["clients_from_disk"] == [0]
    assert _flat(
        "Loaded from `clients/` (trained by an earlier, interrupted run, whose training time "
        "the seed's wall time leaves out): seed 0 client 0."
    ) in _flat((out / "report.md").read_text())

    # The stored endpoints merge offline, the model read from their metadata.
    files = [str(out / "clients" / f"seed0-client{i}.safetensors") for i in (0, 1)]
    merged = tmp_path / "merged.safetensors"
    result = runner.invoke(cli.app, ["merge", *files, "--out", str(merged)])
    assert result.exit_code == 0, result.output
    assert set(load_file(str(merged))) == set(load_file(files[0]))

    # A stored client that does not fit stops the resumed run, named (exit code 2).
    (out / "results.json").unlink()
    (out / "clients" / "seed0-client1.safetensors").write_bytes(b"not a safetensors file")
    result = runner.invoke(cli.app, args + ["--resume"])
    assert result.exit_code == 2, result.output
    assert "cannot reuse stored client" in result.output
    assert "seed0-client1.safetensors" in _flat(result.output)


def _flat(text: str) -> str:
    """Rich wraps long lines; compare without the breaks."""
    return "".join(text.split())
