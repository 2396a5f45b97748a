"""The GPU paper-scale script, end to end at tiny scale on the CPU, without flwr or pydantic.

The data is a few hundred synthetic CIFAR-shaped PNG images in the ImageFolder layout that
``rebasin.data`` reads (``cifar10-jpeg/{train,test}/<class>/``); the numbers mean nothing,
the structure and the invariants of the report are what is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rebasin.data import CIFAR10_CLASSES, CIFAR10_JPEG_DIRNAME

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_PER_CLASS, TEST_PER_CLASS = 16, 5
BLOCKED = ("flwr", "pydantic", "matplotlib")

# Runs the script as `python -m simulations.paper_scale` with the blocked packages made
# unimportable (a None entry in sys.modules makes `import name` raise ImportError).
RUNNER = """
import runpy, sys
for name in {blocked!r}:
    sys.modules[name] = None
sys.argv = ["simulations.paper_scale", *sys.argv[1:]]
try:
    runpy.run_module("simulations.paper_scale", run_name="__main__", alter_sys=True)
finally:
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r} and sys.modules[m])
    print("BLOCKED-LOADED:", loaded)
"""


def make_image_folder(root: Path, seed: int = 0) -> Path:
    """Random 32 x 32 RGB PNGs, a few per class and split, where the loader looks."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for k, name in enumerate(CIFAR10_CLASSES):
            folder = root / CIFAR10_JPEG_DIRNAME / split / name
            folder.mkdir(parents=True)
            for j in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                pixels[..., k % 3] //= 2  # a faint class signal
                Image.fromarray(pixels).save(folder / f"{j:04d}.png")
    return root


def run_script(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "REBASIN_CACHE_DIR": str(tmp_path / "c")}
    return subprocess.run(
        [sys.executable, "-c", RUNNER.format(blocked=BLOCKED), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str, str]:
    tmp = tmp_path_factory.mktemp("paper")
    data = make_image_folder(tmp / "data")
    out = tmp / "out"
    args = ["--data-dir", str(data), "--out", str(out), "--widths", "0.5", "--norms", "batch",
            "--norms", "layer", "--epochs", "1", "--batch-size", "32", "--max-lr", "0.05",
            "--device", "cpu"]  # fmt: skip
    proc = run_script(args, tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "paper_scale.json").read_text())
    return out, results, (out / "paper_scale.md").read_text(), proc.stdout + proc.stderr


def test_runs_without_flwr_pydantic_or_matplotlib(tiny) -> None:
    _, _, _, output = tiny
    assert "BLOCKED-LOADED: []" in output
    words = " ".join(output.split())  # rich wraps long lines
    assert "resnet20 x0.5 batch: first epoch" in words and "whole run ~" in words


def test_report_structure_and_invariants(tiny) -> None:
    out, results, report, _ = tiny
    assert results["format"] == "rebasin-paper-scale/1"
    assert results["data"] == {
        "train_examples": 10 * TRAIN_PER_CLASS,
        "test_examples": 10 * TEST_PER_CLASS,
        "data_dir": str(out.parent / "data"),
    }
    runs = results["runs"]
    assert [(r["width"], r["norm"], r["seed"]) for r in runs] == [
        (0.5, "batch", 0),
        (0.5, "layer", 0),
    ]
    expected = {
        "batch": [
            "naive",
            "rebasin",
            "merge-many",
            "naive+bn-reset",
            "rebasin+bn-reset",
            "ensemble",
        ],
        "layer": ["naive", "rebasin", "merge-many", "naive+repair", "rebasin+repair", "ensemble"],
    }
    for run in runs:
        assert list(run["methods"]) == expected[run["norm"]]
        assert sum(run["shard_sizes"]) == 10 * TRAIN_PER_CLASS and len(run["clients"]) == 2
        best = max(c["accuracy"] for c in run["clients"])
        assert run["best_client_accuracy"] == best
        for name, m in run["methods"].items():
            assert run["gap_to_best_client"][name] == pytest.approx(m["accuracy"] - best, abs=0)
            hits = m["accuracy"] * 10 * TEST_PER_CLASS
            assert abs(hits - round(hits)) < 1e-5  # a share of the 50 test images (float32 mean)
            assert len(m["per_class_accuracy"]) == 10
        used = run["training"]
        assert used["augment"] and used["channels_last"] and used["nesterov"]
        assert used["schedule"] == "onecycle" and used["peak_lr"] == 0.05
        assert used["bf16"] is results["environment"]["bf16_supported"]
        assert used["device"] == "cpu"
    summary = results["summary"]
    assert [(r["width"], r["norm"]) for r in summary] == [(0.5, "batch"), (0.5, "layer")]
    for row, run in zip(summary, runs):
        assert row["methods"]["rebasin"]["mean"] == run["methods"]["rebasin"]["accuracy"]
        assert row["methods"]["rebasin"]["std"] == 0.0 and row["methods"]["rebasin"]["n"] == 1
    assert report.count("\n## ResNet-20 x0.5") == 2
    assert "| rebasin+repair |" in report and "| rebasin+bn-reset |" in report
    assert "python -m simulations.paper_scale --data-dir" in report
    assert (out / "paper_scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_settings_are_named(tmp_path: Path) -> None:
    proc = run_script(["--widths", "0", "--data-dir", str(tmp_path)], tmp_path)
    assert proc.returncode == 2
    assert "--widths = [0.0]: need one or more finite widths > 0" in proc.stderr
    proc = run_script(["--norms", "group", "--data-dir", str(tmp_path)], tmp_path)
    assert proc.returncode == 2 and "--norms = ['group']" in proc.stderr
    proc = run_script(["--data-dir", str(tmp_path / "none"), "--device", "cpu"], tmp_path)
    assert proc.returncode == 1 and "CIFAR-10 not found in data directory" in proc.stderr


def test_an_interrupted_run_reports_the_finished_settings_and_names_the_rest(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The script's timeout sends SIGINT; Python raises KeyboardInterrupt where the run is.
    import torch
    from typer.testing import CliRunner

    import simulations.paper_scale as ps

    out, _, _, _ = tiny
    monkeypatch.setenv("REBASIN_CACHE_DIR", str(tmp_path / "c"))
    real = ps.run_one
    calls: list[tuple[float, str, int]] = []

    def cut_at_second(cfg, width, norm, seed, data, hooks):
        calls.append((width, norm, seed))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cfg, width, norm, seed, data, hooks)

    monkeypatch.setattr(ps, "run_one", cut_at_second)
    cfg = ps.PaperScaleConfig(
        widths=(0.5,), norms=("batch", "layer"), seeds=(0, 1), epochs=1, batch_size=32,
        max_lr=0.05,
    )  # fmt: skip
    cut = tmp_path / "cut"
    written = ps.run_paper_scale(cfg, out.parent / "data", cut, torch.device("cpu"))
    assert [(r["norm"], r["seed"]) for r in written["runs"]] == [("batch", 0)]
    assert written["interrupted"]["not_run"] == [
        {"width": 0.5, "norm": "batch", "seed": 1},
        {"width": 0.5, "norm": "layer", "seed": 0},
        {"width": 0.5, "norm": "layer", "seed": 1},
    ]
    assert json.loads((cut / "paper_scale.json").read_text()) == written
    report = (cut / "paper_scale.md").read_text()
    assert "- **Interrupted** after " in report
    assert (
        "s: not run: x0.5 batch seed 1, x0.5 layer seed 0, x0.5 layer seed 1; the tables hold "
        "the finished runs only"
    ) in report
    assert report.count("\n## ResNet-20 x0.5") == 1
    assert (cut / "paper_scale.png").is_file()

    # Cut before any run finished: the JSON says what was planned, no report; the command
    # line exits 130, as an interrupted command.
    calls.clear()
    monkeypatch.setattr(ps, "run_one", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    empty = tmp_path / "empty"
    empty.mkdir()
    for stale in ("paper_scale.md", "paper_scale.png"):  # an earlier run's, now misleading
        (empty / stale).write_text("earlier")
    args = ["--data-dir", str(out.parent / "data"), "--out", str(empty), "--widths", "0.5",
            "--norms", "batch", "--epochs", "1", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(ps.app, args)
    assert result.exit_code == 130, result.output
    saved = json.loads((empty / "paper_scale.json").read_text())
    assert saved["runs"] == [] and len(saved["interrupted"]["not_run"]) == 1
    assert not (empty / "paper_scale.md").exists()


def test_the_gpu_script_runs_the_module_under_its_time_cap(tmp_path: Path) -> None:
    # A stand-in interpreter prints what the script would run (the real run needs a GPU).
    fake = tmp_path / "fake-python"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "PATH": os.environ["PATH"]}
    script = REPO_ROOT / "scripts" / "gpu_paper_scale.sh"
    proc = subprocess.run(
        ["bash", str(script), "d", "o", "--seeds", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.splitlines()
    assert args[:6] == ["-m", "simulations.paper_scale", "--data-dir", "d", "--out", "o"]
    assert args[-4:] == ["--time-budget", "450", "--seeds", "1"]
    assert " ".join(args).count("--widths") == 2 and "--device cuda" in " ".join(args)
