"""Training throughput (images/s): the original loop against the CIFAR-10 loop, in one run.

For each model, :func:`rebasin.train.train` runs on the same synthetic CIFAR-shaped batches
(random normal images, random labels: throughput does not depend on the values) with:

* ``before``: the original loop (``TrainRecipe()``: no augmentation, fp32, contiguous);
* ``+augment``: random crop + flip on each batch;
* ``+channels_last``: and channels_last memory order;
* ``after``: the CIFAR-10 loop (augmentation, channels_last, Nesterov, one-cycle, label
  smoothing 0.1, bf16 autocast where :func:`rebasin.recipe.bf16_supported`);
* ``after, bf16 forced`` (optional): the same with bf16 autocast even where the hardware
  only emulates it.

Each timing is one ``train`` call over ``steps`` batches after a warm-up call; variants take
turns within each repeat (so drift of a shared machine hits all of them), and the median
over repeats is reported with its ratio to ``before`` of the same model.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from rebasin.recipe import TrainRecipe, bf16_supported, resolve
from rebasin.train import train
from rebasin.zoo import build_model

console = Console()

# The models of the calibration: (name, width, norm).
THROUGHPUT_MODELS: tuple[tuple[str, float, str], ...] = (
    ("vgg", 0.25, "batch"),
    ("vgg", 0.5, "batch"),
    ("resnet20", 1.0, "batch"),
)


def variants(force_bf16: bool) -> dict[str, TrainRecipe]:
    """The loops compared, by name, ``before`` first."""
    after = TrainRecipe(
        augment=True,
        channels_last=True,
        bf16="auto",
        nesterov=True,
        schedule="onecycle",
        label_smoothing=0.1,
    )
    out = {
        "before": TrainRecipe(),
        "+augment": TrainRecipe(augment=True),
        "+channels_last": TrainRecipe(augment=True, channels_last=True),
        "after": after,
    }
    if force_bf16:
        out["after, bf16 forced"] = replace(after, bf16="on")
    return out


@dataclass
class ThroughputRow:
    """One (model, loop) timing: median images/s over repeats and the ratio to ``before``."""

    model: str
    loop: str
    images_per_s: float
    seconds: list[float]
    ratio_to_before: float
    bf16: bool
    channels_last: bool
    augment: bool


def synthetic_batches(
    n_batches: int, batch_size: int, device: str, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """CIFAR-shaped float32 images (standard normal) and labels in ``range(10)``."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, 3, 32, 32, generator=gen).to(device),
            torch.randint(0, 10, (batch_size,), generator=gen).to(device),
        )
        for _ in range(n_batches)
    ]


def _timed_train(model, batches, recipe: TrainRecipe, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    train(model, batches, 1, 0.05, weight_decay=5e-4, recipe=recipe)  # ends with a sync
    return time.perf_counter() - start


def run_train_throughput(
    out: Path,
    *,
    models: tuple[tuple[str, float, str], ...] = THROUGHPUT_MODELS,
    steps: int = 30,
    warmup: int = 3,
    batch_size: int = 128,
    repeats: int = 3,
    device: str = "cpu",
    force_bf16: bool = False,
    seed: int = 0,
) -> dict:
    """Time every loop on every model; write ``train_throughput.json`` and ``.md`` in ``out``."""
    from simulations.bench import environment

    for name, value, low in (("steps", steps, 1), ("warmup", warmup, 0), ("repeats", repeats, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out.mkdir(parents=True, exist_ok=True)
    loops = variants(force_bf16)
    batches = synthetic_batches(steps, batch_size, device, seed)
    warm = batches[:warmup]
    rows: list[ThroughputRow] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("training throughput", total=len(models) * repeats * len(loops))
        for name, width, norm in models:
            label = f"{name} x{width:g} {norm}"
            times: dict[str, list[float]] = {loop: [] for loop in loops}
            for _ in range(repeats):
                for loop, recipe in loops.items():
                    model = build_model(name, "cifar10", width=width, norm=norm, seed=seed)  # type: ignore[arg-type]
                    model.to(device)
                    if warm:
                        train(model, warm, 1, 0.05, recipe=recipe)
                    times[loop].append(_timed_train(model, batches, recipe, device))
                    progress.advance(task)
            before = steps * batch_size / float(np.median(times["before"]))
            for loop, recipe in loops.items():
                used = resolve(recipe, device, "sgd", 0.05)
                rate = steps * batch_size / float(np.median(times[loop]))
                rows.append(
                    ThroughputRow(
                        label,
                        loop,
                        rate,
                        times[loop],
                        rate / before,
                        used.bf16,
                        used.channels_last,
                        used.augment,
                    )
                )
    env = environment()
    env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    env["bf16_supported"] = bf16_supported(device)
    result = {
        "environment": env,
        "settings": {
            "device": device,
            "steps": steps,
            "warmup": warmup,
            "batch_size": batch_size,
            "repeats": repeats,
            "force_bf16": force_bf16,
            "seed": seed,
            "data": "synthetic CIFAR-shaped batches (3x32x32, standard normal; random labels)",
            "loops": {k: v.as_dict() for k, v in loops.items()},
        },
        "rows": [asdict(r) for r in rows],
    }
    (out / "train_throughput.json").write_text(json.dumps(result, indent=2))
    (out / "train_throughput.md").write_text(throughput_markdown(result))
    _print(result)
    return result


def throughput_markdown(result: dict) -> str:
    """The throughput table as Markdown, with the environment and settings line."""
    env, s = result["environment"], result["settings"]
    lines = [
        f"Measured {env['date']} on {env['cpu_count']} CPU cores ({env['machine']}, "
        f"{env['cpu_capability']}, torch {env['torch']}, {env['torch_threads']} threads"
        + (f", GPU {env['cuda']}" if env["cuda"] else ", no GPU")
        + f"), device {s['device']}; bf16 supported: {'yes' if env['bf16_supported'] else 'no'}. "
        f"Synthetic CIFAR-shaped batches of {s['batch_size']}, {s['steps']} steps per timing "
        f"after {s['warmup']} warm-up steps, median of {s['repeats']}.",
        "",
        "| model | loop | images/s | x before | augment | channels_last | bf16 |",
        "|---|---|---|---|---|---|---|",
    ]
    yes = {True: "yes", False: "no"}
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['loop']} | {r['images_per_s']:.0f} | "
            f"{r['ratio_to_before']:.2f}x | {yes[r['augment']]} | {yes[r['channels_last']]} | "
            f"{yes[r['bf16']]} |"
        )
    return "\n".join(lines) + "\n"


def _print(result: dict) -> None:
    table = Table(title="training throughput (images/s, median)")
    for col in ("model", "loop", "images/s", "x before", "bf16"):
        table.add_column(col)
    for r in result["rows"]:
        table.add_row(
            r["model"],
            r["loop"],
            f"{r['images_per_s']:.0f}",
            f"{r['ratio_to_before']:.2f}x",
            "yes" if r["bf16"] else "no",
        )
    console.print(table)
