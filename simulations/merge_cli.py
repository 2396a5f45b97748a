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

This module holds the command; the inputs' identity is resolved by
:func:`server.identity.resolve_identity`, files are read and written by
:mod:`simulations.merge_io`, and the merging steps are :mod:`simulations.merge_run`. It is
imported when the CLI starts: torch, safetensors and the engine are imported inside the
functions.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Annotated

import click
import typer

from rebasin.names import DATASET_NAMES, MODEL_NAMES, NORM_KINDS
from server.identity import IdentityError, resolve_identity
from simulations.merge_io import (
    MergeInputError,
    check_magnitudes,
    merged_metadata,
    read_metadata,
    read_state_dict,
    write_merged,
)
from simulations.merge_run import (
    batchnorm_batches,
    merge_many_models,
    merge_reference,
    print_summary,
    recompute_batchnorm,
    with_progress,
)
from simulations.settings import MaxIterOption, VerboseOption

DEFAULT_MAX_NORM_RATIO = 1e3  # as the strategies' max_norm_ratio
METHODS: tuple[str, ...] = ("reference", "merge-many")

BATCHNORM_WARNING = (
    "Warning: the model has BatchNorm layers, and the merged running statistics are the "
    "weighted average of the aligned models' statistics, which do not fit the merged weights "
    "(variance collapse): recompute them before use, e.g. with --bn-data-dir."
)


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
            click_type=click.Choice(list(MODEL_NAMES)),
            help="the inputs' architecture, vgg and resnet20 on cifar10 only (default: the "
            "inputs' metadata)",
            show_default=False,
        ),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            click_type=click.Choice(list(DATASET_NAMES)),
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
            click_type=click.Choice(list(NORM_KINDS)),
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
        architecture = resolve_identity(
            files,
            [read_metadata(path) for path in files],
            model=model,
            dataset=dataset,
            width=width,
            norm=norm,
        )
    except (MergeInputError, IdentityError) as exc:
        raise fail(str(exc), code=1) from None
    for option, value in (("--model", architecture.model), ("--dataset", architecture.dataset)):
        if value is None:
            raise click.MissingParameter(
                f"No input's metadata names the {option[2:]}: pass {option}",
                param_hint=f"'{option}'",
                param_type="option",
            )
    identity = architecture.identity()
    model, dataset, norm = identity.model, identity.dataset, identity.norm
    try:
        net = identity.build_model()
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
                for path in with_progress(progress, files, "reading inputs", len(files))
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
        identity=identity,
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
