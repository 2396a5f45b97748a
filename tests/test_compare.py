"""``rebasin compare``: finished runs side by side, every number traced back to results.json.

Two tiny MNIST MLP runs (widths 0.125 and 0.25, seeds 0 and 1) are the family; the numbers
are meaningless, their agreement with the runs' files is what is checked.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from tiny_runs import TINY
from typer.testing import CliRunner

from rebasin.zoo import build_model
from simulations import cli
from simulations.compare import compare_runs, precision, repaired_barrier
from simulations.results import read_results

runner = CliRunner()

# The shared tiny run without the centralised baseline; a later --width wins over TINY's.
ARGS = [*TINY, "--no-centralized", "--seeds", "0", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> list[Path]:
    """The wider run first: the comparison sorts by size, not by the order given."""
    root = tmp_path_factory.mktemp("compare")
    out = []
    for width in ("0.25", "0.125"):
        run = root / f"mlp-w{width}"
        args = [*ARGS, "--width", width, "--data-dir", str(data_dir), "--out", str(run)]
        result = runner.invoke(cli.app, args)
        assert result.exit_code == 0, result.output
        out.append(run)
    return out


def test_compare_rows_come_from_the_runs(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = runner.invoke(cli.app, ["compare", *map(str, runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "compare.json").read_text())
    assert data["format"] == "rebasin-compare/1"
    assert data["runs"] == ["mlp-w0.25", "mlp-w0.125"]
    assert [r["run"] for r in data["rows"]] == ["mlp-w0.125", "mlp-w0.25"]  # by size
    assert (out / "trend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in data["rows"]:
        results = read_results(runs[0].parent / row["run"])
        width = results["config"]["experiment"]["width"]
        model = build_model("mlp", "mnist", width=width)
        assert row["params"] == sum(p.numel() for p in model.parameters())
        assert row["family"] == "mlp"
        assert row["precision"] == "fp32"  # MNIST keeps the plain loop: no autocast
        best = [max(c["accuracy"] for c in r["clients"]) for r in results["one_shot"]["runs"]]
        assert row["best_client"]["values"] == best
        assert row["lowest_client"] == min(
            c["accuracy"] for r in results["one_shot"]["runs"] for c in r["clients"]
        )
        for method, entry in row["methods"].items():
            sources = {"repaired": "rebasin+repair", "naive-repaired": "naive+repair"}
            source = sources.get(method, method)
            accs = [r["methods"][source]["accuracy"] for r in results["one_shot"]["runs"]]
            assert entry["accuracy"]["values"] == accs
            assert entry["gap"]["values"] == [a - b for a, b in zip(accs, best, strict=True)]
        assert row["methods"]["repaired"]["method"] == "rebasin+repair"  # no BatchNorm
        assert row["methods"]["naive-repaired"]["method"] == "naive+repair"
        curves = results["one_shot"]["summary"]["interpolation"]
        assert row["accuracy_barriers"] == {m: c["accuracy_barrier"] for m, c in curves.items()}
    small, large = data["rows"]
    assert data["trends"] == [
        {
            "family": "mlp",
            "from": {"run": "mlp-w0.125", "params": small["params"]},
            "to": {"run": "mlp-w0.25", "params": large["params"]},
            "gap_from": small["methods"]["repaired"]["gap"]["mean"],
            "gap_to": large["methods"]["repaired"]["gap"]["mean"],
        }
    ]
    report = (out / "compare.md").read_text()
    gap = small["methods"]["repaired"]["gap"]
    cell = f"{100 * gap['mean']:+.2f} ± {100 * gap['std']:.2f}"
    assert f"| mlp-w0.125 | {small['params']:,} | {small['epochs']} | fp32 | 0 1 |" in report
    assert "| naive barrier | re-basin barrier | re-basin + repair barrier |" in report
    assert "| naive | naive + repair | re-basin | MergeMany | re-basin + repair |" in report
    assert repaired_barrier(small) == small["accuracy_barriers"].get("rebasin+repair")
    assert cell in report
    assert (
        f"- mlp: re-basin + repair is {100 * data['trends'][0]['gap_from']:+.2f} points from the "
        f"best client at {small['params']:,} parameters and "
        f"{100 * data['trends'][0]['gap_to']:+.2f} at {large['params']:,}."
    ) in report


def test_precision_names_what_the_seeds_trained_in() -> None:
    def runs(*flags: bool) -> list[dict]:
        return [{"training": {"bf16": flag}} for flag in flags]

    assert precision(runs(True, True)) == "bf16"
    assert precision(runs(False, False)) == "fp32"
    assert precision(runs(True, False)) == "mixed"
    assert precision([{}]) == "fp32"  # results from before training was recorded


def test_compare_refuses_runs_that_are_not_comparable(runs: list[Path], tmp_path: Path) -> None:
    wide, narrow = (read_results(r) for r in runs)
    with pytest.raises(ValueError, match="compare needs at least two runs, got 1"):
        compare_runs([wide])
    longer = copy.deepcopy(narrow)
    longer["config"]["experiment"]["epochs"] = 3
    longer["config"]["experiment"]["lr"] = 0.1
    with pytest.raises(
        ValueError,
        match=r"runs 'mlp-w0.25' and 'mlp-w0.125' are both mlp but differ in "
        r"experiment.epochs, experiment.lr: a family's runs may differ in width only",
    ):
        compare_runs([wide, longer])
    # The same settings, but one run trained in bf16 ("auto" on another CPU).
    in_bf16 = copy.deepcopy(narrow)
    in_bf16["one_shot"]["runs"][1]["training"]["bf16"] = True
    with pytest.raises(
        ValueError,
        match=r"runs 'mlp-w0.25' and 'mlp-w0.125' are both mlp but differ in training: a "
        "family's runs may differ in width only",
    ):
        compare_runs([wide, in_bf16])
    # The centralised baseline is one more row, not another experiment.
    central = copy.deepcopy(narrow)
    central["config"]["experiment"]["centralized"] = True
    for run in central["one_shot"]["runs"]:
        run["methods"]["centralized"] = {**run["methods"]["naive"], "accuracy": 0.5}
    rows = {r["run"]: r for r in compare_runs([wide, central])["rows"]}
    assert rows["mlp-w0.125"]["methods"]["centralized"]["accuracy"]["values"] == [0.5, 0.5]
    assert "centralized" not in rows["mlp-w0.25"]["methods"]
    renamed = copy.deepcopy(wide)
    renamed["name"] = "mlp-w0.25-again"
    with pytest.raises(
        ValueError,
        match=r"runs 'mlp-w0.25' and 'mlp-w0.25-again' are the same experiment "
        r"\(mlp at width 0.25\)",
    ):
        compare_runs([wide, renamed])
    # A repeated width is caught against every earlier run of the family, not the first only.
    with pytest.raises(ValueError, match=r"runs 'mlp-w0.125' and 'mlp-w0.25-again'"):
        compare_runs([narrow, wide, {**renamed, "config": narrow["config"]}])
    with pytest.raises(
        ValueError,
        match=r"two runs are named 'mlp-w0.25' \(a run is named by its folder\): compare runs "
        "of distinct folder names",
    ):
        compare_runs([wide, copy.deepcopy(wide)])
    # Across families too, the rows must be measured on one test set, split and seeds.
    fewer_tests = copy.deepcopy(narrow)
    fewer_tests["config"]["experiment"]["model"] = "vit"
    fewer_tests["config"]["experiment"]["test_limit_per_class"] = 10
    with pytest.raises(
        ValueError,
        match="run 'mlp-w0.125' has test_limit_per_class 10, but 'mlp-w0.25' has 30: compare "
        "runs of one data set, split and seeds",
    ):
        compare_runs([wide, fewer_tests])
    unfinished = copy.deepcopy(narrow)
    unfinished["one_shot"]["runs"] = unfinished["one_shot"]["runs"][:1]
    with pytest.raises(
        ValueError,
        match=r"run 'mlp-w0.125' is not finished: it holds seed\(s\) 0 of 0, 1 \(resume it "
        r"first\)",
    ):
        compare_runs([wide, unfinished])
    no_summary = copy.deepcopy(narrow)
    del no_summary["one_shot"]["summary"]
    with pytest.raises(
        ValueError,
        match=r"run 'mlp-w0.125' lacks 'summary' \(not a complete rebasin-simulate/1 run\)",
    ):
        compare_runs([wide, no_summary])
    other = copy.deepcopy(narrow)
    other["config"]["experiment"]["dataset"] = "cifar10"
    with pytest.raises(ValueError, match="has dataset 'cifar10', but 'mlp-w0.25' has 'mnist'"):
        compare_runs([wide, other])
    multi_only = copy.deepcopy(narrow)
    del multi_only["one_shot"]
    with pytest.raises(ValueError, match="run 'mlp-w0.125' has no one-shot runs to compare"):
        compare_runs([wide, multi_only])
    missing = runner.invoke(cli.app, ["compare", str(runs[0]), str(tmp_path / "none")])
    assert missing.exit_code == 1
    assert "no results.json in" in missing.output
