"""``rebasin study``: when does re-basin help? Barriers against training progress, width and
architecture, on the US/EU split.

Three studies, each measuring pairs of models trained apart on the two regions' data
(:mod:`simulations.study_measure`) and the barrier on the path between them, naive and after
re-basin, and for models with BatchNorm both again with pooled BatchNorm statistics:

* ``progress``: one pair of ``--model`` at ``--width``, measured at several points of its
  training (``--checkpoints``, in epochs; 0 is the initialisation);
* ``width``: one pair per width of ``--widths`` (the MLP has ``512 x width`` units per
  hidden layer), measured after ``--epochs``;
* ``architecture``: one pair per model of ``--models``, each at the width whose parameter
  count is closest to ``--params``, measured after ``--epochs``.

Outputs in ``--out``: ``study.json`` (every point, seed and setting, rewritten after each
pair), ``summary.md`` and PNG plots (:mod:`simulations.study_report`).

This module is imported when the CLI starts; torch and the measuring code are imported by
:func:`run_study` only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, get_args

import typer
from pydantic import ConfigDict, Field, field_validator, model_validator

from rebasin.names import DatasetName, ModelName, NormKind, OptimizerName
from simulations.settings import (
    AugmentOption,
    BatchSizeOption,
    Bf16Option,
    ChannelsLastOption,
    DataDirOption,
    DatasetOption,
    LabelSmoothingOption,
    LearningRateOption,
    LimitPerClassOption,
    MaxIterOption,
    MaxLrOption,
    NesterovOption,
    NormOption,
    OptimizerOption,
    ScheduleOption,
    TestLimitPerClassOption,
    ThreadsOption,
    VerboseOption,
    check_seeds,
)
from simulations.training_options import TrainingOptions

if TYPE_CHECKING:
    from rich.progress import Progress

logger = logging.getLogger(__name__)

StudyName = Literal["progress", "width", "architecture"]
STUDY_NAMES: tuple[str, ...] = get_args(StudyName)
# Conv models need 3 x 32 x 32 images (rebasin.zoo); the MLP takes any dataset.
_IMAGE_MODELS = ("vgg", "resnet20")


class StudyConfig(TrainingOptions):
    """Everything that defines a ``study`` run (validated; every field is in ``study.json``).

    Attributes
    ----------
    studies
        Which studies to run, in this order.
    seeds
        Distinct, non-negative; each seed is one pair of models per point (its own split,
        initialisations and data order).
    dataset, model, norm
        The data, and the model of the progress and width studies (``norm``: VGG and
        ResNet-20 normalisation, also used by the architecture study).
    width
        Width multiplier of the progress study's model.
    checkpoints
        Progress study: where to measure, in epochs within ``[0, epochs]``; default
        ``0, 1/8, 1/4, 1/2, 1, 2, ..., epochs``.
    widths
        Width study: width multipliers (distinct).
    models, params
        Architecture study: the models, each at the width whose parameter count is closest
        to ``params``.
    epochs
        Training epochs of every model (one cosine learning-rate cycle with SGD).
    own_fraction
        Share of its own classes' examples each region holds.
    lambdas
        Points of the interpolation grid, odd so that it holds lambda = 0.5.

    The training recipe's fields come from :class:`~simulations.training_options.TrainingOptions`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    studies: tuple[StudyName, ...] = Field(("progress", "width"), min_length=1)
    seeds: tuple[int, ...] = Field((0, 1), min_length=1)
    dataset: DatasetName = "mnist"
    model: ModelName = "mlp"
    norm: NormKind = "batch"
    width: float = Field(1.0, gt=0)
    checkpoints: tuple[float, ...] | None = None
    widths: tuple[float, ...] = Field((0.0625, 0.25, 1.0, 4.0), min_length=1)
    models: tuple[ModelName, ...] = Field(("mlp", "vgg", "resnet20"), min_length=1)
    params: int = Field(100_000, ge=1)
    epochs: int = Field(2, ge=1)
    own_fraction: float = Field(0.8, gt=0, le=1)
    lr: float = Field(0.05, gt=0)
    optimizer: OptimizerName = "sgd"
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(128, ge=1)
    limit_per_class: int | None = Field(None, ge=1)
    test_limit_per_class: int | None = Field(None, ge=1)
    lambdas: int = Field(5, ge=3)
    max_iter: int = Field(100, ge=1)
    repair_batches: int = Field(20, ge=1)

    @field_validator("studies", "models")
    @classmethod
    def _distinct_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"must be distinct, got {list(value)}")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        return check_seeds(value)

    @field_validator("widths")
    @classmethod
    def _widths(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not w > 0 for w in value):
            raise ValueError(f"widths must be > 0, got {list(value)}")
        if len(set(value)) != len(value):
            raise ValueError(f"widths must be distinct, got {list(value)}")
        return value

    @field_validator("lambdas")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"must be odd so that the grid holds lambda = 0.5, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> StudyConfig:
        if self.checkpoints is not None:
            bad = [c for c in self.checkpoints if not 0 <= c <= self.epochs]
            if bad:
                raise ValueError(f"checkpoints must lie in [0, epochs = {self.epochs}], got {bad}")
            if len(set(self.checkpoints)) != len(self.checkpoints):
                raise ValueError(f"checkpoints must be distinct, got {list(self.checkpoints)}")
            if not self.checkpoints:
                raise ValueError("checkpoints must not be empty")
        if self.dataset == "mnist":
            uses_model = {"progress", "width"} & set(self.studies)
            if uses_model and self.model in _IMAGE_MODELS:
                raise ValueError(f"model {self.model!r} needs 3x32x32 images; use mlp for mnist")
            if "architecture" in self.studies:
                bad_models = [m for m in self.models if m in _IMAGE_MODELS]
                if bad_models:
                    raise ValueError(
                        f"the architecture study compares {bad_models}, which need 3x32x32 "
                        "images; use --dataset cifar10"
                    )
        return self

    def checkpoint_epochs(self) -> tuple[float, ...]:
        """The progress study's checkpoints, sorted (the default when none were given)."""
        if self.checkpoints is not None:
            return tuple(sorted(float(c) for c in self.checkpoints))
        early = (0.0, 0.125, 0.25, 0.5)
        return early + tuple(float(e) for e in range(1, self.epochs + 1))


def default_run_name(cfg: StudyConfig) -> str:
    """``study-<dataset>-<model>-<studies>``, e.g. ``study-mnist-mlp-progress-width``."""
    model = cfg.model if {"progress", "width"} & set(cfg.studies) else "models"
    return f"study-{cfg.dataset}-{model}-{'-'.join(cfg.studies)}"


# -------------------------------------------------------------------------------------------
# running


def planned_pairs(cfg: StudyConfig) -> list[tuple[str, str, float, tuple[float, ...]]]:
    """Every ``(study, model, width, checkpoints)`` to train, in order (each once per seed).

    The architecture study's widths come from the parameter-count match.
    """
    from simulations.study_measure import width_for_parameters

    plan: list[tuple[str, str, float, tuple[float, ...]]] = []
    final = (float(cfg.epochs),)
    for study in cfg.studies:
        if study == "progress":
            plan.append((study, cfg.model, cfg.width, cfg.checkpoint_epochs()))
        elif study == "width":
            plan += [(study, cfg.model, w, final) for w in cfg.widths]
        else:
            plan += [
                (study, m, width_for_parameters(m, cfg.dataset, cfg.params, cfg.norm), final)
                for m in cfg.models
            ]
    return plan


def run_study(
    cfg: StudyConfig,
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    *,
    progress: Progress | None = None,
    command: str = "",
    on_pair: Callable[[list[dict]], None] | None = None,
) -> dict:
    """Run every study of ``cfg``; write ``study.json``, ``summary.md`` and the plots.

    ``study.json`` is rewritten after every pair of models, so an interrupted run keeps
    what it measured (the summary and plots are written at the end, from the file).

    Parameters
    ----------
    cfg
        The run.
    out_dir
        Results directory (created).
    data_dir
        Data directory (default: ``$REBASIN_DATA_DIR``, else ``./data``).
    progress
        Rich progress for the overall and the training bars.
    command
        The command line, recorded in the results and the summary.
    on_pair
        Called with the records of each pair (one per checkpoint) when it is measured.

    Returns
    -------
    dict
        The results as written to ``study.json``.
    """
    from rebasin.data import load_dataset
    from simulations.results import results_header
    from simulations.study_measure import lambda_grid, measure_pair, region_shards
    from simulations.study_report import (
        FORMAT,
        read_study,
        summarize_study,
        write_study,
        write_study_outputs,
    )

    out = Path(out_dir)
    start = time.perf_counter()
    plan = planned_pairs(cfg)  # first: a parameter count that no width reaches fails fast
    train_set = load_dataset(cfg.dataset, True, data_dir, limit_per_class=cfg.limit_per_class)
    test_set = load_dataset(cfg.dataset, False, data_dir, limit_per_class=cfg.test_limit_per_class)
    results: dict = {
        **results_header(FORMAT, out, command, cfg, data_dir),
        "data": {"train_examples": len(train_set), "test_examples": len(test_set)},
        "lambdas": lambda_grid(cfg.lambdas),
        "plan": [
            {"study": s, "model": m, "width": w, "checkpoints": list(c)} for s, m, w, c in plan
        ],
        "points": [],
    }
    shards = {seed: region_shards(train_set, cfg.own_fraction, seed) for seed in cfg.seeds}
    overall = (
        progress.add_task("pairs of models", total=len(plan) * len(cfg.seeds))
        if progress is not None
        else None
    )
    for study, model, width, checkpoints in plan:
        for seed in cfg.seeds:
            records = measure_pair(
                model=model,
                dataset=cfg.dataset,
                width=width,
                norm=cfg.norm,
                seed=seed,
                shards=shards[seed],
                test=test_set,
                checkpoints=checkpoints,
                epochs=cfg.epochs,
                lr=cfg.lr,
                optimizer=cfg.optimizer,
                weight_decay=cfg.weight_decay,
                batch_size=cfg.batch_size,
                lambdas=results["lambdas"],
                max_iter=cfg.max_iter,
                repair_batches=cfg.repair_batches,
                progress=progress,
                recipe=cfg.recipe(model),
            )
            results["points"] += [{"study": study, **r} for r in records]
            results["wall_seconds"] = time.perf_counter() - start
            write_study(results, out)
            if on_pair is not None:
                on_pair([{"study": study, **r} for r in records])
            if overall is not None:
                progress.advance(overall)  # type: ignore[union-attr]
    results["summary"] = summarize_study(results["points"])
    results["wall_seconds"] = time.perf_counter() - start
    write_study(results, out)
    written = read_study(out)
    write_study_outputs(written, out)
    return written


# -------------------------------------------------------------------------------------------
# command line


def study_command(
    studies: Annotated[
        list[str], typer.Option(help="progress width architecture (one or more)")
    ] = ["progress", "width"],  # noqa: B006
    dataset: DatasetOption = "mnist",
    model: Annotated[
        str, typer.Option(help="progress/width model: mlp, vgg or resnet20 (cifar10)")
    ] = "mlp",
    norm: NormOption = "batch",
    width: Annotated[float, typer.Option(help="progress: width multiplier")] = 1.0,
    checkpoints: Annotated[
        list[float] | None,
        typer.Option(help="progress: epochs at which to measure (default 0 1/8 1/4 1/2 1 ..)"),
    ] = None,
    widths: Annotated[
        list[float],
        typer.Option(help="width: multipliers (mlp: 512 x width units per hidden layer)"),
    ] = [0.0625, 0.25, 1.0, 4.0],  # noqa: B006
    models: Annotated[list[str], typer.Option(help="architecture: models (cifar10)")] = [  # noqa: B006
        "mlp",
        "vgg",
        "resnet20",
    ],
    params: Annotated[
        int, typer.Option(help="architecture: target parameter count of every model")
    ] = 100_000,
    seeds: Annotated[list[int], typer.Option(help="seeds, e.g. --seeds 0 1")] = [0, 1],  # noqa: B006
    epochs: Annotated[int, typer.Option(help="training epochs of every model")] = 2,
    own_fraction: Annotated[
        float, typer.Option(help="share of its own classes' examples a region holds")
    ] = 0.8,
    lr: LearningRateOption = 0.05,
    optimizer: OptimizerOption = "sgd",
    weight_decay: Annotated[float, typer.Option(help="weight decay")] = 5e-4,
    batch_size: BatchSizeOption = 128,
    augment: AugmentOption = None,
    label_smoothing: LabelSmoothingOption = 0.0,
    schedule: ScheduleOption = None,
    max_lr: MaxLrOption = None,
    nesterov: NesterovOption = False,
    channels_last: ChannelsLastOption = None,
    bf16: Bf16Option = None,
    limit_per_class: LimitPerClassOption = None,
    test_limit_per_class: TestLimitPerClassOption = None,
    lambdas: Annotated[
        int, typer.Option(help="points on the interpolation path (odd: holds 0.5)")
    ] = 5,
    max_iter: MaxIterOption = 100,
    repair_batches: Annotated[
        int, typer.Option(help="batches per region for the BatchNorm statistics")
    ] = 20,
    data_dir: DataDirOption = None,
    out: Annotated[
        Path | None,
        typer.Option(help="results directory (default: results/study-<dataset>-<model>-..)"),
    ] = None,
    threads: ThreadsOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Measure when re-basin helps: barriers against training progress, width, architecture.

    Each point trains two models apart on the US/EU split (region 0 and region 1, each from
    its own initialisation) and measures the loss and accuracy barrier on the straight path
    between them: naive and after re-basin, and for models with BatchNorm both again with
    BatchNorm statistics pooled from the regions. Outputs: study.json, summary.md, PNG plots.
    """
    from pydantic import ValidationError

    from simulations.cli import describe_validation_error, fail, setup_logging

    if threads is not None and threads < 1:
        raise fail(f"--threads = {threads}: must be >= 1")
    try:
        cfg = StudyConfig(
            studies=tuple(studies),  # type: ignore[arg-type]  # pydantic checks the literals
            seeds=tuple(seeds),
            dataset=dataset,  # type: ignore[arg-type]
            model=model,  # type: ignore[arg-type]
            norm=norm,  # type: ignore[arg-type]
            width=width,
            checkpoints=tuple(checkpoints) if checkpoints else None,
            widths=tuple(widths),
            models=tuple(models),  # type: ignore[arg-type]
            params=params,
            epochs=epochs,
            own_fraction=own_fraction,
            lr=lr,
            optimizer=optimizer,  # type: ignore[arg-type]
            weight_decay=weight_decay,
            batch_size=batch_size,
            augment=augment,
            label_smoothing=label_smoothing,
            schedule=schedule,  # type: ignore[arg-type]
            max_lr=max_lr,
            nesterov=nesterov,
            channels_last=channels_last,
            bf16=bf16,  # type: ignore[arg-type]
            limit_per_class=limit_per_class,
            test_limit_per_class=test_limit_per_class,
            lambdas=lambdas,
            max_iter=max_iter,
            repair_batches=repair_batches,
        )
    except ValidationError as exc:
        raise fail("invalid settings:\n" + describe_validation_error(exc)) from None
    out_dir = out or Path("results") / default_run_name(cfg)
    setup_logging(verbose)
    _run(cfg, out_dir, data_dir, threads)


def _run(cfg: StudyConfig, out_dir: Path, data_dir: Path | None, threads: int | None) -> None:
    """Run ``cfg`` with progress bars; print a line per pair and where the outputs are."""
    import torch
    from rich.console import Console

    from simulations.cli import command_line, fail, progress_bars

    if threads is not None:
        torch.set_num_threads(threads)
    console = Console(stderr=True)

    def on_pair(records: list[dict]) -> None:
        last = records[-1]
        barriers = ", ".join(
            f"{name} {100 * m['accuracy_barrier']:.2f}" for name, m in last["methods"].items()
        )
        console.print(
            f"[bold]{last['study']}[/] {last['model']} w{last['width']:g} seed {last['seed']} "
            f"epoch {last['epoch']:g}: accuracy barrier (points) {barriers}"
        )

    command = command_line()
    start = time.perf_counter()
    progress = progress_bars(console)
    try:
        with progress:
            run_study(cfg, out_dir, data_dir, progress=progress, command=command, on_pair=on_pair)
    except FileNotFoundError as exc:
        raise fail(str(exc), code=1) from None
    except ValueError as exc:  # what only the measuring code can check (--params)
        raise fail(str(exc)) from None
    console.print(
        f"results in {out_dir} (study.json, summary.md, plots) after "
        f"{time.perf_counter() - start:.0f} s"
    )


# Options that take several values: ``--widths 0.25 1 4``.
GREEDY_OPTIONS = frozenset({"--studies", "--seeds", "--widths", "--checkpoints", "--models"})


def register(app: typer.Typer) -> None:
    """Add ``study`` to the ``rebasin`` CLI (called by :mod:`simulations.cli`)."""
    from simulations.cli import GreedyCommand

    class StudyCommand(GreedyCommand):
        greedy = GREEDY_OPTIONS

    app.command("study", cls=StudyCommand, no_args_is_help=False)(study_command)
