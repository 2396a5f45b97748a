"""The ``rebasin simulate`` command: end-to-end outputs, report == JSON, validation at the edge.

The end-to-end run is tiny (30 MNIST training examples per class, one epoch, an MLP of width
0.125, two seeds, two federated rounds): the numbers are meaningless, the files and their
agreement are what is checked.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from tiny_runs import TINY
from typer.testing import CliRunner

from simulations import cli

runner = CliRunner()

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------
# helpers


def parse_tables(markdown: str) -> dict[tuple[str, ...], list[list[str]]]:
    """Every Markdown table of ``markdown``: header cells -> rows of cells."""
    tables: dict[tuple[str, ...], list[list[str]]] = {}
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|:"):
            header = tuple(c.strip() for c in lines[i].strip("|").split("|"))
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            tables[header] = rows
        else:
            i += 1
    return tables


def cell(text: str) -> tuple[float, float]:
    """``"12.34 ± 0.56"`` -> ``(12.34, 0.56)``."""
    match = re.fullmatch(r"(-?\d+(?:\.\d+)?) ± (\d+(?:\.\d+)?)", text)
    assert match, f"not a 'mean ± std' cell: {text!r}"
    return float(match.group(1)), float(match.group(2))


def assert_shown(text: str, entry: dict, scale: float, digits: int) -> None:
    """The cell shows ``entry``'s mean and std (times ``scale``) to ``digits`` decimals."""
    mean, std = cell(text)
    half = 0.5 * 10**-digits + 1e-9
    assert abs(mean - scale * entry["mean"]) <= half, (text, entry)
    assert abs(std - scale * entry["std"]) <= half, (text, entry)


# ------------------------------------------------------------------------------------------
# end to end


def test_simulate_writes_json_report_and_plots(tiny_run: tuple[Path, dict, str]) -> None:
    out, results, report = tiny_run
    for name in ("interpolation.png", "per_class.png", "rounds.png", "per_class_rounds.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        assert len(data) > 5_000, name
        assert f"]({name})" in report  # embedded in the report
    assert results["format"] == "rebasin-simulate/1"
    assert results["seeds"] == [0, 1]
    config = results["config"]
    assert config["scenario"] == "us-eu" and config["mode"] == "both"
    assert config["experiment"]["partition"] == "region"
    assert config["experiment"]["num_clients"] == 2
    assert config["experiment"]["own_fraction"] == 0.8
    assert config["multi_round"]["rounds"] == 2
    assert config["multi_round"]["reference"] is None  # resolved to "largest" (independent)
    runs = results["one_shot"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    for run in runs:
        # 30 examples per class, 80/20 region split: 5 * 24 + 5 * 6 = 150 per region
        assert run["shard_sizes"] == [150, 150]
        assert run["shard_class_counts"][0] == [24] * 5 + [6] * 5
        assert len(run["clients"]) == 2
        assert set(run["methods"]) == {
            "naive", "rebasin", "merge-many", "naive+repair", "rebasin+repair", "ensemble",
            "centralized",
        }  # fmt: skip
        for metrics in [*run["clients"], *run["methods"].values()]:
            assert 0.0 <= metrics["accuracy"] <= 1.0
            assert len(metrics["per_class_accuracy"]) == 10
        assert run["interpolation"]["naive"]["lambdas"] == [0.0, 0.5, 1.0]
    # Both interpolation paths start at client 0 and end at client 1 (re-basin permutes
    # client 1, which changes nothing about its function).
    for run in runs:
        for curve in run["interpolation"].values():
            assert curve["accuracy"][0] == pytest.approx(run["clients"][0]["accuracy"])
            assert curve["accuracy"][-1] == pytest.approx(run["clients"][1]["accuracy"], abs=1e-6)
        # Equal shards: the re-basin path's midpoint is the re-basin merge itself (one
        # alignment, the merge's), not another matching's local optimum.
        middle = run["interpolation"]["rebasin"]
        assert middle["accuracy"][1] == pytest.approx(run["methods"]["rebasin"]["accuracy"])
        assert middle["loss"][1] == pytest.approx(run["methods"]["rebasin"]["loss"], rel=1e-5)
    rounds = results["multi_round"]["runs"]
    assert [r["seed"] for r in rounds] == [0, 1]
    for run in rounds:
        assert run["rounds"] == [0, 1, 2]
        assert set(run["strategies"]) == {"fedavg", "rebasin"}
        for strategy in run["strategies"].values():
            assert len(strategy["server"]["accuracy"]) == 3
            assert strategy["clients"]["accuracy"][0] is None  # no client evaluation at round 0
            assert all(a is not None for a in strategy["clients"]["accuracy"][1:])
        # Same initial global model for both strategies.
        fedavg, rebasin = run["strategies"]["fedavg"], run["strategies"]["rebasin"]
        assert fedavg["server"]["loss"][0] == rebasin["server"]["loss"][0]
        # Independent start: round 1 trains the same client models under both strategies.
        assert fedavg["train_loss"][1] == pytest.approx(rebasin["train_loss"][1])


def test_summary_is_mean_and_sample_std_of_the_seeds(tiny_run: tuple[Path, dict, str]) -> None:
    _, results, _ = tiny_run
    runs = results["one_shot"]["runs"]
    summary = results["one_shot"]["summary"]
    for method, entry in summary["methods"].items():
        values = [run["methods"][method]["accuracy"] for run in runs]
        assert entry["accuracy"]["values"] == values
        assert entry["accuracy"]["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert entry["accuracy"]["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    best = [max(c["accuracy"] for c in run["clients"]) for run in runs]
    assert summary["best_client"]["accuracy"]["values"] == best
    rounds = results["multi_round"]
    fedavg = rounds["summary"]["strategies"]["fedavg"]
    per_round = [run["strategies"]["fedavg"]["server"]["accuracy"] for run in rounds["runs"]]
    assert fedavg["server_accuracy"]["mean"] == pytest.approx(np.mean(per_round, axis=0))


def test_report_numbers_equal_the_json(tiny_run: tuple[Path, dict, str]) -> None:
    _, results, report = tiny_run
    tables = parse_tables(report)
    summary = results["one_shot"]["summary"]

    methods = tables[("model", "test accuracy (%)", "test loss")]
    shown = {row[0]: row for row in methods}
    assert set(shown) == set(summary["methods"]) | {"best single client"}
    for name, entry in summary["methods"].items():
        assert_shown(shown[name][1], entry["accuracy"], 100.0, 2)
        assert_shown(shown[name][2], entry["loss"], 1.0, 4)
    assert_shown(shown["best single client"][1], summary["best_client"]["accuracy"], 100.0, 2)

    clients = tables[
        ("client", "region / name", "training examples", "test accuracy (%)", "test loss")
    ]
    assert [row[:2] for row in clients] == [["client 0", "us"], ["client 1", "eu"]]
    for row in clients:
        assert_shown(row[3], summary["clients"][row[0]]["accuracy"], 100.0, 2)
        assert_shown(row[4], summary["clients"][row[0]]["loss"], 1.0, 4)

    groups = tables[("model", "us classes (%)", "eu classes (%)")]
    assert len(groups) == 2 + len(summary["methods"])
    for row in groups:
        for g, text in enumerate(row[1:]):
            assert_shown(text, summary["group_accuracy"][row[0]][g], 100.0, 2)

    seeds = tables[("model", "seed 0", "seed 1")]
    for row in seeds:
        for run, text in zip(results["one_shot"]["runs"], row[1:]):
            model = run["methods"].get(row[0]) or run["clients"][int(row[0].split()[1])]
            assert float(text) == pytest.approx(100 * model["accuracy"], abs=0.005 + 1e-9)

    interp = next(rows for header, rows in tables.items() if header[0] == "path")
    for row in interp:
        data = summary["interpolation"][row[0]]
        assert_shown(row[3], data["accuracy_barrier"], 100.0, 2)
        assert_shown(row[4], data["loss_barrier"], 1.0, 4)
        mid = data["lambdas"].index(0.5)
        point = {"mean": data["accuracy"]["mean"][mid], "std": data["accuracy"]["std"][mid]}
        assert_shown(row[1], point, 100.0, 2)

    per_round = tables[
        (
            "round",
            "FedAvg accuracy (%)",
            "ReBasinFedAvg accuracy (%)",
            "FedAvg loss",
            "ReBasinFedAvg loss",
        )
    ]
    strategies = results["multi_round"]["summary"]["strategies"]
    assert [row[0] for row in per_round] == ["0", "1", "2"]
    for i, row in enumerate(per_round):
        for text, name, key, scale, digits in (
            (row[1], "fedavg", "server_accuracy", 100.0, 2),
            (row[2], "rebasin", "server_accuracy", 100.0, 2),
            (row[3], "fedavg", "server_loss", 1.0, 4),
            (row[4], "rebasin", "server_loss", 1.0, 4),
        ):
            series = strategies[name][key]
            assert_shown(text, {"mean": series["mean"][i], "std": series["std"][i]}, scale, digits)
    final = next(rows for header, rows in tables.items() if header[0] == "strategy")
    for row, name in zip(final, ("fedavg", "rebasin")):
        assert_shown(row[1], strategies[name]["final_accuracy"], 100.0, 2)
        assert_shown(row[2], strategies[name]["final_loss"], 1.0, 4)


# ------------------------------------------------------------------------------------------
# validation at the edge


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "-1"], "--width = -1.0: Input should be greater than 0"),
        (["--dataset", "imagenet"], "--dataset = 'imagenet': Input should be 'mnist' or 'cifar10'"),
        (["--scenario", "moon"], "--scenario = 'moon': expected one of 'us-eu'"),
        (["--model", "vgg"], "model 'vgg' needs 3x32x32 images; use mlp for mnist"),
        (["--seeds", "0", "1", "0"], "seeds must be distinct, got [0, 1, 0]"),
        (["--mode", "sometimes"], "--mode = 'sometimes': Input should be 'one-shot'"),
        (
            ["--own-fraction", "1.5"],
            "--own-fraction = 1.5: Input should be less than or equal to 1",
        ),
        (["--clients", "1"], "merging needs at least 2 clients, got 1"),
        (["--epochs", "0"], "--epochs = 0: Input should be greater than or equal to 1"),
        (
            ["--mode", "multi-round", "--bn-recalibration"],
            "'bn-recalibration' = True needs a model with BatchNorm",
        ),
        (["--mode", "both", "--strategies", "fedavg", "fedavg"], "strategies must be distinct"),
        (["--threads", "0"], "--threads = 0: must be >= 1"),
        (["--label-smoothing", "1"], "--label-smoothing = 1.0: Input should be less than 1"),
        (["--label-smoothing", "-0.1"], "--label-smoothing = -0.1: Input should be greater"),
        (["--schedule", "step"], "--schedule = 'step': Input should be 'cosine', 'onecycle'"),
        (["--bf16", "yes"], "--bf16 = 'yes': Input should be 'auto', 'on' or 'off'"),
        (["--schedule", "onecycle", "--max-lr", "nan"], "--max-lr = nan: Input should be a finite"),
        (["--schedule", "onecycle", "--max-lr", "0"], "--max-lr = 0.0: Input should be greater"),
        (["--max-lr", "0.1"], "max_lr is the one-cycle peak; it needs schedule 'onecycle'"),
        (["--optimizer", "adam", "--nesterov"], "nesterov needs optimizer 'sgd', got 'adam'"),
    ],
)
def test_bad_values_exit_nonzero_with_a_message(args: list[str], message: str) -> None:
    result = runner.invoke(cli.app, ["simulate", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output


def test_missing_data_names_the_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-data-here"
    result = runner.invoke(
        cli.app, [*TINY, "--data-dir", str(missing), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 1
    assert f"MNIST not found in data directory {missing}" in " ".join(result.output.split())


def test_non_numeric_value_is_a_usage_error() -> None:
    result = runner.invoke(cli.app, ["simulate", "--epochs", "many"])
    assert result.exit_code == 2
    assert "'many' is not a valid integer" in result.output


@pytest.mark.parametrize(
    ("args", "seeds", "strategies"),
    [
        (["--seeds", "0", "1", "2"], (0, 1, 2), ("fedavg", "rebasin")),
        (["--seeds", "3", "--seeds", "4"], (3, 4), ("fedavg", "rebasin")),
        (["--seeds=5", "6", "--strategies", "rebasin"], (5, 6), ("rebasin",)),
        (["--strategies", "rebasin", "fedavg", "--seeds", "7"], (7,), ("rebasin", "fedavg")),
    ],
)
def test_list_options_take_several_values(
    monkeypatch: pytest.MonkeyPatch, args: list[str], seeds: tuple, strategies: tuple
) -> None:
    captured = {}
    monkeypatch.setattr(
        cli, "_run", lambda cfg, out, data_dir, threads, resume: captured.update(cfg=cfg)
    )
    result = runner.invoke(cli.app, ["simulate", "--mode", "both", *args, "--rounds", "3"])
    assert result.exit_code == 0, result.output
    cfg = captured["cfg"]
    assert cfg.seeds == seeds
    assert cfg.multi_round.strategies == strategies
    assert cfg.multi_round.rounds == 3
    assert cfg.experiment.num_clients == 2  # us-eu default: two regions


def test_training_options_reach_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    from rebasin.recipe import TrainRecipe

    captured = []
    monkeypatch.setattr(
        cli, "_run", lambda cfg, out, data_dir, threads, resume: captured.append(cfg)
    )
    cifar = ["simulate", "--dataset", "cifar10", "--model", "vgg"]
    options = [
        "--label-smoothing", "0.1", "--schedule", "onecycle", "--max-lr", "0.1", "--nesterov",
        "--no-channels-last", "--bf16", "off",
    ]  # fmt: skip
    for args in (cifar, [*cifar, *options, "--no-augment"], ["simulate"]):
        result = runner.invoke(cli.app, args)
        assert result.exit_code == 0, result.output
    default, chosen, mnist = (c.experiment.recipe() for c in captured)
    assert default == TrainRecipe(augment=True, channels_last=True, bf16="auto")
    assert chosen == TrainRecipe(
        augment=False,
        label_smoothing=0.1,
        schedule="onecycle",
        max_lr=0.1,
        nesterov=True,
        channels_last=False,
        bf16="off",
    )
    assert mnist == TrainRecipe()


def test_tiny_run_records_the_training_it_used(tiny_run: tuple[Path, dict, str]) -> None:
    _, results, report = tiny_run
    for run in results["one_shot"]["runs"]:
        used = run["training"]
        assert used["augment"] is False and used["bf16"] is False
        assert used["channels_last"] is False and used["schedule"] == "cosine"
        assert used["bf16_requested"] == "off" and used["peak_lr"] == 0.05
        assert set(run["train_seconds"]) == {"client 0", "client 1", "centralized"}
    assert (
        "- One-shot training: augmentation none; cosine schedule; label smoothing 0; "
        "channels_last no; bf16 autocast no (requested off, "
    ) in report


def test_report_says_per_seed_where_bf16_was_supported_when_the_machines_differed(
    tiny_run: tuple[Path, dict, str],
) -> None:
    import copy

    from simulations.report import render_report

    _, results, _ = tiny_run
    resumed = copy.deepcopy(results)
    for run in resumed["one_shot"]["runs"]:
        run["training"]["bf16_supported"] = False
    assert "bf16 autocast no (requested off, not supported on cpu)\n" in render_report(resumed)
    # A run resumed on a CPU with bf16 units: its seed 1 trained there (in fp32, as asked).
    resumed["one_shot"]["runs"][1]["training"]["bf16_supported"] = True
    assert (
        "bf16 autocast no (requested off, supported on the cpu of seed(s) 1, not on that of "
        "seed(s) 0)\n"
    ) in render_report(resumed)
    for run in resumed["one_shot"]["runs"]:
        run["training"]["bf16_supported"] = True
    assert "(requested off, supported on cpu)\n" in render_report(resumed)


def test_report_names_the_norm_only_for_models_that_have_one(
    tiny_run: tuple[Path, dict, str],
) -> None:
    import copy

    from simulations.report import render_report

    _, results, report = tiny_run
    assert "- Model: mlp width 0.125; 1 epoch(s)" in report
    for model, line in (("vit", "- Model: vit width 0.125; 1"), ("vgg", ", norm batch; 1")):
        other = copy.deepcopy(results)
        other["config"]["experiment"]["model"] = model
        assert line in render_report(other)


def test_report_of_an_unfinished_run_says_which_seeds_its_cells_hold(
    tiny_run: tuple[Path, dict, str],
) -> None:
    import copy

    from simulations.report import render_report

    _, results, report = tiny_run
    assert "- Seeds: 0, 1 (cells: mean ± sample std over the seeds)" in report
    # A long run is written after every seed: seed 1's one-shot and multi-round runs not yet.
    partial = copy.deepcopy(results)
    partial["one_shot"]["runs"] = partial["one_shot"]["runs"][:1]
    partial["multi_round"]["runs"] = partial["multi_round"]["runs"][:1]
    assert (
        "- Seeds: 0, 1; **not finished**: the cells hold only seeds one-shot 0; multi-round 0 "
        "(mean ± sample std over those; 0 for one seed)"
    ) in render_report(partial)
    # What a "both" run writes between its last one-shot and first multi-round seed.
    between = copy.deepcopy(results)
    del between["multi_round"]
    assert (
        "- Seeds: 0, 1; **not finished**: the cells hold only seeds one-shot 0, 1; multi-round "
        "none (mean ± sample std over those; 0 for one seed)"
    ) in render_report(between)


def test_scenarios_pick_their_partition_and_client_count(monkeypatch: pytest.MonkeyPatch) -> None:
    captured = []
    monkeypatch.setattr(
        cli, "_run", lambda cfg, out, data_dir, threads, resume: captured.append(cfg)
    )
    for args in (["--scenario", "dirichlet", "--alpha", "0.3"], ["--scenario", "pathological"]):
        assert runner.invoke(cli.app, ["simulate", *args]).exit_code == 0
    dirichlet, pathological = captured
    assert (dirichlet.experiment.partition, dirichlet.experiment.num_clients) == ("dirichlet", 5)
    assert dirichlet.experiment.alpha == 0.3
    assert pathological.experiment.partition == "pathological"
    assert pathological.multi_round is None  # one-shot by default


def test_report_command_redraws_from_the_json(
    tiny_run: tuple[Path, dict, str], tmp_path: Path
) -> None:
    out, _, report = tiny_run
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "results.json").write_bytes((out / "results.json").read_bytes())
    result = runner.invoke(cli.app, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    assert (copy / "report.md").read_text() == report
    assert sorted(p.name for p in copy.glob("*.png")) == [
        "interpolation.png", "per_class.png", "per_class_rounds.png", "rounds.png"
    ]  # fmt: skip
    missing = runner.invoke(cli.app, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 1
    assert "no results.json in" in missing.output


def test_download_flag_fetches_both_splits_before_the_run(monkeypatch, tmp_path) -> None:
    import rebasin.data
    import simulations.cli as cli

    calls = []
    monkeypatch.setattr(
        rebasin.data, "load_dataset", lambda *a, **k: calls.append((a, k["download"]))
    )
    cli.fetch_dataset("cifar10", tmp_path)
    assert calls == [(("cifar10", True, tmp_path), True), (("cifar10", False, tmp_path), True)]

    class Fetched(Exception):
        pass

    def fetch(dataset, data_dir):
        raise Fetched(dataset, data_dir)

    monkeypatch.setattr(cli, "fetch_dataset", fetch)
    result = CliRunner().invoke(
        cli.app, ["simulate", "--download", "--data-dir", str(tmp_path), "--out", str(tmp_path)]
    )
    assert isinstance(result.exception, Fetched)
    assert result.exception.args == ("mnist", tmp_path)


def test_vit_one_shot_also_merges_over_the_residual_stream_only(
    tmp_path: Path, data_dir: Path
) -> None:
    """``--model vit``: re-basin with heads (``rebasin``) and without (``rebasin-stream``),
    both merged and on the interpolation path; no REPAIR (it measures conv-style maps)."""
    out = tmp_path / "vit"
    args = [a if a != "mlp" else "vit" for a in TINY] + [
        "--seeds", "0", "--no-centralized", "--data-dir", str(data_dir), "--out", str(out),
    ]  # fmt: skip
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "results.json").read_text())["one_shot"]["runs"][0]
    assert list(run["methods"]) == [
        "naive", "rebasin", "merge-many", "rebasin-stream", "ensemble",
    ]  # fmt: skip
    assert list(run["interpolation"]) == ["naive", "rebasin", "rebasin-stream"]
    assert (out / "interpolation.png").read_bytes().startswith(PNG_SIGNATURE)
