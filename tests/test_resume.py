"""``rebasin simulate --resume``: finished seeds kept, missing ones run, other settings refused,
the centralised baseline added to finished seeds (the same model a fresh run trains)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_runs import TINY
from typer.testing import CliRunner

from simulations import cli

runner = CliRunner()


def test_resume_keeps_finished_seeds_and_runs_only_the_missing_ones(
    tiny_run: tuple[Path, dict, str],
    tmp_path: Path,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import simulations.multiround
    import simulations.oneshot

    out, earlier, _ = tiny_run
    copy = tmp_path / "resumed"
    copy.mkdir()
    (copy / "results.json").write_bytes((out / "results.json").read_bytes())
    calls: list[tuple[str, int]] = []
    real_oneshot, real_multiround = (
        simulations.oneshot.run_oneshot,
        simulations.multiround.run_multiround,
    )

    def oneshot(cfg, seed, *args, **kwargs):
        calls.append(("one-shot", seed))
        return real_oneshot(cfg, seed, *args, **kwargs)

    def multiround(cfg, rounds, seed, *args, **kwargs):
        calls.append(("multi-round", seed))
        return real_multiround(cfg, rounds, seed, *args, **kwargs)

    monkeypatch.setattr(simulations.oneshot, "run_oneshot", oneshot)
    monkeypatch.setattr(simulations.multiround, "run_multiround", multiround)
    base = TINY + ["--mode", "both", "--rounds", "2", "--data-dir", str(data_dir)]
    args = base + ["--seeds", "0", "1", "2", "--out", str(copy), "--resume"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert calls == [("one-shot", 2), ("multi-round", 2)]
    resumed = json.loads((copy / "results.json").read_text())
    assert resumed["seeds"] == [0, 1, 2]
    for mode in ("one_shot", "multi_round"):
        runs = resumed[mode]["runs"]
        assert [r["seed"] for r in runs] == [0, 1, 2]
        assert runs[:2] == earlier[mode]["runs"]  # kept as they were, not rerun
    assert resumed["one_shot"]["summary"]["best_client"]["accuracy"]["n"] == 3
    assert resumed["earlier_environments"] == [{**earlier["environment"], "seeds": [0, 1]}]
    assert resumed["wall_seconds"] >= earlier["wall_seconds"]
    env = earlier["environment"]
    assert (
        f"- Resumed: seed(s) 0, 1 kept from the run of {env['date']} ({env['cpu']}, "
        f"{env['torch_threads']} torch thread(s), torch {env['torch']})"
    ) in (copy / "report.md").read_text()
    # The header reads model, its training, seeds, then where kept seeds came from.
    starts = ("- Model:", "- One-shot training:", "- Seeds:", "- Resumed:")
    header = (copy / "report.md").read_text().splitlines()
    at = [next(i for i, line in enumerate(header) if line.startswith(s)) for s in starts]
    assert at == list(range(at[0], at[0] + 4)), header[: at[-1] + 1]

    # Everything done: a resumed run trains nothing and keeps the file's runs.
    calls.clear()
    again = runner.invoke(cli.app, args)
    assert again.exit_code == 0, again.output
    assert calls == []
    assert (
        json.loads((copy / "results.json").read_text())["one_shot"]["runs"]
        == (resumed["one_shot"]["runs"])
    )

    # Other settings: refused, naming them, and the file is left alone.
    before = (copy / "results.json").read_bytes()
    other = runner.invoke(cli.app, [*args, "--epochs", "2", "--lr", "0.1"])
    assert other.exit_code == 2
    assert "cannot resume: the earlier results.json was made with other settings" in other.output
    assert "(experiment.epochs, experiment.lr)" in other.output
    assert (copy / "results.json").read_bytes() == before
    assert calls == []


def test_resume_adds_the_centralized_baseline_to_finished_seeds(
    tiny_run: tuple[Path, dict, str],
    tmp_path: Path,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import simulations.multiround
    import simulations.oneshot

    _, full, _ = tiny_run
    without = json.loads(json.dumps(full))
    without["config"]["experiment"]["centralized"] = False
    for run in without["one_shot"]["runs"]:
        del run["methods"]["centralized"]
        del run["train_seconds"]["centralized"]
    copy = tmp_path / "gains-centralized"
    copy.mkdir()
    (copy / "results.json").write_text(json.dumps(without))
    calls: list[tuple[str, int]] = []
    real = simulations.oneshot.run_centralized

    def centralized(cfg, seed, *args, **kwargs):
        calls.append(("centralized", seed))
        return real(cfg, seed, *args, **kwargs)

    def must_not_run(name: str):
        def fail(cfg, *args, **kwargs):
            raise AssertionError(f"{name} ran for a finished seed")

        return fail

    monkeypatch.setattr(simulations.oneshot, "run_centralized", centralized)
    monkeypatch.setattr(simulations.oneshot, "run_oneshot", must_not_run("run_oneshot"))
    monkeypatch.setattr(simulations.multiround, "run_multiround", must_not_run("multi-round"))
    args = TINY + ["--mode", "both", "--rounds", "2", "--data-dir", str(data_dir)]
    result = runner.invoke(cli.app, [*args, "--seeds", "0", "1", "--out", str(copy), "--resume"])
    assert result.exit_code == 0, result.output
    assert calls == [("centralized", 0), ("centralized", 1)]
    resumed = json.loads((copy / "results.json").read_text())
    assert resumed["config"]["experiment"]["centralized"] is True
    for got, want in zip(resumed["one_shot"]["runs"], full["one_shot"]["runs"], strict=True):
        # The same data, initialisation and order as a fresh run: the same model.
        assert got["methods"] == want["methods"]
        assert list(got["methods"])[-1] == "centralized"
        assert got["train_seconds"]["centralized"] > 0
    assert (
        resumed["one_shot"]["summary"]["methods"]["centralized"]
        == (full["one_shot"]["summary"]["methods"]["centralized"])
    )
    assert resumed["multi_round"]["runs"] == full["multi_round"]["runs"]

    # The other way round is refused: a baseline is not dropped from finished seeds.
    (copy / "results.json").write_text(json.dumps(full))
    refused = runner.invoke(
        cli.app,
        [*args, "--seeds", "0", "1", "--out", str(copy), "--resume", "--no-centralized"],
    )
    assert refused.exit_code == 2
    assert "other settings (experiment.centralized)" in refused.output


def _copy_of(results: dict, folder: Path) -> Path:
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_resume_refuses_what_would_lose_or_mix_seeds(
    tiny_run: tuple[Path, dict, str], tmp_path: Path, data_dir: Path
) -> None:
    _, earlier, _ = tiny_run
    args = TINY + ["--mode", "both", "--rounds", "2", "--data-dir", str(data_dir), "--resume"]

    # Seeds the file holds but --seeds leaves out would be dropped from the rewritten file.
    copy = _copy_of(earlier, tmp_path / "fewer")
    before = (copy / "results.json").read_bytes()
    fewer = runner.invoke(cli.app, [*args, "--seeds", "1", "2", "--out", str(copy)])
    assert fewer.exit_code == 2
    assert (
        "cannot resume: the earlier results.json holds seed(s) 0 that --seeds leaves out; "
        "list every seed (--seeds 0 1 2)"
    ) in " ".join(fewer.output.split())
    assert (copy / "results.json").read_bytes() == before

    # The same settings, but a kept seed trained otherwise than this machine would.
    other = json.loads(json.dumps(earlier))
    other["one_shot"]["runs"][1]["training"]["label_smoothing"] = 0.3
    copy = _copy_of(other, tmp_path / "trained-otherwise")
    refused = runner.invoke(cli.app, [*args, "--seeds", "0", "1", "2", "--out", str(copy)])
    assert refused.exit_code == 2
    assert (
        "cannot resume: seed 1 was trained otherwise than this machine would train the new "
        "seeds (label_smoothing: 0.3 there, 0.0 here)"
    ) in " ".join(refused.output.split())

    # A file that is not a results file is named, not a traceback.
    copy = tmp_path / "corrupt"
    copy.mkdir()
    (copy / "results.json").write_text("{not json")
    corrupt = runner.invoke(cli.app, [*args, "--seeds", "0", "--out", str(copy)])
    assert corrupt.exit_code == 2
    flat = " ".join(corrupt.output.split())
    assert "cannot resume:" in flat
    assert "is not a rebasin-simulate/1 results file (not JSON:" in flat


def test_an_interrupted_resume_keeps_every_finished_seed(
    tiny_run: tuple[Path, dict, str],
    tmp_path: Path,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import simulations.multiround

    _, full, _ = tiny_run
    # The file holds seed 1 of both modes; the resumed run adds seed 0 and stops during
    # its multi-round run. Each write holds every finished run, kept ones included.
    only_1 = json.loads(json.dumps(full))
    for mode in ("one_shot", "multi_round"):
        only_1[mode]["runs"] = [r for r in only_1[mode]["runs"] if r["seed"] == 1]
    copy = _copy_of(only_1, tmp_path / "interrupted")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(simulations.multiround, "run_multiround", interrupted)
    args = TINY + ["--mode", "both", "--rounds", "2", "--data-dir", str(data_dir)]
    result = runner.invoke(cli.app, [*args, "--seeds", "0", "1", "--out", str(copy), "--resume"])
    assert result.exit_code != 0
    written = json.loads((copy / "results.json").read_text())
    assert [r["seed"] for r in written["one_shot"]["runs"]] == [0, 1]
    # Seed 0 is the fresh run's seed 0; seed 1 is kept as it was.
    assert written["one_shot"]["runs"][0]["methods"] == full["one_shot"]["runs"][0]["methods"]
    assert written["one_shot"]["runs"][1] == full["one_shot"]["runs"][1]
    assert written["one_shot"]["summary"]["methods"] == full["one_shot"]["summary"]["methods"]
    assert written["multi_round"]["runs"] == [full["multi_round"]["runs"][1]]


def test_a_multi_round_resume_ignores_the_centralized_setting(
    tiny_run: tuple[Path, dict, str],
    tmp_path: Path,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import simulations.multiround

    _, full, _ = tiny_run
    rounds_only = json.loads(json.dumps(full))
    rounds_only["config"]["mode"] = "multi-round"
    del rounds_only["one_shot"]
    copy = _copy_of(rounds_only, tmp_path / "rounds-only")

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished multi-round seed ran again")

    monkeypatch.setattr(simulations.multiround, "run_multiround", must_not_run)
    args = TINY + ["--mode", "multi-round", "--rounds", "2", "--data-dir", str(data_dir)]
    result = runner.invoke(
        cli.app,
        [*args, "--seeds", "0", "1", "--out", str(copy), "--resume", "--no-centralized"],
    )
    assert result.exit_code == 0, result.output
    written = json.loads((copy / "results.json").read_text())
    assert written["multi_round"]["runs"] == full["multi_round"]["runs"]
