"""The ``rebasin study`` command: barrier measurement, snapshots, width search, outputs.

The barrier tests use tiny models trained on synthetic data: two identical models and a model
with its permuted copy have known barriers. The end-to-end runs are tiny (20 MNIST or 10
CIFAR-10 examples per class, one epoch): their numbers are meaningless, the files, their
keys and their agreement are what is checked.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from rebasin.data import LabeledData
from rebasin.models import MLP, VGG
from rebasin.permute import apply_permutation, random_perms
from rebasin.train import train
from rebasin.zoo import build_model
from simulations import cli
from simulations.study_measure import (
    SnapshotLoader,
    compare_methods,
    parameter_count,
    train_with_snapshots,
    width_for_parameters,
)
from simulations.study_report import RULE_THRESHOLD, merging_from

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GRID = [0.0, 0.25, 0.5, 0.75, 1.0]
BARRIERS = (
    "loss_barrier",
    "accuracy_barrier",
    "midpoint_loss_barrier",
    "midpoint_accuracy_barrier",
)


# ------------------------------------------------------------------------------------------
# synthetic data and models


def blobs(shape: tuple[int, ...], n: int = 96, classes: int = 4, seed: int = 0) -> LabeledData:
    """``n`` examples of ``classes`` classes: a fixed random pattern per class plus noise."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn((classes, *shape), generator=gen)
    labels = torch.arange(n) % classes
    images = patterns[labels] + 0.5 * torch.randn((n, *shape), generator=gen)
    return LabeledData(images.float(), labels, [str(c) for c in range(classes)])


def trained(model: nn.Module, data: LabeledData, epochs: int = 8) -> nn.Module:
    torch.manual_seed(0)
    train(model, data.loader(16, shuffle=True, seed=0), epochs, 0.05)
    return model


@pytest.fixture(scope="module")
def mlp_and_data() -> tuple[nn.Module, LabeledData]:
    data = blobs((1, 4, 4), classes=8)  # hard enough that a bad merge loses accuracy
    torch.manual_seed(1)
    return trained(MLP(16, hidden=(16, 16), num_classes=8), data), data


@pytest.fixture(scope="module")
def vgg_and_data() -> tuple[nn.Module, LabeledData]:
    data = blobs((3, 32, 32), n=64)
    torch.manual_seed(2)
    model = VGG((8, "M", 8, "M", 8, "M", 8, "M", 8, "M"), num_classes=4, norm="batch")
    return trained(model, data, epochs=4), data


def measure(model: nn.Module, a: dict, b: dict, data: LabeledData) -> dict:
    return compare_methods(
        model,
        a,
        b,
        data,
        [data.subset(range(0, len(data), 2)), data.subset(range(1, len(data), 2))],
        lambdas=GRID,
        batch_size=16,
        seed=0,
        max_iter=50,
        repair_batches=2,
    )


def permuted_copy(model: nn.Module) -> tuple[dict, dict]:
    a = model.state_dict()
    spec = model.permutation_spec()
    return a, apply_permutation(spec, random_perms(spec, a, seed=7), a)


# ------------------------------------------------------------------------------------------
# barriers on known cases


def test_identical_models_have_no_barrier(mlp_and_data) -> None:
    model, data = mlp_and_data
    sd = model.state_dict()
    result = measure(model, sd, copy.deepcopy(sd), data)
    assert list(result["methods"]) == ["naive", "rebasin"]  # no BatchNorm: no BN reset
    for name, curve in result["methods"].items():
        assert curve["lambdas"] == GRID
        for key in BARRIERS:
            assert abs(curve[key]) <= 1e-12, (name, key, curve[key])
        # Every point of the path is the same model.
        assert max(curve["loss"]) - min(curve["loss"]) <= 1e-12
    assert result["endpoints"][0] == result["endpoints"][1]
    assert result["endpoints"][0]["accuracy"] > 0.85  # a trained model, not a trivial one


def test_permuted_copy_naive_barrier_positive_rebasin_zero(mlp_and_data) -> None:
    model, data = mlp_and_data
    a, b = permuted_copy(model)
    result = measure(model, a, b, data)
    naive, rebasin = result["methods"]["naive"], result["methods"]["rebasin"]
    # The permuted copy computes the same function: equal endpoints.
    assert abs(naive["loss"][0] - naive["loss"][-1]) <= 1e-5
    assert naive["accuracy"][0] == naive["accuracy"][-1]
    # Averaging mismatched units costs loss and accuracy; weight matching undoes the
    # permutation exactly, so the re-basin path is one model.
    assert naive["loss_barrier"] > 0.1, naive
    assert naive["accuracy_barrier"] > 0.05, naive
    assert naive["midpoint_loss_barrier"] == pytest.approx(
        naive["loss"][2] - 0.5 * (naive["loss"][0] + naive["loss"][-1])
    )
    for key in BARRIERS:
        assert abs(rebasin[key]) <= 1e-5, (key, rebasin[key])
    assert result["matching"]["sweeps"] >= 1
    assert result["matching"]["objective_gain"] > 0  # undoing the permutation pays


def test_permuted_copy_with_batchnorm(vgg_and_data) -> None:
    model, data = vgg_and_data
    a, b = permuted_copy(model)
    result = measure(model, a, b, data)
    assert list(result["methods"]) == ["naive", "rebasin", "naive+bn-reset", "rebasin+bn-reset"]
    assert result["methods"]["naive"]["loss_barrier"] > 0.05, result["methods"]["naive"]
    # Resetting BatchNorm does not undo a permutation: the naive midpoint stays bad.
    naive_reset = result["methods"]["naive+bn-reset"]
    assert naive_reset["loss_barrier"] > 0.3 and naive_reset["accuracy_barrier"] > 0.3, naive_reset
    for name in ("rebasin", "rebasin+bn-reset"):
        for key in BARRIERS:
            assert abs(result["methods"][name][key]) <= 1e-5, (name, key)


def test_lambda_grid_must_hold_the_midpoint(mlp_and_data) -> None:
    model, data = mlp_and_data
    sd = model.state_dict()
    with pytest.raises(ValueError, match="must hold 0.5"):
        compare_methods(
            model, sd, sd, data, [data], lambdas=[0.0, 0.4, 1.0], batch_size=16, seed=0,
            max_iter=5, repair_batches=1,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------
# training snapshots, parameter counts, rules


def test_snapshots_are_the_states_of_one_training_run() -> None:
    make = lambda: build_model("mlp", "mnist", width=0.0625, seed=3)  # noqa: E731
    data = LabeledData(
        torch.randn(64, 1, 28, 28), torch.arange(64) % 10, [str(c) for c in range(10)]
    )
    plain = make()
    init = copy.deepcopy(plain.state_dict())
    train(plain, data.loader(16, shuffle=True, seed=5), 2, 0.05, weight_decay=1e-4)
    snapped = make()
    snaps = train_with_snapshots(
        snapped, data, (0, 0.5, 2), epochs=2, lr=0.05, optimizer="sgd", weight_decay=1e-4,
        batch_size=16, loader_seed=5,
    )  # fmt: skip
    assert list(snaps) == [0.0, 0.5, 2.0]
    for key, value in init.items():
        assert torch.equal(snaps[0.0][key], value), key
    # Snapshots do not disturb training: the last one is plain train()'s result.
    for key, value in plain.state_dict().items():
        assert torch.equal(snaps[2.0][key], value), key
    # After 2 of 8 steps the model is neither the start nor the end.
    first = "layers.0.weight"
    assert not torch.equal(snaps[0.5][first], init[first])
    assert not torch.equal(snaps[0.5][first], snaps[2.0][first])


def test_snapshot_beyond_training_is_an_error() -> None:
    model = nn.Linear(2, 2)
    loader = SnapshotLoader([(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))] * 3, model, [5])
    assert len(loader) == 3
    assert len(list(loader)) == 3
    with pytest.raises(ValueError, match=r"training took 3 steps; no snapshot at steps \[5\]"):
        loader.finish()


def test_width_for_parameters_matches_the_closest_count() -> None:
    assert width_for_parameters("resnet20", "cifar10", 272_474) == 1.0
    assert parameter_count("resnet20", "cifar10", 1.0) == 272_474
    # MLP on CIFAR-10: hidden units h -> 3072 h + h + 2 (h^2 + h) + 10 h + 10 parameters.
    target = 100_000
    count = lambda h: 3072 * h + h + 2 * (h * h + h) + 10 * h + 10  # noqa: E731
    best = min(range(1, 512), key=lambda h: (abs(count(h) - target), h))
    width = width_for_parameters("mlp", "cifar10", target)
    model = build_model("mlp", "cifar10", width=width)
    assert model.layers[0].out_features == best
    assert parameter_count("mlp", "cifar10", width) == count(best)
    with pytest.raises(ValueError, match="3000 is out of that range"):
        width_for_parameters("mlp", "cifar10", 3000)


def _rows(values: list[tuple[float, float | None]]) -> list[dict]:
    return [
        {"model": "mlp", "width": w, "methods": {"rebasin": {"accuracy_barrier": {"mean": b}}}}
        for w, b in values
    ]


def test_merging_from_needs_every_larger_value_below_the_threshold() -> None:
    low, high = RULE_THRESHOLD / 2, RULE_THRESHOLD * 2
    rows = _rows([(4, low), (1, high), (2, low), (0.5, low), (8, low)])
    assert merging_from(rows, "width", "rebasin") == 2
    assert merging_from(_rows([(1, low), (2, low)]), "width", "rebasin") == 1
    assert merging_from(_rows([(1, low), (2, high)]), "width", "rebasin") is None
    assert merging_from(_rows([(1, low), (2, RULE_THRESHOLD)]), "width", "rebasin") is None


# ------------------------------------------------------------------------------------------
# the command


def parse_tables(markdown: str) -> dict[tuple[str, ...], list[list[str]]]:
    """Every Markdown table of ``markdown``: header cells -> rows of cells."""
    tables: dict[tuple[str, ...], list[list[str]]] = {}
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|:"):
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip("|").split("|")])
            tables[tuple(c.strip() for c in line.strip("|").split("|"))] = rows
    return tables


def cell(text: str) -> tuple[float, float]:
    match = re.fullmatch(r"(-?\d+(?:\.\d+)?) ± (\d+(?:\.\d+)?)", text)
    assert match, f"not a 'mean ± std' cell: {text!r}"
    return float(match.group(1)), float(match.group(2))


TINY_MNIST = [
    "study",
    "--studies", "progress", "width",
    "--width", "0.0625",
    "--widths", "0.03125", "0.0625",
    "--checkpoints", "0", "0.5", "1",
    "--epochs", "1",
    "--seeds", "0", "1",
    "--limit-per-class", "20",
    "--test-limit-per-class", "20",
    "--batch-size", "16",
    "--lambdas", "3",
    "--max-iter", "20",
]  # fmt: skip


def test_tiny_study_writes_json_plots_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(cli.app, [*TINY_MNIST, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "progress.png", "study.json", "summary.md", "width.png",
    ]  # fmt: skip
    for png in ("progress.png", "width.png"):
        assert (out / png).read_bytes()[:8] == PNG_SIGNATURE
    data = json.loads((out / "study.json").read_text())
    assert data["format"] == "rebasin-study/1"
    assert data["seeds"] == [0, 1]
    assert data["config"]["studies"] == ["progress", "width"]
    assert data["config"]["widths"] == [0.03125, 0.0625]
    assert data["lambdas"] == [0.0, 0.5, 1.0]
    assert data["data"] == {"train_examples": 200, "test_examples": 200}
    points = data["points"]
    # 2 seeds x 3 checkpoints (progress) + 2 seeds x 2 widths (width).
    assert [(p["study"], p["epoch"], p["width"]) for p in points if p["seed"] == 0] == [
        ("progress", 0.0, 0.0625), ("progress", 0.5, 0.0625), ("progress", 1.0, 0.0625),
        ("width", 1.0, 0.03125), ("width", 1.0, 0.0625),
    ]  # fmt: skip
    assert len(points) == 10
    for p in points:
        assert {"model", "width", "params", "seed", "epoch", "steps", "train_examples",
                "endpoints", "methods", "matching", "train_seconds"} <= set(p)  # fmt: skip
        assert list(p["methods"]) == ["naive", "rebasin"]
        assert sum(p["train_examples"]) == 200
        for curve in p["methods"].values():
            assert set(BARRIERS) <= set(curve)
    # Region shards of 100 examples, batches of 16: 7 steps per epoch.
    assert [p["steps"] for p in points[:3]] == [[0, 0], [4, 4], [7, 7]]
    # The progress run's last checkpoint is the width study's model of the same width.
    for seed in (0, 1):
        last = next(p for p in points if p["study"] == "progress" and p["seed"] == seed
                    and p["epoch"] == 1.0)  # fmt: skip
        same = next(p for p in points if p["study"] == "width" and p["seed"] == seed
                    and p["width"] == 0.0625)  # fmt: skip
        assert last["methods"] == same["methods"]
    # The summary's statistics are those of the points.
    summary = data["summary"]
    rows = summary["width"]["rows"]
    assert [(r["width"], r["seeds"]) for r in rows] == [(0.03125, [0, 1]), (0.0625, [0, 1])]
    values = [p["methods"]["rebasin"]["accuracy_barrier"] for p in points
              if p["study"] == "width" and p["width"] == 0.03125]  # fmt: skip
    entry = rows[0]["methods"]["rebasin"]["accuracy_barrier"]
    assert entry["values"] == values
    assert entry["mean"] == pytest.approx(sum(values) / 2)
    assert set(summary["progress"]["rules"]) == {"naive", "rebasin"}
    # summary.md shows the JSON's numbers.
    markdown = (out / "summary.md").read_text()
    assert "![barrier against width](width.png)" in markdown
    assert "![barrier against training progress](progress.png)" in markdown
    tables = parse_tables(markdown)
    width_table = next(rows for header, rows in tables.items() if header[0] == "width")
    header = next(h for h in tables if h[0] == "width")
    column = header.index("re-basin acc. barrier (points)")
    assert width_table[0][0] == "0.03125 (16)"
    mean, std = cell(width_table[0][column])
    assert mean == pytest.approx(100 * entry["mean"], abs=0.005 + 1e-9)
    assert std == pytest.approx(100 * entry["std"], abs=0.005 + 1e-9)
    epochs = [r[0] for r in next(rows for h, rows in tables.items() if h[0] == "epoch")]
    assert epochs == ["0", "0.5", "1"]


def test_tiny_architecture_study(tmp_path: Path, small_data_dir: Path) -> None:
    out = tmp_path / "arch"
    args = [
        "study", "--studies", "architecture", "--dataset", "cifar10",
        "--data-dir", str(small_data_dir),
        "--models", "mlp", "vgg", "--params", "8000", "--epochs", "1", "--seeds", "0",
        "--limit-per-class", "10", "--test-limit-per-class", "5", "--batch-size", "16",
        "--lambdas", "3", "--repair-batches", "1", "--out", str(out),
    ]  # fmt: skip
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert (out / "architecture.png").read_bytes()[:8] == PNG_SIGNATURE
    data = json.loads((out / "study.json").read_text())
    rows = data["summary"]["architecture"]["rows"]
    assert [r["model"] for r in rows] == ["mlp", "vgg"]
    for r in rows:
        assert r["params"] == parameter_count(r["model"], "cifar10", r["width"])
        assert r["width"] == width_for_parameters(r["model"], "cifar10", 8000)
    # Only the model with BatchNorm gets the BN-reset curve.
    assert list(rows[0]["methods"]) == ["naive", "rebasin"]
    assert list(rows[1]["methods"]) == ["naive", "rebasin", "naive+bn-reset", "rebasin+bn-reset"]
    assert "## Architecture: about 8,000 parameters" in (out / "summary.md").read_text()
    # CIFAR-10 trains with augmentation by default; channels_last for the conv model only.
    used = {p["model"]: p["training"] for p in data["points"]}
    assert used["mlp"]["augment"] and used["vgg"]["augment"]
    assert (used["mlp"]["channels_last"], used["vgg"]["channels_last"]) == (False, True)
    assert used["vgg"]["bf16_requested"] == "auto"
    assert data["config"]["augment"] is None  # the dataset default, resolved per point


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--widths", "0", "1"], "--widths = (0.0, 1.0): widths must be > 0"),
        (
            ["--epochs", "2", "--checkpoints", "0", "3"],
            "checkpoints must lie in [0, epochs = 2], got [3.0]",
        ),
        (["--lambdas", "4"], "--lambdas = 4: must be odd so that the grid holds lambda = 0.5"),
        (
            ["--studies", "width", "--model", "vgg"],
            "model 'vgg' needs 3x32x32 images; use mlp for mnist",
        ),
        (["--studies", "architecture"], "need 3x32x32 images; use --dataset cifar10"),
        (["--seeds", "1", "1"], "seeds must be distinct, got [1, 1]"),
        (["--studies", "speed"], "--studies = 'speed'"),
        (["--dataset", "cifar10", "--studies", "architecture", "--params", "10"],
         "10 is out of that range"),
        (["--optimizer", "adam", "--nesterov"], "nesterov needs optimizer 'sgd', got 'adam'"),
        (["--label-smoothing", "inf"], "--label-smoothing = inf: Input should be"),
    ],
)  # fmt: skip
def test_bad_settings_are_named(args: list[str], message: str, tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["study", *args, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "x").exists()
