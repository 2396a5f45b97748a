"""``rebasin bench``: the matching and server-merge benchmarks (see :mod:`simulations.bench`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``bench`` command to ``app``."""
    from simulations.cli import GreedyCommand

    class _BenchCommand(GreedyCommand):
        greedy = frozenset({"--widths", "--trained-widths", "--seeds", "--clients"})

    @app.command(cls=_BenchCommand)
    def bench(
        out: Annotated[Path, typer.Option(help="results directory")] = Path("results/bench"),
        widths: Annotated[
            list[float], typer.Option(help="ResNet-20 widths with random weights")
        ] = [1.0, 4.0, 8.0],  # noqa: B006 (typer reads the default)
        trained_widths: Annotated[
            list[float], typer.Option(help="ResNet-20 widths with (briefly) trained weights")
        ] = [1.0, 4.0],  # noqa: B006
        seeds: Annotated[list[int], typer.Option(help="matching seeds")] = [0, 1, 2],  # noqa: B006
        clients: Annotated[
            list[int], typer.Option(help="numbers of clients for the server merge")
        ] = [2, 8, 32, 64],  # noqa: B006
        repeats: Annotated[int, typer.Option(min=1, help="timings per case (median)")] = 3,
        train_steps: Annotated[
            int, typer.Option(min=1, help="SGD steps of batch 128 for the trained weights")
        ] = 40,
        data_dir: Annotated[
            str | None, typer.Option(envvar="REBASIN_DATA_DIR", help="data directory")
        ] = None,
        device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
        mlp_width: Annotated[
            float, typer.Option(min=0.01, help="MLP width multiplier (1 = 3x512)")
        ] = 1.0,
        trained_mlp: Annotated[
            bool, typer.Option(help="also time the MLP with trained weights (needs MNIST)")
        ] = True,
        train_throughput: Annotated[
            bool,
            typer.Option(
                "--train-throughput",
                help="instead: training images/s, the original loop against the CIFAR-10 "
                "loop (VGG-11 x0.25, x0.5 BN, ResNet-20 x1; synthetic batches)",
            ),
        ] = False,
        throughput_steps: Annotated[
            int, typer.Option(min=1, help="--train-throughput: timed steps per timing")
        ] = 30,
        throughput_warmup: Annotated[
            int, typer.Option(min=0, help="--train-throughput: untimed steps before each timing")
        ] = 3,
        throughput_batch: Annotated[
            int, typer.Option(min=1, help="--train-throughput: batch size")
        ] = 128,
        force_bf16: Annotated[
            bool,
            typer.Option(
                "--force-bf16", help="--train-throughput: also time bf16 where only emulated"
            ),
        ] = False,
        threads: Annotated[
            int | None, typer.Option(min=1, help="torch CPU threads (default: torch's)")
        ] = None,
    ) -> None:
        """Time weight matching (engine vs textbook) and server merges of N clients.

        With --train-throughput: time training instead (train_throughput.json and .md).
        """
        import torch

        from simulations.bench import run_benchmark

        if device == "cuda" and not torch.cuda.is_available():
            raise typer.BadParameter("no CUDA device here", param_hint="--device")
        if threads is not None:
            torch.set_num_threads(threads)
        if train_throughput:
            from simulations.bench_train import run_train_throughput

            run_train_throughput(
                out,
                steps=throughput_steps,
                warmup=throughput_warmup,
                batch_size=throughput_batch,
                repeats=repeats,
                device=device,
                force_bf16=force_bf16,
            )
            return
        run_benchmark(
            out,
            widths,
            trained_widths,
            seeds,
            clients,
            repeats,
            train_steps,
            data_dir,
            device,
            mlp_width,
            trained_mlp,
        )
