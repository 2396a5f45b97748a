"""The ``rebasin`` command line (console script ``rebasin = simulations.cli:app``).

``rebasin simulate`` runs the one-shot and/or multi-round experiments for several seeds and
writes ``results.json``, ``report.md`` and PNG plots into a results directory.

Adding a subcommand
-------------------
A module that contributes commands defines ``register(app: typer.Typer) -> None`` and adds
its commands there (``@app.command()``); its name goes into :data:`COMMAND_MODULES`. Modules
are imported when the CLI starts, so keep their top level light (import torch and friends
inside the command functions) and ``rebasin --help`` stays fast; one that fails to import
fails loudly.

Options that take several values (``--seeds 0 1 2``, ``--strategies fedavg rebasin``) are
declared as lists and named in the command's ``greedy`` set (see :class:`GreedyCommand`);
``--seeds 0 --seeds 1`` works too.
"""

from __future__ import annotations

import importlib
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperCommand

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
)

logger = logging.getLogger(__name__)

# Modules that register more subcommands (each defines register(app)).
COMMAND_MODULES: tuple[str, ...] = (
    "simulations.bench_cli",
    "simulations.study",
    "simulations.merge_cli",
    "simulations.robust_cli",
    "simulations.compare",
)

app = typer.Typer(
    name="rebasin",
    help="Federated learning with Git Re-Basin merging: simulations and benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Federated learning with Git Re-Basin merging: simulations and benchmarks."""


class GreedyCommand(TyperCommand):
    """A command whose list options take every following value: ``--seeds 0 1 2``.

    Click options take one value per occurrence; before parsing, ``--opt a b c`` is rewritten
    to ``--opt a --opt b --opt c`` for the options in :attr:`greedy` (values run up to the
    next token that starts with ``-`` and is not a number: ``--weights 1 -2`` passes ``-2``
    on, for the option's own check to refuse).
    """

    greedy: frozenset[str] = frozenset({"--seeds", "--strategies"})

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rewritten: list[str] = []
        current: str | None = None
        for token in args:
            if token == "--":
                current = None
                rewritten.append(token)
            elif token.startswith("-") and not (current is not None and _is_number(token)):
                name = token.split("=", 1)[0]
                current = name if name in self.greedy else None
                rewritten.append(token)
            elif current is not None and rewritten[-1] != current:
                rewritten += [current, token]  # a further value of the greedy option
            else:
                rewritten.append(token)
        return super().parse_args(ctx, rewritten)


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# validation errors at the edge

# Config field -> the flag that sets it (others are the field name in kebab-case).
_FLAG_OF = {
    "num_clients": "--clients",
    "partition": "--scenario",
    "limit_per_class": "--limit-per-class",
    "test_limit_per_class": "--test-limit-per-class",
    "independent_start": "--independent-start/--shared-start",
    "augment": "--augment/--no-augment",
    "channels_last": "--channels-last/--no-channels-last",
}


def describe_validation_error(exc: Exception) -> str:
    """One line per problem, naming the flag and the value: ``--width = -1: ...``."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    lines = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        fields = [str(p) for p in error["loc"] if str(p) not in ("experiment", "multi_round")]
        if not fields:
            lines.append(message)
            continue
        field = fields[0]
        flag = _FLAG_OF.get(field, "--" + field.replace("_", "-"))
        lines.append(f"{flag} = {error['input']!r}: {message}")
    return "\n".join(lines)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` as an error on stderr and return the exit to raise."""
    typer.secho(f"Error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


# --------------------------------------------------------------------------------------------
# simulate


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=level, format="%(name)s: %(message)s", handlers=[RichHandler(show_path=False)]
    )
    # Flower logs every round at INFO on its own handler; keep it to warnings unless asked.
    logging.getLogger("flwr").setLevel(level)


def default_run_name(scenario: str, dataset: str, model: str, width: float, mode: str) -> str:
    """``<scenario>-<dataset>-<model>-w<width>-<mode>``, e.g. ``us-eu-mnist-mlp-w1-one-shot``."""
    return f"{scenario}-{dataset}-{model}-w{width:g}-{mode}"


@app.command(cls=GreedyCommand, no_args_is_help=False)
def simulate(
    scenario: Annotated[
        str,
        typer.Option(help="us-eu (K regions, each owning its classes), dirichlet, pathological"),
    ] = "us-eu",
    dataset: DatasetOption = "mnist",
    model: Annotated[
        str, typer.Option(help="mlp or vit (any dataset), vgg or resnet20 (cifar10)")
    ] = "mlp",
    width: Annotated[float, typer.Option(help="width multiplier (mlp: 512 x width units)")] = 1.0,
    norm: NormOption = "batch",
    seeds: Annotated[list[int], typer.Option(help="seeds, e.g. --seeds 0 1 2")] = [0],  # noqa: B006
    mode: Annotated[str, typer.Option(help="one-shot, multi-round or both")] = "one-shot",
    epochs: Annotated[int, typer.Option(help="training epochs (local epochs per round)")] = 5,
    rounds: Annotated[int, typer.Option(help="federated rounds (multi-round)")] = 5,
    clients: Annotated[
        int | None, typer.Option(help="clients / regions (default: 2 for us-eu, else 5)")
    ] = None,
    own_fraction: Annotated[
        float, typer.Option(help="us-eu: share of its own classes' examples a region holds")
    ] = 0.8,
    alpha: Annotated[
        float, typer.Option(help="dirichlet: concentration (smaller: more skew)")
    ] = 0.5,
    classes_per_client: Annotated[int, typer.Option(help="pathological: classes per client")] = 2,
    lr: LearningRateOption = 0.05,
    optimizer: OptimizerOption = "sgd",
    weight_decay: Annotated[float, typer.Option(help="weight decay (one-shot training)")] = 5e-4,
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
    centralized: Annotated[
        bool, typer.Option(help="also train one model on the pooled data (one-shot)")
    ] = True,
    lambdas: Annotated[int, typer.Option(help="points on the interpolation path")] = 11,
    max_iter: MaxIterOption = 100,
    repair_batches: Annotated[int, typer.Option(help="batches for BatchNorm reset / REPAIR")] = 20,
    strategies: Annotated[
        list[str], typer.Option(help="multi-round strategies: fedavg rebasin")
    ] = ["fedavg", "rebasin"],  # noqa: B006
    reference: Annotated[
        str | None,
        typer.Option(
            help="ReBasinFedAvg target: global, largest, merge-many (default: largest "
            "with an independent start, else global)"
        ),
    ] = None,
    independent_start: Annotated[
        bool,
        typer.Option(
            "--independent-start/--shared-start",
            help="multi-round: round 1 trains each client from its own initialisation",
        ),
    ] = True,
    bn_recalibration: Annotated[
        bool, typer.Option(help="multi-round: pool BatchNorm statistics after each merge")
    ] = False,
    data_dir: DataDirOption = None,
    download: Annotated[
        bool, typer.Option("--download", help="download the dataset with torchvision if missing")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="results directory (default: results/<run-name>)")
    ] = None,
    threads: ThreadsOption = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="keep the seeds --out/results.json already holds for the same settings, "
            "and the clients an unfinished seed trained (--out/clients)",
        ),
    ] = False,
    verbose: VerboseOption = False,
) -> None:
    """Train clients on split data, merge them naively and by re-basin, write a report.

    One-shot: every client trains apart from its own initialisation and the server merges
    once (naive, re-basin, MergeMany, BatchNorm reset / REPAIR, ensemble, centralised).
    Multi-round: Flower's FedAvg against ReBasinFedAvg through the project's ServerApp and
    ClientApp. Outputs: results.json, report.md and PNG plots in --out.
    """
    from pydantic import ValidationError

    from simulations.experiment import build_config

    if threads is not None and threads < 1:
        raise fail(f"--threads = {threads}: must be >= 1")
    try:
        cfg = build_config(
            scenario,  # type: ignore[arg-type]  # pydantic checks the literal
            mode,  # type: ignore[arg-type]
            seeds,
            clients=clients,
            rounds=rounds,
            strategies=tuple(strategies),
            reference=reference,
            independent_start=independent_start,
            bn_recalibration=bn_recalibration,
            dataset=dataset,
            model=model,
            width=width,
            norm=norm,
            own_fraction=own_fraction,
            alpha=alpha,
            classes_per_client=classes_per_client,
            epochs=epochs,
            lr=lr,
            optimizer=optimizer,
            weight_decay=weight_decay,
            batch_size=batch_size,
            augment=augment,
            label_smoothing=label_smoothing,
            schedule=schedule,
            max_lr=max_lr,
            nesterov=nesterov,
            channels_last=channels_last,
            bf16=bf16,
            limit_per_class=limit_per_class,
            test_limit_per_class=test_limit_per_class,
            centralized=centralized,
            lambdas=lambdas,
            max_iter=max_iter,
            repair_batches=repair_batches,
        )
    except (ValidationError, ValueError) as exc:
        raise fail("invalid settings:\n" + describe_validation_error(exc)) from None
    out_dir = out or Path("results") / default_run_name(scenario, dataset, model, width, mode)
    setup_logging(verbose)
    if download:
        fetch_dataset(dataset, data_dir)
    _run(cfg, out_dir, data_dir, threads, resume)


def fetch_dataset(dataset: str, data_dir: Path | None) -> None:
    """Make sure both splits of ``dataset`` are in the data directory (torchvision download)."""
    from rebasin.data import load_dataset

    for train in (True, False):
        load_dataset(dataset, train, data_dir, download=True)  # type: ignore[arg-type]


def command_line() -> str:
    """How this process was called, to record in results: ``rebasin simulate ...``."""
    return "rebasin " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def progress_bars(console):
    """The commands' transient progress display: description, bar, count, elapsed time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _run(
    cfg, out_dir: Path, data_dir: Path | None, threads: int | None, resume: bool = False
) -> None:
    """Run ``cfg`` with progress bars; print a per-seed line and where the outputs are."""
    import torch
    from rich.console import Console

    from simulations.client_store import ClientStoreError
    from simulations.experiment import ResumeMismatchError, run_simulate
    from simulations.report import pct

    if threads is not None:
        torch.set_num_threads(threads)
    console = Console(stderr=True)

    def on_seed(mode: str, seed: int, run: dict) -> None:
        if mode == "one-shot":
            parts = [f"{name} {100 * m['accuracy']:.2f}%" for name, m in run["methods"].items()]
            clients = ", ".join(f"{100 * c['accuracy']:.2f}%" for c in run["clients"])
            console.print(f"[bold]seed {seed}[/] one-shot: clients {clients}; " + ", ".join(parts))
        else:
            parts = [
                f"{name} {100 * s['final']['accuracy']:.2f}%"
                for name, s in run["strategies"].items()
            ]
            console.print(f"[bold]seed {seed}[/] multi-round final: " + ", ".join(parts))

    command = command_line()
    start = time.perf_counter()
    progress = progress_bars(console)
    try:
        with progress:
            results = run_simulate(
                cfg,
                out_dir,
                data_dir,
                progress=progress,
                command=command,
                on_seed=on_seed,
                resume=resume,
            )
    except FileNotFoundError as exc:
        raise fail(str(exc), code=1) from None
    except (ResumeMismatchError, ClientStoreError) as exc:
        raise fail(str(exc)) from None
    summary = results.get("one_shot", {}).get("summary")
    if summary is not None:
        line = ", ".join(f"{m} {pct(s['accuracy'])}" for m, s in summary["methods"].items())
        console.print(f"one-shot mean ± std over {len(cfg.seeds)} seed(s): {line}")
    console.print(
        f"results in {out_dir} (results.json, report.md, plots) after "
        f"{time.perf_counter() - start:.0f} s"
    )


@app.command()
def report(
    results_dir: Annotated[Path, typer.Argument(help="a simulate results directory")],
) -> None:
    """Redraw report.md and the plots of a finished run from its results.json."""
    from simulations.plots import write_plots
    from simulations.report import write_report
    from simulations.results import read_results

    try:
        results = read_results(results_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(str(exc), code=1) from None
    plots = write_plots(results, results_dir)
    path = write_report(results, results_dir, plots)
    typer.echo(f"wrote {path} and {len(plots)} plot(s)")


# --------------------------------------------------------------------------------------------
# other modules' subcommands


def _register_command_modules() -> None:
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        register = getattr(module, "register", None)
        if register is None:
            raise ImportError(f"{name} is listed in COMMAND_MODULES but defines no register(app)")
        register(app)


_register_command_modules()
