"""``rebasin merge``: merge N saved models offline, by re-basin, into one safetensors file.

The inputs are safetensors state dicts of one zoo model (the ServerApp's checkpoints, or any
``safetensors.torch.save_file`` of a ``state_dict()``); they are read without unpickling and
checked against the model built from ``--model``/``--dataset``/``--width``/``--norm`` before
any matching starts. Each of those options left out is taken from the inputs' string metadata
(``model``, ``dataset``, ``width``, ``norm``, as the ServerApp's checkpoints and this command's
own output store them), which must agree across the inputs and with the options given.

The merge is :func:`rebasin.merge.merge_to_reference` (``--method reference``) or
:func:`rebasin.merge.merge_many` (``--method merge-many``), with the same seeds, so the file
holds exactly what those functions return for the same inputs (tested); each input's sweeps
and objective gain come from the matchings themselves.

This module is imported when the CLI starts: torch, safetensors and the engine are imported
inside the functions.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer

from rebasin.names import DATASET_NAMES, MODEL_NAMES, NORM_KINDS
from simulations.settings import MaxIterOption, VerboseOption

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from rich.progress import Progress
    from torch import nn

    from rebasin.spec import PermutationSpec

MERGED_FORMAT = "rebasin-fl-merged/1"
DEFAULT_MAX_NORM_RATIO = 1e3  # as the strategies' max_norm_ratio
METHODS: tuple[str, ...] = ("reference", "merge-many")
MODELS: tuple[str, ...] = MODEL_NAMES
DATASETS: tuple[str, ...] = DATASET_NAMES
NORMS: tuple[str, ...] = NORM_KINDS
DEFAULT_WIDTH = 1.0
DEFAULT_NORM = "batch"
ARCHITECTURE_FIELDS: tuple[str, ...] = ("model", "dataset", "width", "norm")
_CHOICES: dict[str, tuple[str, ...]] = {"model": MODELS, "dataset": DATASETS, "norm": NORMS}

BATCHNORM_WARNING = (
    "Warning: the model has BatchNorm layers, and the merged running statistics are the "
    "weighted average of the aligned models' statistics, which do not fit the merged weights "
    "(variance collapse): recompute them before use, e.g. with --bn-data-dir."
)


class MergeInputError(ValueError):
    """An input file is unreadable or does not fit the model; the message names the file."""


@dataclass(frozen=True)
class Architecture:
    """The inputs' model, and which of its fields came from the files' metadata.

    Attributes
    ----------
    model, dataset
        The zoo model and its data set; ``None`` when neither given nor in any metadata.
    width, norm
        Width multiplier and normalisation (given, from metadata, or the defaults).
    from_metadata
        The fields (of ``model``, ``dataset``, ``width``, ``norm``) taken from metadata.
    """

    model: str | None
    dataset: str | None
    width: float
    norm: str
    from_metadata: tuple[str, ...]

    def describe(self) -> str:
        """One line: the architecture, and which of it came from the files' metadata."""
        text = f"{self.model} on {self.dataset}, width {self.width:g}, norm {self.norm}"
        if set(self.from_metadata) == set(ARCHITECTURE_FIELDS):
            return f"architecture from file metadata: {text}"
        return f"architecture: {text} ({', '.join(self.from_metadata)} from file metadata)"


@dataclass(frozen=True)
class InputReport:
    """What the merge did with one input: its matching statistics (``None``: not matched)."""

    sweeps: int | None
    objective_gain: float | None
    seconds: float | None


# --------------------------------------------------------------------------------------------
# files


def _unreadable(path: Path, exc: Exception) -> MergeInputError:
    """The error for a file that safetensors cannot open or read, naming ``path``."""
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return MergeInputError(
        f"{path}: not a readable safetensors file (corrupt or another format): {detail}"
    )


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of safetensors file ``path`` (empty if it has none); no tensors.

    Raises
    ------
    MergeInputError
        Naming ``path``, as :func:`read_state_dict` does, if it is not a safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None


def _stored_value(path: Path, field: str, text: str) -> str | float:
    """Metadata ``field`` of ``path`` as the option would hold it: a float width, or a name.

    Raises
    ------
    MergeInputError
        Naming ``path`` and ``field``: a width that is not a number > 0, or a name that is
        not one of the option's choices.
    """
    if field == "width":
        try:
            width = float(text)
        except ValueError:
            width = math.nan
        if not (width > 0 and math.isfinite(width)):
            raise MergeInputError(f"{path}: metadata width {text!r} is not a number > 0")
        return width
    if text not in _CHOICES[field]:
        raise MergeInputError(
            f"{path}: metadata {field} {text!r} is not one of {', '.join(_CHOICES[field])}"
        )
    return text


def _shown(value: str | float) -> str:
    """``value`` for a message: a width as short as it stays exact (``1``, ``0.125``)."""
    if not isinstance(value, float):
        return value
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def resolve_architecture(
    files: Sequence[Path],
    metadata: Sequence[Mapping[str, str]],
    *,
    model: str | None,
    dataset: str | None,
    width: float | None,
    norm: str | None,
) -> Architecture:
    """The architecture: the options given, and the inputs' metadata for those left out.

    Parameters
    ----------
    files, metadata
        The inputs and their safetensors metadata (:func:`read_metadata`), in the same order.
    model, dataset, width, norm
        The options; ``None`` for one not given.

    Returns
    -------
    Architecture
        A field not given is the value that the inputs carrying it store; with none carrying
        it, ``model``/``dataset`` are ``None`` (the caller asks for the option) and
        ``width``/``norm`` are 1.0 and ``batch``.

    Raises
    ------
    MergeInputError
        Two inputs storing different values for a field (naming both files and the field),
        an input storing another value than the option given (naming the file, the field and
        both values), or a stored value that is not valid (naming the file and the field).
        Widths are compared as numbers.
    """
    given: dict[str, str | float | None] = {
        "model": model, "dataset": dataset, "width": width, "norm": norm,
    }  # fmt: skip
    resolved: dict[str, str | float | None] = {}
    from_metadata: list[str] = []
    for field in ARCHITECTURE_FIELDS:
        option = given[field]
        first: tuple[str | float, Path] | None = None
        for path, stored in zip(files, metadata):
            if field not in stored:
                continue
            value = _stored_value(path, field, stored[field])
            if option is not None and value != option:
                raise MergeInputError(
                    f"{path}: its metadata has {field} {_shown(value)}, "
                    f"but --{field} is {_shown(option)}"
                )
            if first is None:
                first = (value, path)
            elif value != first[0]:
                raise MergeInputError(
                    f"inputs disagree on {field}: {first[1]} has {_shown(first[0])}, "
                    f"{path} has {_shown(value)}"
                )
        if option is None and first is not None:
            option = first[0]
            from_metadata.append(field)
        resolved[field] = option
    width_value = resolved["width"]
    norm_value = resolved["norm"]
    return Architecture(
        model=None if resolved["model"] is None else str(resolved["model"]),
        dataset=None if resolved["dataset"] is None else str(resolved["dataset"]),
        width=DEFAULT_WIDTH if width_value is None else float(width_value),
        norm=DEFAULT_NORM if norm_value is None else str(norm_value),
        from_metadata=tuple(from_metadata),
    )


def read_state_dict(path: Path, reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of safetensors file ``path``, checked against ``reference``.

    Never unpickles: safetensors stores raw tensors and a JSON header only.

    Raises
    ------
    MergeInputError
        Naming ``path``: not a safetensors file (corrupt, truncated, another format), or
        keys, shapes or dtypes that differ from ``reference``'s, or NaN/Inf values (naming
        the key).
    """
    from safetensors import SafetensorError, safe_open

    from rebasin.permute import validate_state_dict

    try:
        with safe_open(str(path), framework="pt") as handle:
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None
    try:
        validate_state_dict(state_dict, reference, name=str(path))
    except ValueError as exc:
        raise MergeInputError(str(exc)) from None
    return state_dict


def merged_metadata(
    *,
    method: str,
    model: str,
    dataset: str,
    width: float,
    norm: str,
    files: Sequence[Path],
    weights: Sequence[float],
    reference: int | None,
    seed: int,
    max_iter: int,
    max_rounds: int | None,
    batchnorm: str,
    command: str,
) -> dict[str, str]:
    """The string metadata stored with a merged model (safetensors keeps strings only).

    ``model``/``dataset``/``width``/``norm`` are written as the ServerApp's checkpoints write
    them (``width`` as ``repr(float)``), lists as JSON.
    """
    return {
        "format": MERGED_FORMAT,
        "method": method,
        "model": model,
        "dataset": dataset,
        "width": repr(float(width)),
        "norm": norm,
        "inputs": json.dumps([str(f) for f in files]),
        "weights": json.dumps([float(w) for w in weights]),
        "reference": "" if reference is None else str(reference),
        "seed": str(seed),
        "max_iter": str(max_iter),
        "max_rounds": "" if max_rounds is None else str(max_rounds),
        "batchnorm": batchnorm,
        "command": command,
    }


def check_magnitudes(
    files: Sequence[Path], models: Sequence[Mapping[str, torch.Tensor]], max_norm_ratio: float
) -> None:
    """Refuse, naming the file, an input too large to merge (see
    :func:`rebasin.permute.magnitude_problem`), its norm measured against the inputs' median.

    Raises
    ------
    MergeInputError
        Naming the first such input and why.
    """
    import statistics

    from rebasin.permute import magnitude_problem, model_norm

    median = statistics.median(model_norm(m) for m in models)
    for i, (path, model) in enumerate(zip(files, models)):
        problem = magnitude_problem(model, median, max_norm_ratio, "the inputs' median")
        if problem is not None:
            raise MergeInputError(f"input {i} ({path}): {problem}")


def write_merged(
    path: Path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Write ``state_dict`` and ``metadata`` to ``path`` atomically (temporary file, rename)."""
    from server.checkpoint import write_safetensors

    write_safetensors(path, state_dict, metadata)


# --------------------------------------------------------------------------------------------
# merging


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
    from rebasin.matching import MatchResult
    from rebasin.merge import merge_to_reference

    task = None
    if progress is not None:
        task = progress.add_task(f"aligning to input {reference}", total=len(models) - 1)
    reports = [InputReport(None, None, None) for _ in models]
    last = time.perf_counter()

    def matched(i: int, result: MatchResult) -> None:
        nonlocal last
        now = time.perf_counter()
        gain = float(result.objective[-1] - result.objective[0])
        reports[i] = InputReport(result.sweeps, gain, now - last)
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
    from rebasin.merge import align_many, average

    task = None
    if progress is not None:
        task = progress.add_task(f"MergeMany over {len(models)} models", total=1)
    many = align_many(spec, models, weights, seed=seed, max_rounds=max_rounds, max_iter=max_iter)
    if progress is not None and task is not None:
        progress.advance(task)
    reports = [
        InputReport(s, float(g), t)
        for s, g, t in zip(many.sweeps, many.objective_gains, many.seconds)
    ]
    return average(many.aligned, weights), reports, many.rounds


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


def _with_progress(
    progress: Progress | None, items: Iterable[Path], description: str, total: int
) -> Iterator[Path]:
    """``items`` unchanged, advancing a ``progress`` task of ``total`` steps after each."""
    task = progress.add_task(description, total=total) if progress is not None else None
    for item in items:
        yield item
        if progress is not None and task is not None:
            progress.advance(task)


# --------------------------------------------------------------------------------------------
# the command


def register(app: typer.Typer) -> None:
    """Add the ``merge`` command to ``app``."""
    from simulations.cli import GreedyCommand

    class _MergeCommand(GreedyCommand):
        greedy = frozenset({"--weights"})

    app.command("merge", cls=_MergeCommand)(merge_command)


def merge_command(
    files: Annotated[
        list[Path],
        typer.Argument(
            help="two or more safetensors state dicts of the same model",
            exists=True,
            dir_okay=False,
            readable=True,
            show_default=False,
        ),
    ],
    out: Annotated[
        Path, typer.Option(dir_okay=False, help="merged model (safetensors)", show_default=False)
    ],
    model: Annotated[
        str | None,
        typer.Option(
            click_type=click.Choice(list(MODELS)),
            help="the inputs' architecture, vgg and resnet20 on cifar10 only (default: the "
            "inputs' metadata)",
            show_default=False,
        ),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            click_type=click.Choice(list(DATASETS)),
            help="(default: the inputs' metadata)",
            show_default=False,
        ),
    ] = None,
    width: Annotated[
        float | None,
        typer.Option(
            help="width multiplier, mlp: 512 x width units (default: the inputs' metadata, "
            "else 1.0)",
            show_default=False,
        ),
    ] = None,
    norm: Annotated[
        str | None,
        typer.Option(
            click_type=click.Choice(list(NORMS)),
            help="vgg/resnet20 normalisation, ignored by mlp (default: the inputs' "
            "metadata, else batch)",
            show_default=False,
        ),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            click_type=click.Choice(list(METHODS)),
            help="reference: align every input to one of them, then average; merge-many: "
            "MergeMany, no reference",
        ),
    ] = "reference",
    reference: Annotated[
        int | None,
        typer.Option(help="--method reference: index of the input the others are aligned to"),
    ] = None,
    weights: Annotated[
        list[float] | None,
        typer.Option(
            help="one weight > 0 per file, in file order, e.g. number of training examples "
            "(default: equal)",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, help="matching seed (input i: seed + i); BatchNorm sample")
    ] = 0,
    max_iter: MaxIterOption = 100,
    max_norm_ratio: Annotated[
        float,
        typer.Option(
            help="refuse an input whose norm is more than this many times the inputs' median "
            "norm (a finite but huge input would overflow matching or swamp the average)"
        ),
    ] = DEFAULT_MAX_NORM_RATIO,
    max_rounds: Annotated[
        int, typer.Option(min=1, help="--method merge-many: most rounds over all inputs")
    ] = 20,
    device: Annotated[
        str,
        typer.Option(click_type=click.Choice(["cpu", "cuda"]), help="where matching runs"),
    ] = "cpu",
    bn_data_dir: Annotated[
        Path | None,
        typer.Option(
            file_okay=False,
            help="recompute the BatchNorm running statistics on --dataset's training set "
            "in this data directory (MNIST/raw, CIFAR-10)",
            show_default=False,
        ),
    ] = None,
    bn_examples: Annotated[
        int, typer.Option(min=1, help="--bn-data-dir: training examples to use")
    ] = 5000,
    bn_batch_size: Annotated[int, typer.Option(min=1, help="--bn-data-dir: batch size")] = 128,
    verbose: VerboseOption = False,
) -> None:
    """Merge N saved models of one architecture by Git Re-Basin into one file.

    Each FILE is a safetensors state dict of the model that --model, --dataset,
    --width and --norm build (a ServerApp checkpoint, or save_file of a
    state_dict()); it is read without pickle and must have that model's keys,
    shapes and dtypes, and finite values.

    Each of those four options left out comes from the files' metadata (the
    ServerApp's checkpoints and this command's output store model, dataset,
    width and norm), so server checkpoints merge without them. Every file
    storing a field must agree with the others and with the option given.

    --method reference aligns every input to input --reference (default 0) by
    weight matching and takes the --weights-weighted average; merge-many
    (MergeMany) aligns each input to the mean of the others until nothing
    changes. Input i is matched with seed --seed + i.

    Writes --out: the merged state dict and string metadata (format, method,
    model, dataset, width, norm, inputs, weights, reference, seed, max_iter,
    max_rounds, batchnorm, command); prints per input its weight, matching
    sweeps and objective gain.

    BatchNorm: averaged running statistics do not fit the merged weights.
    --bn-data-dir recomputes them on --bn-examples training images (the first
    ones of each class, order drawn from --seed); without it, a warning.
    """
    import torch
    from rich.console import Console

    from rebasin.matching import MatchingError
    from rebasin.norm import has_batchnorm
    from rebasin.zoo import build_model
    from simulations.cli import command_line, fail, progress_bars, setup_logging

    # Option checks first, as usage errors naming the option (exit code 2).
    if len(files) < 2:
        raise typer.BadParameter(
            f"merge needs at least 2 files, got {len(files)}", param_hint="FILES"
        )
    if weights is not None:
        if len(weights) != len(files):
            raise typer.BadParameter(
                f"got {len(weights)} weights for {len(files)} files (one per file)",
                param_hint="--weights",
            )
        bad = [w for w in weights if not (w > 0 and math.isfinite(w))]
        if bad:
            raise typer.BadParameter(
                f"weights must be > 0 and finite, got {bad[0]:g}", param_hint="--weights"
            )
    if reference is not None:
        if method != "reference":
            raise typer.BadParameter("applies to --method reference only", param_hint="--reference")
        if not 0 <= reference < len(files):
            raise typer.BadParameter(
                f"{reference} is not an input index (0 to {len(files) - 1} for {len(files)} files)",
                param_hint="--reference",
            )
    resolved = {f.resolve() for f in files}
    if out.resolve() in resolved:
        raise typer.BadParameter(f"{out} is one of the input files", param_hint="--out")
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA device here", param_hint="--device")
    if width is not None and not (width > 0 and math.isfinite(width)):
        raise typer.BadParameter(f"must be > 0, got {width:g}", param_hint="--width")
    if not (max_norm_ratio > 0 and math.isfinite(max_norm_ratio)):
        raise typer.BadParameter(
            f"must be > 0 and finite, got {max_norm_ratio:g}", param_hint="--max-norm-ratio"
        )

    # The architecture: the options given, the files' metadata for those left out.
    try:
        architecture = resolve_architecture(
            files,
            [read_metadata(path) for path in files],
            model=model,
            dataset=dataset,
            width=width,
            norm=norm,
        )
    except MergeInputError as exc:
        raise fail(str(exc), code=1) from None
    for option, value in (("--model", architecture.model), ("--dataset", architecture.dataset)):
        if value is None:
            raise click.MissingParameter(
                f"No input's metadata names the {option[2:]}: pass {option}",
                param_hint=f"'{option}'",
                param_type="option",
            )
    model, dataset = str(architecture.model), str(architecture.dataset)
    width, norm = architecture.width, architecture.norm
    try:
        net = build_model(model, dataset, width=width, norm=norm)  # type: ignore[arg-type]
    except ValueError as exc:  # a conv model on MNIST's 1 x 28 x 28 images
        if {"model", "dataset"} & set(architecture.from_metadata):
            raise fail(f"the inputs' metadata: {exc}", code=1) from None
        raise typer.BadParameter(str(exc), param_hint="--model") from None
    batchnorm = has_batchnorm(net)
    if bn_data_dir is not None and not batchnorm:
        raise typer.BadParameter(
            f"model {model!r} with --norm {norm} has no BatchNorm statistics to recompute",
            param_hint="--bn-data-dir",
        )

    setup_logging(verbose)
    ref_index = 0 if reference is None else reference
    weights = [1.0] * len(files) if weights is None else [float(w) for w in weights]
    spec = net.permutation_spec()  # type: ignore[operator]
    template = net.state_dict()
    console = Console()
    err_console = Console(stderr=True)
    if architecture.from_metadata:
        console.print(architecture.describe(), soft_wrap=True, highlight=False)
    start = time.perf_counter()
    # Bars on a terminal only: redirected output keeps the table and messages alone.
    progress = progress_bars(err_console) if err_console.is_terminal else None
    try:
        with progress if progress is not None else contextlib.nullcontext():
            models = [
                read_state_dict(path, template)
                for path in _with_progress(progress, files, "reading inputs", len(files))
            ]
            check_magnitudes(files, models, max_norm_ratio)
            models = [{k: v.to(device) for k, v in m.items()} for m in models]
            rounds = None
            if method == "reference":
                merged, reports = merge_reference(
                    spec, models, weights, ref_index, seed, max_iter, progress
                )
            else:
                merged, reports, rounds = merge_many_models(
                    spec, models, weights, seed, max_iter, max_rounds, progress
                )
            del models
            # strict: the file written below must load into this model as it is.
            net.load_state_dict({k: v.cpu() for k, v in merged.items()}, strict=True)
            bn_note = "averaged" if batchnorm else "none"
            if bn_data_dir is not None:
                try:
                    batches = batchnorm_batches(
                        dataset, bn_data_dir, bn_examples, bn_batch_size, seed
                    )
                except (FileNotFoundError, ValueError) as exc:
                    message = " ".join(str(exc).split())  # one line
                    raise fail(f"--bn-data-dir {bn_data_dir}: {message}", code=1) from None
                recompute_batchnorm(net.to(device), batches, progress)
                seen = sum(len(b) for b in batches)
                bn_note = f"recomputed on {seen} {dataset} training examples"
    except MergeInputError as exc:
        raise fail(str(exc), code=1) from None
    except MatchingError as exc:
        # Finite inputs can still be too large to match (their products overflow).
        where = f"input {exc.model} ({files[exc.model]})" if exc.model is not None else "merge"
        message = str(exc).removeprefix(f"model {exc.model}: ")
        raise fail(f"{where}: weight matching failed: {message}", code=1) from None
    except ValueError as exc:  # the average of finite inputs overflowed
        raise fail(f"the merge failed: {exc}", code=1) from None

    metadata = merged_metadata(
        method=method,
        model=model,
        dataset=dataset,
        width=width,
        norm=norm,
        files=files,
        weights=weights,
        reference=ref_index if method == "reference" else None,
        seed=seed,
        max_iter=max_iter,
        max_rounds=max_rounds if method == "merge-many" else None,
        batchnorm=bn_note,
        command=command_line(),
    )
    write_merged(out, net.state_dict(), metadata)
    if method == "reference":
        title = f"re-basin merge to input {ref_index} ({files[ref_index]})"
    else:
        title = f"MergeMany, {rounds} round(s)"
    print_summary(console, files, weights, reports, title)
    if batchnorm and bn_data_dir is None:
        err_console.print(BATCHNORM_WARNING, style="yellow", soft_wrap=True)
    console.print(
        f"wrote {out} ({method}, {len(files)} models, BatchNorm statistics: {bn_note}) in "
        f"{time.perf_counter() - start:.1f} s",
        soft_wrap=True,
    )
