"""``rebasin merge``'s steps: the merge with per-input statistics, BatchNorm repair, summary.

:func:`merge_reference` and :func:`merge_many_models` run :func:`rebasin.merge.merge_to_reference`
and :func:`rebasin.merge.merge_many` (so the merged model is exactly theirs) and report each
input's matching sweeps, objective gain and time, with progress bars when given a ``Progress``.

Imported when the CLI starts: torch, rich's table and the engine are imported inside the
functions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch
    from rich.console import Console
    from rich.progress import Progress
    from torch import nn

    from rebasin.spec import PermutationSpec


@dataclass(frozen=True)
class InputReport:
    """What the merge did with one input: its matching statistics (``None``: not matched)."""

    sweeps: int | None
    objective_gain: float | None
    seconds: float | None


def merge_reference(
    spec: PermutationSpec,
    models: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    reference: int,
    seed: int,
    max_iter: int,
    progress: Progress | None = None,
) -> tuple[dict[str, torch.Tensor], list[InputReport]]:
    """:func:`rebasin.merge.merge_to_reference`, with per-input statistics and progress.

    An input's seconds run from the end of the previous matching (or the start) to the end
    of its own: its matching, and the permuting and summing of the input before it.
    """
    from rebasin.align import Alignment
    from rebasin.merge import merge_to_reference

    task = None
    if progress is not None:
        task = progress.add_task(f"aligning to input {reference}", total=len(models) - 1)
    reports = [InputReport(None, None, None) for _ in models]
    last = time.perf_counter()

    def matched(i: int, alignment: Alignment) -> None:
        nonlocal last
        now = time.perf_counter()
        reports[i] = InputReport(alignment.sweeps, float(alignment.objective_gain), now - last)
        last = now
        if progress is not None and task is not None:
            progress.advance(task)

    merged = merge_to_reference(
        spec, models, weights, reference=reference, seed=seed, max_iter=max_iter,
        on_match=matched,
    )  # fmt: skip
    return merged, reports


def merge_many_models(
    spec: PermutationSpec,
    models: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    seed: int,
    max_iter: int,
    max_rounds: int,
    progress: Progress | None = None,
) -> tuple[dict[str, torch.Tensor], list[InputReport], int]:
    """:func:`rebasin.merge.merge_many` with per-input statistics and the rounds it ran."""
    from rebasin.align import ManyAlignment
    from rebasin.merge import merge_many

    task = None
    if progress is not None:
        task = progress.add_task(f"MergeMany over {len(models)} models", total=1)
    seen: list[ManyAlignment] = []
    merged = merge_many(spec, models, weights, seed=seed, max_rounds=max_rounds,
                        max_iter=max_iter, on_align=seen.append)  # fmt: skip
    if progress is not None and task is not None:
        progress.advance(task)
    (many,) = seen
    reports = [InputReport(a.sweeps, float(a.objective_gain), a.seconds) for a in many.alignments]
    return merged, reports, many.rounds


def batchnorm_batches(
    dataset: str,
    data_dir: Path,
    examples: int,
    batch_size: int,
    seed: int,
) -> list[torch.Tensor]:
    """Input batches for recomputing BatchNorm statistics: ``examples`` training images.

    The first ``ceil(examples / classes)`` training examples of each class (class-balanced,
    and only those are decoded and normalised), of which ``examples`` are drawn in a seeded
    random order and cut into batches of ``batch_size``.
    """
    import torch

    from rebasin.data import load_dataset
    from rebasin.zoo import dataset_geometry

    per_class = math.ceil(examples / dataset_geometry(dataset).num_classes)
    data = load_dataset(dataset, train=True, data_dir=data_dir, limit_per_class=per_class)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=generator)[:examples]
    images = data.images[order]
    return list(images.split(batch_size))


def recompute_batchnorm(
    model: nn.Module, batches: Sequence[torch.Tensor], progress: Progress | None = None
) -> None:
    """Recompute ``model``'s BatchNorm running statistics on ``batches`` (RESET, in place)."""
    from rebasin.norm import reset_batchnorm_stats

    def counted() -> Iterator[torch.Tensor]:
        task = None
        if progress is not None:
            task = progress.add_task("BatchNorm statistics", total=len(batches))
        for batch in batches:
            yield batch
            if progress is not None and task is not None:
                progress.advance(task)

    reset_batchnorm_stats(model, counted())


def print_summary(
    console: Console,
    files: Sequence[Path],
    weights: Sequence[float],
    reports: Sequence[InputReport],
    title: str,
) -> None:
    """A table: per input its weight, share of the total, matching sweeps, gain and time."""
    from rich.table import Table

    largest = max(weights)
    total = sum(w / largest for w in weights)  # relative: 1e308 twice must not overflow
    table = Table(title=title)
    table.add_column("#", justify="right")
    table.add_column("file", overflow="fold")
    table.add_column("weight", justify="right")
    table.add_column("share", justify="right")
    table.add_column("sweeps", justify="right")
    table.add_column("objective gain", justify="right")
    table.add_column("s", justify="right")
    for i, (path, weight, report) in enumerate(zip(files, weights, reports)):
        table.add_row(
            str(i),
            str(path),
            f"{weight:g}",
            f"{100 * weight / largest / total:.1f}%",
            "reference" if report.sweeps is None else str(report.sweeps),
            "-" if report.objective_gain is None else f"{report.objective_gain:.6g}",
            "-" if report.seconds is None else f"{report.seconds:.2f}",
        )
    console.print(table)


def with_progress(
    progress: Progress | None, items: Iterable[Path], description: str, total: int
) -> Iterator[Path]:
    """``items`` unchanged, advancing a ``progress`` task of ``total`` steps after each."""
    task = progress.add_task(description, total=total) if progress is not None else None
    for item in items:
        yield item
        if progress is not None and task is not None:
            progress.advance(task)
