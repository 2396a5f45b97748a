"""A whole ``simulate`` run: scenario -> settings -> every seed -> results.json, report, plots.

:class:`SimulateConfig` is the one validated description of a run (the CLI builds it from
its flags; every field lands in ``results.json``). :func:`run_simulate` runs the one-shot
and/or multi-round experiment for every seed and writes the outputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from rich.progress import Progress

from simulations.multiround import MultiRoundConfig
from simulations.oneshot import OneShotConfig
from simulations.results import differing_settings
from simulations.settings import check_seeds

logger = logging.getLogger(__name__)

Scenario = Literal["us-eu", "dirichlet", "pathological"]
Mode = Literal["one-shot", "multi-round", "both"]

# Which partitioner each scenario uses, and its default number of clients.
SCENARIO_PARTITION: dict[str, str] = {
    "us-eu": "region",
    "dirichlet": "dirichlet",
    "pathological": "pathological",
}
SCENARIO_CLIENTS: dict[str, int] = {"us-eu": 2, "dirichlet": 5, "pathological": 5}


# The setting a resumed run may switch on for its kept seeds.
CENTRALIZED = "experiment.centralized"


class ResumeMismatchError(ValueError):
    """An earlier ``results.json`` in the output folder was made with other settings."""


class SimulateConfig(BaseModel):
    """Everything that defines a ``simulate`` run.

    Attributes
    ----------
    scenario
        ``us-eu`` (region split: each of ``num_clients`` regions holds ``own_fraction`` of
        its own classes and an equal share of the rest), ``dirichlet`` (label skew,
        ``alpha``) or ``pathological`` (``classes_per_client`` classes per client).
    mode
        ``one-shot``, ``multi-round`` or ``both``.
    seeds
        Distinct, non-negative; every experiment runs once per seed.
    experiment
        Data, model, training and merging settings (shared by both modes; ``epochs`` are the
        local epochs per round in multi-round mode).
    multi_round
        Rounds and strategies; required when ``mode`` includes multi-round.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    scenario: Scenario = "us-eu"
    mode: Mode = "one-shot"
    seeds: tuple[int, ...] = Field((0,), min_length=1)
    experiment: OneShotConfig = OneShotConfig()
    multi_round: MultiRoundConfig | None = None

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        return check_seeds(value)

    @model_validator(mode="after")
    def _consistent(self) -> SimulateConfig:
        expected = SCENARIO_PARTITION[self.scenario]
        if self.experiment.partition != expected:
            raise ValueError(
                f"scenario {self.scenario!r} uses the {expected!r} partition, but the "
                f"experiment has partition {self.experiment.partition!r}"
            )
        if self.mode != "one-shot" and self.multi_round is None:
            raise ValueError(f"mode {self.mode!r} needs multi-round settings")
        if self.experiment.num_clients < 2:
            raise ValueError(f"merging needs at least 2 clients, got {self.experiment.num_clients}")
        if self.multi_round is not None and self.mode != "one-shot":
            from simulations.multiround import validate_multiround

            validate_multiround(self.experiment, self.multi_round)
        return self

    @property
    def runs_oneshot(self) -> bool:
        return self.mode in ("one-shot", "both")

    @property
    def runs_multiround(self) -> bool:
        return self.mode in ("multi-round", "both")


def build_config(
    scenario: Scenario,
    mode: Mode,
    seeds: list[int] | tuple[int, ...],
    *,
    clients: int | None = None,
    rounds: int | None = None,
    strategies: tuple[str, ...] | None = None,
    reference: str | None = None,
    independent_start: bool = True,
    bn_recalibration: bool = False,
    **experiment: object,
) -> SimulateConfig:
    """A :class:`SimulateConfig` from flat settings, as the CLI has them.

    ``clients`` defaults to the scenario's (2 regions for ``us-eu``, 5 clients otherwise);
    ``experiment`` holds :class:`OneShotConfig` fields. Multi-round settings are built only
    when ``mode`` needs them.

    Raises
    ------
    ValueError
        On an unknown scenario.
    pydantic.ValidationError
        Naming every bad field.
    """
    if scenario not in SCENARIO_PARTITION:
        raise ValueError(
            f"--scenario = {scenario!r}: expected one of {', '.join(map(repr, SCENARIO_PARTITION))}"
        )
    settings = dict(experiment)
    settings["partition"] = SCENARIO_PARTITION[scenario]
    settings["num_clients"] = SCENARIO_CLIENTS[scenario] if clients is None else clients
    multi = None
    if mode != "one-shot":
        multi_settings: dict = {
            "independent_start": independent_start,
            "bn_recalibration": bn_recalibration,
            "reference": reference,
        }
        if rounds is not None:
            multi_settings["rounds"] = rounds
        if strategies is not None:
            multi_settings["strategies"] = tuple(strategies)
        multi = MultiRoundConfig(**multi_settings)
    return SimulateConfig(
        scenario=scenario,
        mode=mode,
        seeds=tuple(seeds),
        experiment=OneShotConfig(**settings),
        multi_round=multi,
    )


def run_simulate(
    cfg: SimulateConfig,
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    *,
    progress: Progress | None = None,
    command: str = "",
    on_seed: Callable[[str, int, dict], None] | None = None,
    resume: bool = False,
) -> dict:
    """Run every seed of ``cfg`` and write ``results.json``, ``report.md`` and the plots.

    ``results.json`` is rewritten after every seed, so an interrupted run keeps the seeds it
    finished (the report and plots are written at the end). With ``resume``, the seeds that
    ``out_dir/results.json`` already holds for the same settings are kept, not rerun: a
    long run can stop and go on later, or gain seeds.

    Parameters
    ----------
    cfg
        The run.
    out_dir
        Results directory (created).
    data_dir
        Data directory (default: ``$REBASIN_DATA_DIR``, else ``./data``).
    progress
        Rich progress for the training and round bars.
    command
        The command line, recorded in the results and the report.
    on_seed
        Called as ``(mode, seed, seed_result)`` after each seed (for console summaries).
    resume
        Keep the finished seeds of an earlier run in ``out_dir`` (see :func:`finished_runs`).

    Returns
    -------
    dict
        The results as written to ``results.json``.
    """
    from simulations.multiround import run_multiround
    from simulations.oneshot import run_centralized, run_oneshot
    from simulations.plots import write_plots
    from simulations.report import write_report
    from simulations.results import (
        FORMAT,
        read_results,
        results_header,
        summarize_multiround,
        summarize_oneshot,
        write_results,
    )

    out = Path(out_dir)
    k = cfg.experiment.num_clients
    results: dict = results_header(FORMAT, out, command, cfg, data_dir)
    done: dict[str, dict[int, dict]] = {"one_shot": {}, "multi_round": {}}
    earlier_wall = 0.0
    if resume and (out / "results.json").is_file():
        earlier = read_results(out)
        done = finished_runs(earlier, cfg)
        earlier_wall = float(earlier.get("wall_seconds") or 0.0)
        # Where the kept seeds ran: their own environments, oldest first.
        results["earlier_environments"] = [
            *earlier.get("earlier_environments", []),
            {**earlier["environment"], "seeds": sorted({*done["one_shot"], *done["multi_round"]})},
        ]
    start = time.perf_counter() - earlier_wall
    changed = False  # whether anything was computed (a resumed run may have nothing to do)
    if cfg.runs_oneshot:
        results["one_shot"] = {"runs": []}
        for seed in cfg.seeds:
            if seed in done["one_shot"]:
                run = done["one_shot"][seed]
                if cfg.experiment.centralized and "centralized" not in run["methods"]:
                    # Not written until the seeds agree again: the summary needs one set of
                    # models per seed (an interrupted fill keeps the earlier file as it was).
                    extra = run_centralized(cfg.experiment, seed, data_dir, progress)
                    run = with_centralized(run, extra)
                    changed = True
                    if on_seed is not None:
                        on_seed("one-shot", seed, run)
                results["one_shot"]["runs"].append(run)
                results["one_shot"]["summary"] = summarize_oneshot(results["one_shot"]["runs"], k)
                continue
            changed = True
            t0 = time.perf_counter()
            run = run_oneshot(cfg.experiment, seed, data_dir, progress)
            run["wall_seconds"] = time.perf_counter() - t0
            results["one_shot"]["runs"].append(run)
            results["one_shot"]["summary"] = summarize_oneshot(results["one_shot"]["runs"], k)
            results["wall_seconds"] = time.perf_counter() - start
            write_results(results, out)
            if on_seed is not None:
                on_seed("one-shot", seed, run)
    if cfg.runs_multiround:
        assert cfg.multi_round is not None  # the validator guarantees it
        results["multi_round"] = {"runs": []}
        for seed in cfg.seeds:
            if seed in done["multi_round"]:
                results["multi_round"]["runs"].append(done["multi_round"][seed])
                results["multi_round"]["summary"] = summarize_multiround(
                    results["multi_round"]["runs"], k
                )
                continue
            changed = True
            run = run_multiround(cfg.experiment, cfg.multi_round, seed, data_dir, progress)
            results["multi_round"]["runs"].append(run)
            results["multi_round"]["summary"] = summarize_multiround(
                results["multi_round"]["runs"], k
            )
            results["wall_seconds"] = time.perf_counter() - start
            write_results(results, out)
            if on_seed is not None:
                on_seed("multi-round", seed, run)
    if changed:
        results["wall_seconds"] = time.perf_counter() - start
        write_results(results, out)
    # The report and the plots read the file back, so they show exactly what it holds.
    written = read_results(out)
    plots = write_plots(written, out)
    write_report(written, out, plots)
    return written


def finished_runs(earlier: dict, cfg: SimulateConfig) -> dict[str, dict[int, dict]]:
    """The per-seed runs of an earlier ``results.json`` that ``cfg`` can keep, by mode and seed.

    Only runs made with the same settings are kept: everything in ``config`` but ``seeds``
    must be equal, else a :class:`ResumeMismatchError` names the settings that differ (a
    resumed run mixes no seeds of two experiments). One exception: a run made without the
    centralised baseline may gain it (``run_simulate`` trains it for the kept seeds).
    """
    mine = cfg.model_dump(mode="json")
    theirs = dict(earlier.get("config") or {})
    mine.pop("seeds")
    theirs.pop("seeds", None)
    differ = differing_settings(mine, theirs)
    if differ == [CENTRALIZED] and mine["experiment"]["centralized"]:
        differ = []  # a run may gain the centralised baseline: run_simulate adds it per seed
    if differ:
        raise ResumeMismatchError(
            "cannot resume: the earlier results.json was made with other settings "
            f"({', '.join(differ)}); use another --out or the same settings"
        )
    return {
        mode: {run["seed"]: run for run in earlier.get(mode, {}).get("runs", [])}
        for mode in ("one_shot", "multi_round")
    }


def with_centralized(run: dict, centralized: dict) -> dict:
    """A finished one-shot seed with the centralised baseline of :func:`run_centralized` added."""
    return {
        **run,
        "methods": {**run["methods"], "centralized": centralized["metrics"]},
        "train_seconds": {**run["train_seconds"], "centralized": centralized["train_seconds"]},
        "wall_seconds": run.get("wall_seconds", 0.0) + centralized["train_seconds"],
    }
