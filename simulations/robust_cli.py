"""``rebasin robust``: robust aggregation under attack, with and without re-basin in front
(see :mod:`simulations.robust` and :mod:`simulations.robust_run`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from simulations.settings import (
    BatchSizeOption,
    DataDirOption,
    LearningRateOption,
    LimitPerClassOption,
    MaxIterOption,
    TestLimitPerClassOption,
    ThreadsOption,
    VerboseOption,
)


def register(app: typer.Typer) -> None:
    """Add the ``robust`` command to ``app``."""
    from simulations.cli import GreedyCommand

    class _RobustCommand(GreedyCommand):
        greedy = frozenset({"--seeds", "--attacks", "--strategies"})

    @app.command(cls=_RobustCommand, no_args_is_help=False)
    def robust(
        mode: Annotated[str, typer.Option(help="one-shot, rounds or both")] = "both",
        seeds: Annotated[list[int], typer.Option(help="seeds, e.g. --seeds 0 1 2")] = [0, 1, 2],  # noqa: B006
        width: Annotated[float, typer.Option(help="MLP width (3 x 512*width units)")] = 0.5,
        clients_per_region: Annotated[
            int, typer.Option(help="honest clients in each of the us and eu regions")
        ] = 3,
        own_fraction: Annotated[
            float, typer.Option(help="share of its own classes' examples a region holds")
        ] = 0.8,
        hostile: Annotated[int, typer.Option(help="hostile clients")] = 2,
        attacks: Annotated[
            list[str] | None,
            typer.Option(help="of none scaled sign-flip noise (default: all)"),
        ] = None,
        strategies: Annotated[
            list[str] | None,
            typer.Option(help="of fedavg fedmedian krum trimmed-mean (default: all)"),
        ] = None,
        scale: Annotated[float, typer.Option(help="factor of the scaled attack")] = 10.0,
        epochs: Annotated[int, typer.Option(help="one-shot training epochs")] = 3,
        rounds: Annotated[int, typer.Option(help="rounds of the rounds mode")] = 3,
        local_epochs: Annotated[int, typer.Option(help="local epochs per round")] = 1,
        reference: Annotated[
            str, typer.Option(help="one-shot alignment reference: largest or merge-many")
        ] = "largest",
        lr: LearningRateOption = 0.05,
        weight_decay: Annotated[float, typer.Option(help="weight decay")] = 5e-4,
        batch_size: BatchSizeOption = 128,
        limit_per_class: LimitPerClassOption = None,
        test_limit_per_class: TestLimitPerClassOption = None,
        max_iter: MaxIterOption = 100,
        data_dir: DataDirOption = None,
        out: Annotated[Path, typer.Option(help="results directory")] = Path("results/robust"),
        threads: ThreadsOption = None,
        verbose: VerboseOption = False,
    ) -> None:
        """FedAvg, FedMedian, Krum and FedTrimmedAvg under attack, unaligned and aligned.

        Honest clients split by region (US/EU) plus hostile clients sending scaled,
        sign-flipped or noisy copies of honest models; one-shot (independent starts) and
        rounds (shared start). Outputs: results.json, report.md, robust.png in --out.
        """
        from pydantic import ValidationError

        from simulations.cli import describe_validation_error, fail
        from simulations.robust import RobustConfig

        if threads is not None and threads < 1:
            raise fail(f"--threads = {threads}: must be >= 1")
        try:
            cfg = RobustConfig(
                mode=mode,
                seeds=tuple(seeds),
                width=width,
                clients_per_region=clients_per_region,
                own_fraction=own_fraction,
                hostile=hostile,
                **({"attacks": tuple(attacks)} if attacks else {}),
                **({"strategies": tuple(strategies)} if strategies else {}),
                scale=scale,
                epochs=epochs,
                rounds=rounds,
                local_epochs=local_epochs,
                lr=lr,
                weight_decay=weight_decay,
                batch_size=batch_size,
                limit_per_class=limit_per_class,
                test_limit_per_class=test_limit_per_class,
                reference=reference,
                max_iter=max_iter,
            )
        except (ValidationError, ValueError) as exc:
            raise fail("invalid settings:\n" + describe_validation_error(exc)) from None
        _run(cfg, out, data_dir, threads, verbose)


def _run(cfg, out: Path, data_dir: Path | None, threads: int | None, verbose: bool) -> None:
    import time

    import torch
    from rich.console import Console

    from simulations.cli import command_line, fail, progress_bars, setup_logging
    from simulations.report import pct
    from simulations.robust_report import row_label
    from simulations.robust_run import run_robust

    setup_logging(verbose)
    if threads is not None:
        torch.set_num_threads(threads)
    console = Console(stderr=True)

    def on_seed(mode: str, seed: int, run: dict) -> None:
        parts = [
            f"{kind}: "
            + ", ".join(
                f"{row_label(n, v)} {100 * c['accuracy']:.1f}%"
                for n, vs in strategies.items()
                for v, c in vs.items()
            )
            for kind, strategies in run["cells"].items()
        ]
        console.print(
            f"[bold]seed {seed}[/] {mode} ({run['wall_seconds']:.0f} s): " + "; ".join(parts)
        )

    start = time.perf_counter()
    progress = progress_bars(console)
    try:
        with progress:
            results = run_robust(
                cfg, out, data_dir, progress=progress, command=command_line(), on_seed=on_seed
            )
    except FileNotFoundError as exc:
        raise fail(str(exc), code=1) from None
    for mode, entry in results["summary"].items():
        for kind, strategies in entry["cells"].items():
            line = ", ".join(
                f"{row_label(n, v)} {pct(c['accuracy'])}"
                for n, vs in strategies.items()
                for v, c in vs.items()
            )
            console.print(f"{mode} / {kind}: {line}")
    console.print(
        f"results in {out} (results.json, report.md, robust.png) after "
        f"{time.perf_counter() - start:.0f} s"
    )
