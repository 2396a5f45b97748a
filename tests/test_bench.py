"""The benchmark command runs end to end on a tiny setting and checks its own results."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from simulations.cli import app


@pytest.mark.timeout(300)
def test_bench_writes_tables_and_the_engine_matches_the_textbook(tmp_path, small_data_dir) -> None:
    out = tmp_path / "bench"
    args = ["bench", "--out", str(out), "--widths", "0.25", "--trained-widths", "0.25",
            "--seeds", "0", "--clients", "2", "3", "--repeats", "1", "--train-steps", "2",
            "--mlp-width", "0.125", "--data-dir", str(small_data_dir)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    bench = json.loads((out / "bench.json").read_text())
    cases = {(r["model"], r["weights"]) for r in bench["matching"]}
    assert cases == {("mlp 3x64", "random"), ("mlp 3x64", "trained"),
                     ("resnet20 x0.25", "random"), ("resnet20 x0.25", "trained")}  # fmt: skip
    for row in bench["matching"]:
        assert row["identical"], row  # same permutations and objective as the textbook loop
        assert row["speedup"] == pytest.approx(row["reference_s"] / row["engine_s"])
        assert row["engine_s_per_sweep"] == pytest.approx(row["engine_s"] / row["sweeps"])
        assert 0 < row["engine_products"] < row["reference_products"]
        assert 0 < row["engine_solves"] < row["reference_solves"]
    merges = {(r["model"], r["method"], r["clients"]) for r in bench["merge"]}
    assert merges == {(m, method, n) for m in ("mlp", "resnet20")
                      for method in ("naive", "rebasin", "merge-many") for n in (2, 3)}  # fmt: skip
    assert all(r["ratio_to_naive"] == 1.0 for r in bench["merge"] if r["method"] == "naive")
    table = (out / "bench.md").read_text()
    assert "| resnet20 x0.25 | random | 1 |" in table and "same result" in table
    assert "products engine / textbook" in table
    assert bench["settings"]["device"] == "cpu"
    assert list(out.glob("weights/*.safetensors"))  # trained weights cached for re-runs


def test_bench_rejects_a_missing_gpu_or_bad_values(tmp_path) -> None:
    import torch

    runner = CliRunner()
    bad = runner.invoke(app, ["bench", "--out", str(tmp_path), "--repeats", "0"])
    assert bad.exit_code == 2 and "--repeats" in bad.output
    if not torch.cuda.is_available():
        gpu = runner.invoke(app, ["bench", "--out", str(tmp_path), "--device", "cuda"])
        assert gpu.exit_code == 2 and "no CUDA device here" in gpu.output


@pytest.mark.timeout(300)
def test_bench_without_trained_cases_needs_no_data(tmp_path, monkeypatch) -> None:
    # What a GPU machine without the data sets runs (README, Speed).
    from simulations.bench import run_benchmark

    monkeypatch.setenv("REBASIN_DATA_DIR", str(tmp_path / "no-data-here"))
    result = run_benchmark(tmp_path / "bench", [0.25], [], [0], [2], 1, 40, None,
                           mlp_width=0.125, trained_mlp=False)  # fmt: skip
    cases = {(r["model"], r["weights"]) for r in result["matching"]}
    assert cases == {("mlp 3x64", "random"), ("resnet20 x0.25", "random")}
    assert result["settings"]["trained_mlp"] is False
    assert all(r["identical"] for r in result["matching"])


@pytest.mark.timeout(300)
def test_train_throughput_compares_the_loops_on_every_model(tmp_path, monkeypatch) -> None:
    from rebasin.recipe import bf16_supported

    monkeypatch.setenv("REBASIN_DATA_DIR", str(tmp_path / "no-data-here"))  # synthetic batches
    out = tmp_path / "tt"
    args = ["bench", "--train-throughput", "--out", str(out), "--throughput-steps", "1",
            "--throughput-batch", "4", "--throughput-warmup", "0", "--repeats", "1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert not (out / "bench.json").exists()  # only the throughput benchmark ran
    data = json.loads((out / "train_throughput.json").read_text())
    loops = ["before", "+augment", "+channels_last", "after"]
    models = ["vgg x0.25 batch", "vgg x0.5 batch", "resnet20 x1 batch"]
    assert [(r["model"], r["loop"]) for r in data["rows"]] == [
        (m, lp) for m in models for lp in loops
    ]
    has_bf16 = bf16_supported("cpu")
    for r in data["rows"]:
        assert len(r["seconds"]) == 1 and r["images_per_s"] > 0
        assert r["bf16"] is (
            r["loop"] == "after, bf16 forced" or (r["loop"] == "after" and has_bf16)
        )
        assert r["augment"] is (r["loop"] != "before")
        before = next(b for b in data["rows"] if b["model"] == r["model"] and b["loop"] == "before")
        assert r["ratio_to_before"] == pytest.approx(r["images_per_s"] / before["images_per_s"])
    assert all(r["ratio_to_before"] == 1.0 for r in data["rows"] if r["loop"] == "before")
    assert data["environment"]["bf16_supported"] is has_bf16
    assert "synthetic" in data["settings"]["data"]
    table = (out / "train_throughput.md").read_text()
    assert table.count("\n| vgg x0.25 batch |") == len(loops)
    assert "| vgg x0.5 batch | before |" in table and "1.00x" in table


def test_train_throughput_forced_bf16_row(tmp_path) -> None:
    from simulations.bench_train import run_train_throughput

    result = run_train_throughput(
        tmp_path, models=(("vgg", 0.0625, "batch"),), steps=1, warmup=0, batch_size=2,
        repeats=1, force_bf16=True,
    )  # fmt: skip
    rows = {r["loop"]: r for r in result["rows"]}
    assert list(rows) == ["before", "+augment", "+channels_last", "after", "after, bf16 forced"]
    assert rows["after, bf16 forced"]["bf16"] is True and rows["before"]["bf16"] is False
    assert rows["+channels_last"]["channels_last"] and not rows["+augment"]["channels_last"]
    assert result["settings"]["loops"]["after"]["schedule"] == "onecycle"
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        run_train_throughput(tmp_path, steps=0)
