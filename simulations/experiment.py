"""A whole ``simulate`` run: scenario -> settings -> every seed -> results.json, report, plots.

:class:`SimulateConfig` is the one validated description of a run (the CLI builds it from
its flags; every field lands in ``results.json``). :func:`run_simulate` runs the one-shot
and/or multi-round experiment for every seed and writes the outputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from rich.progress import Progress

from rebasin.recipe import training_identity
from simulations.multiround import MultiRoundConfig
from simulations.oneshot import OneShotConfig, training_of
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
    long run can stop and go on later, or gain seeds. Every trained one-shot client is kept in
    ``out_dir/clients`` (:class:`~simulations.client_store.ClientStore`); with ``resume`` an
    unfinished seed loads the clients it finished instead of training them again.

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
    from simulations.client_store import CLIENTS_DIR, ClientStore
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
        try:
            earlier = read_results(out)
        except ValueError as exc:
            raise ResumeMismatchError(f"cannot resume: {exc}") from None
        done = finished_runs(earlier, cfg)
        earlier_wall = float(earlier.get("wall_seconds") or 0.0)
        # Where the kept seeds ran: their own environments, oldest first.
        results["earlier_environments"] = [
            *earlier.get("earlier_environments", []),
            {**earlier["environment"], "seeds": sorted({*done["one_shot"], *done["multi_round"]})},
        ]
    start = time.perf_counter() - earlier_wall
    modes = [
        mode
        for mode, on in (("one_shot", cfg.runs_oneshot), ("multi_round", cfg.runs_multiround))
        if on
    ]
    summarize = {"one_shot": summarize_oneshot, "multi_round": summarize_multiround}
    # Every run the file will hold, by mode and seed: the kept ones from the start, so each
    # write (after every new seed) holds all of them, in the order of cfg.seeds.
    runs = {mode: dict(done[mode]) for mode in modes}

    def save() -> None:
        for mode in modes:
            held = [runs[mode][seed] for seed in cfg.seeds if seed in runs[mode]]
            if held:
                results[mode] = {"runs": held, "summary": summarize[mode](held, k)}
        results["wall_seconds"] = time.perf_counter() - start
        write_results(results, out)

    # Every trained client is kept; a resumed run loads those of an unfinished seed.
    store = ClientStore(out / CLIENTS_DIR, reuse=resume)
    changed = False  # whether anything was computed (a resumed run may have nothing to do)
    if "one_shot" in runs and cfg.experiment.centralized:
        # Kept seeds made without the centralised baseline gain it. They are written together
        # once all have it (the summary needs one set of models per seed), so an interrupted
        # fill leaves the earlier file as it was.
        kept = runs["one_shot"]
        lacking = [s for s in cfg.seeds if s in kept and "centralized" not in kept[s]["methods"]]
        for seed in lacking:
            extra = run_centralized(cfg.experiment, seed, data_dir, progress)
            runs["one_shot"][seed] = with_centralized(runs["one_shot"][seed], extra)
            if on_seed is not None:
                on_seed("one-shot", seed, runs["one_shot"][seed])
        if lacking:
            changed = True
            save()
    for mode in modes:
        for seed in cfg.seeds:
            if seed in runs[mode]:
                continue
            changed = True
            t0 = time.perf_counter()
            if mode == "one_shot":
                run = run_oneshot(cfg.experiment, seed, data_dir, progress, store)
                run["wall_seconds"] = time.perf_counter() - t0
            else:
                assert cfg.multi_round is not None  # the validator guarantees it
                run = run_multiround(cfg.experiment, cfg.multi_round, seed, data_dir, progress)
            runs[mode][seed] = run
            save()
            if on_seed is not None:
                on_seed(mode.replace("_", "-"), seed, run)
    if changed:
        save()
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
    centralised baseline may gain it (``run_simulate`` trains it for the kept seeds). The kept
    seeds must all be in ``cfg.seeds`` (the file is rewritten with ``cfg.seeds``' runs only),
    and they must have trained as this machine would (:func:`check_same_training`).
    """
    mine = cfg.model_dump(mode="json")
    theirs = dict(earlier.get("config") or {})
    mine.pop("seeds")
    theirs.pop("seeds", None)
    differ = differing_settings(mine, theirs)
    if differ == [CENTRALIZED] and (mine["experiment"]["centralized"] or not cfg.runs_oneshot):
        # A run may gain the centralised baseline (run_simulate adds it per seed); a
        # multi-round run trains none, so the setting does not matter to it.
        differ = []
    if differ:
        raise ResumeMismatchError(
            "cannot resume: the earlier results.json was made with other settings "
            f"({', '.join(differ)}); use another --out or the same settings"
        )
    kept = {
        mode: {run["seed"]: run for run in earlier.get(mode, {}).get("runs", [])}
        for mode in ("one_shot", "multi_round")
    }
    left_out = sorted({*kept["one_shot"], *kept["multi_round"]} - set(cfg.seeds))
    if left_out:
        # Rewriting the file with fewer seeds would throw finished ones away.
        every = sorted({*kept["one_shot"], *kept["multi_round"], *cfg.seeds})
        raise ResumeMismatchError(
            f"cannot resume: the earlier results.json holds seed(s) "
            f"{', '.join(map(str, left_out))} that --seeds leaves out; list every seed "
            f"(--seeds {' '.join(map(str, every))})"
        )
    check_same_training(kept["one_shot"].values(), cfg)
    return kept


def check_same_training(runs: Iterable[dict], cfg: SimulateConfig) -> None:
    """Refuse to add seeds that would train otherwise than the kept ``runs`` did.

    The settings can be equal while training is not: ``bf16 = "auto"`` gives fp32 on one CPU
    and bf16 on another. Each kept run's resolved recipe (``training``) must be the one this
    machine resolves for ``cfg``; only whether bf16 is supported may differ.
    """
    exp = cfg.experiment
    here = training_identity(training_of(exp))
    for run in runs:
        there = training_identity(run.get("training", here))
        differ = sorted(k for k in {*here, *there} if here.get(k) != there.get(k))
        if differ:
            shown = ", ".join(f"{k}: {there.get(k)!r} there, {here.get(k)!r} here" for k in differ)
            raise ResumeMismatchError(
                f"cannot resume: seed {run['seed']} was trained otherwise than this machine "
                f"would train the new seeds ({shown}); set them explicitly (e.g. --bf16 off) "
                "or use another --out"
            )


def with_centralized(run: dict, centralized: dict) -> dict:
    """A finished one-shot seed with the centralised baseline of :func:`run_centralized` added."""
    return {
        **run,
        "methods": {**run["methods"], "centralized": centralized["metrics"]},
        "train_seconds": {**run["train_seconds"], "centralized": centralized["train_seconds"]},
        "wall_seconds": run.get("wall_seconds", 0.0) + centralized["train_seconds"],
    }
