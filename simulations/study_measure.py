"""Measurements of the ``study`` command: train two region models, measure their barriers.

One *point* of a study is a pair of models trained apart (region 0 and region 1 of the US/EU
split, each from its own initialisation) and the loss/accuracy barrier on the straight path
between them, measured up to four ways:

* ``naive``: the path between the models as they are (what averaging walks on);
* ``rebasin``: the second model permuted into the first one's basin by weight matching;
* ``naive+bn-reset`` and ``rebasin+bn-reset``: as ``naive`` and ``rebasin``, with every
  model on the path given BatchNorm statistics pooled from both regions' data (only for
  models with BatchNorm; the naive one is the control that tells what the reset alone does).

The barrier of a curve is the largest rise above the endpoints' mean over the lambda grid
(loss) or the largest drop below it (accuracy), :func:`rebasin.merge.barrier`; the grid
holds lambda = 0.5, whose values are also recorded as the ``midpoint_*`` barriers.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from rebasin.align import ReferenceAligner
from rebasin.data import LabeledData
from rebasin.merge import InterpolationCurve, interpolation_curve
from rebasin.norm import (
    batchnorm_stats,
    combine_batchnorm_stats,
    has_batchnorm,
    load_batchnorm_stats,
)
from rebasin.partition import region_split
from rebasin.recipe import TrainRecipe, resolve
from rebasin.spec import StateDict
from rebasin.train import evaluate, train
from rebasin.zoo import build_model
from simulations.oneshot import spec_of

logger = logging.getLogger(__name__)


# Widths searched when matching a parameter count: 2^-8 .. 2^5 times the reference width.
_WIDTH_SEARCH = (2.0**-8, 2.0**5)


# -------------------------------------------------------------------------------------------
# models and their sizes


def count_parameters(model: nn.Module) -> int:
    """Number of trainable values of ``model`` (BatchNorm running statistics not counted)."""
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=4096)
def parameter_count(name: str, dataset: str, width: float, norm: str = "batch") -> int:
    """Parameters of model ``name`` at ``width`` for ``dataset``, counted without allocating.

    The model is built on PyTorch's ``meta`` device, which records shapes only, so that
    wide candidates cost nothing while :func:`width_for_parameters` searches.
    """
    with torch.device("meta"):
        model = build_model(name, dataset, width=width, norm=norm)  # type: ignore[arg-type]
    return count_parameters(model)


def width_for_parameters(name: str, dataset: str, target: int, norm: str = "batch") -> float:
    """The width multiplier whose model has the parameter count closest to ``target``.

    Channel counts are rounded, so the count is a step function of the width; a bisection
    in log-width finds the step that crosses ``target``, and the closer of the two sides is
    taken (the smaller one on a tie), written with as few significant digits as build the
    same model.

    Raises
    ------
    ValueError
        If ``target`` is not positive or lies outside what widths ``2^-8 .. 2^5`` give.
    """
    if target < 1:
        raise ValueError(f"target parameter count must be >= 1, got {target}")
    lo, hi = _WIDTH_SEARCH
    low_count, high_count = (parameter_count(name, dataset, w, norm) for w in (lo, hi))
    if not low_count <= target <= high_count:
        raise ValueError(
            f"{name} on {dataset} has {low_count} to {high_count} parameters at widths "
            f"{lo:g} to {hi:g}; {target} is out of that range"
        )
    for _ in range(40):  # log-width resolution 13 ln 2 / 2^40: far below a rounding step
        mid = float(np.sqrt(lo * hi))
        if parameter_count(name, dataset, mid, norm) < target:
            lo = mid
        else:
            hi = mid
    below, above = (
        parameter_count(name, dataset, lo, norm),
        parameter_count(name, dataset, hi, norm),
    )
    best = lo if target - below <= above - target else hi
    return _simplest_width(name, dataset, best, norm)


def _simplest_width(name: str, dataset: str, width: float, norm: str) -> float:
    """The width with the fewest significant digits that builds the same model as ``width``
    (channel counts are rounded, so a range of widths builds one model)."""
    count = parameter_count(name, dataset, width, norm)
    for digits in range(1, 8):
        rounded = float(f"{width:.{digits}g}")
        if parameter_count(name, dataset, rounded, norm) == count:
            return rounded
    return width


# -------------------------------------------------------------------------------------------
# training with snapshots


class SnapshotLoader:
    """A loader that copies ``model``'s state before chosen optimizer steps.

    :func:`rebasin.train.train` takes one optimizer step per batch and asks for the next
    batch only after that step, so when batch ``k`` (counting from 0 over all epochs) is
    requested the model has taken exactly ``k`` steps. Wrapping the loader therefore
    records the model after ``k`` steps without changing the training loop or its one
    cosine schedule over the whole run; :meth:`finish` records the final state.

    Parameters
    ----------
    loader
        The training loader (its length is the number of steps per epoch).
    model
        The model being trained.
    steps
        Optimizer-step counts at which to record, each in ``[0, epochs * len(loader)]``.
    """

    def __init__(self, loader: Any, model: nn.Module, steps: Sequence[int]) -> None:
        if any(s < 0 for s in steps):
            raise ValueError(f"snapshot steps must be >= 0, got {sorted(steps)}")
        self.loader = loader
        self.model = model
        self.wanted = set(int(s) for s in steps)
        self.snapshots: dict[int, StateDict] = {}
        self.step = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            self._record()
            self.step += 1
            yield batch

    def finish(self) -> dict[int, StateDict]:
        """Record the state after the last step; check every wanted step was recorded."""
        self._record()
        missing = sorted(self.wanted - set(self.snapshots))
        if missing:
            raise ValueError(f"training took {self.step} steps; no snapshot at steps {missing}")
        return self.snapshots

    def _record(self) -> None:
        if self.step in self.wanted and self.step not in self.snapshots:
            self.snapshots[self.step] = {
                # Contiguous copies: channels_last training keeps its weights in that order.
                k: v.detach().clone(memory_format=torch.contiguous_format)
                for k, v in self.model.state_dict().items()
            }


def checkpoint_steps(checkpoints: Sequence[float], steps_per_epoch: int) -> list[int]:
    """Optimizer-step counts of checkpoints given in epochs (``round(epoch * steps)``)."""
    return [int(round(e * steps_per_epoch)) for e in checkpoints]


def train_with_snapshots(
    model: nn.Module,
    data: LabeledData,
    checkpoints: Sequence[float],
    *,
    epochs: int,
    lr: float,
    optimizer: str,
    weight_decay: float,
    batch_size: int,
    loader_seed: int,
    progress: Progress | None = None,
    description: str = "train",
    recipe: TrainRecipe | None = None,
) -> dict[float, StateDict]:
    """Train ``model`` for ``epochs`` (one :func:`~rebasin.train.train` call) and return its
    state at each checkpoint (in epochs, ``0`` is the initialisation)."""
    loader = data.loader(batch_size, shuffle=True, seed=loader_seed)
    steps = checkpoint_steps(checkpoints, len(loader))
    wrapped = SnapshotLoader(loader, model, steps)
    train(
        model,
        wrapped,
        epochs,
        lr,
        optimizer=optimizer,  # type: ignore[arg-type]
        weight_decay=weight_decay,
        progress=progress,
        description=description,
        recipe=recipe,
        seed=loader_seed,
    )
    snapshots = wrapped.finish()
    return {float(e): snapshots[s] for e, s in zip(checkpoints, steps)}


# -------------------------------------------------------------------------------------------
# barriers


def curve_record(lambdas: Sequence[float], losses: Sequence[float], accs: Sequence[float]) -> dict:
    """A curve as JSON data with its barriers over the grid and at lambda = 0.5."""
    curve = InterpolationCurve(list(lambdas), list(losses), list(accs))
    mid = _midpoint_index(curve.lambdas)
    return {
        "lambdas": curve.lambdas,
        "loss": curve.losses,
        "accuracy": curve.accuracies,
        "loss_barrier": curve.loss_barrier,
        "accuracy_barrier": curve.accuracy_barrier,
        "midpoint_loss_barrier": curve.losses[mid] - 0.5 * (curve.losses[0] + curve.losses[-1]),
        "midpoint_accuracy_barrier": 0.5 * (curve.accuracies[0] + curve.accuracies[-1])
        - curve.accuracies[mid],
    }


def _midpoint_index(lambdas: Sequence[float]) -> int:
    for i, lam in enumerate(lambdas):
        if abs(lam - 0.5) < 1e-9:
            return i
    raise ValueError(f"the lambda grid must hold 0.5, got {list(lambdas)}")


def lambda_grid(points: int) -> list[float]:
    """``points`` evenly spaced lambdas in [0, 1]; an odd count so that 0.5 is one of them."""
    if points < 3 or points % 2 == 0:
        raise ValueError(f"the lambda grid needs an odd number >= 3 of points, got {points}")
    return np.linspace(0.0, 1.0, points).tolist()


def compare_methods(
    template: nn.Module,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    test: LabeledData,
    bn_sources: Sequence[LabeledData],
    *,
    lambdas: Sequence[float],
    batch_size: int,
    seed: int,
    max_iter: int,
    repair_batches: int,
) -> dict:
    """Barriers between the models ``a`` and ``b`` (state dicts of ``template``'s class).

    Parameters
    ----------
    template
        A model of the architecture; its weights are not used or changed.
    a, b
        The two models; ``b`` is the one permuted into ``a``'s basin.
    test
        Where loss and accuracy are measured.
    bn_sources
        The regions' training data, for the pooled BatchNorm statistics
        (``repair_batches`` shuffled batches from each).
    lambdas
        The grid, holding 0 and 1 and 0.5.
    seed, max_iter
        Weight matching's seed and most sweeps.

    Returns
    -------
    dict
        ``methods``: per method a :func:`curve_record`; ``endpoints``: loss and accuracy of
        ``a`` and ``b``; ``matching``: weight matching's sweeps, objective gain over the
        identity and seconds.
    """
    lambdas = [float(x) for x in lambdas]
    if lambdas[0] != 0.0 or lambdas[-1] != 1.0:
        raise ValueError(f"the lambda grid must start at 0 and end at 1, got {lambdas}")
    _midpoint_index(lambdas)
    work = copy.deepcopy(template)
    spec = spec_of(template)
    # The one alignment path every caller takes (validation, matching, permuting).
    b_aligned, alignment = ReferenceAligner(spec, a, max_iter=max_iter).align(b, seed=seed)

    plain = _evaluator(work, test, batch_size, None, repair_batches, seed)
    paths: dict[str, tuple[Mapping, Mapping, Callable[[StateDict], tuple[float, float]]]] = {
        "naive": (a, b, plain),
        "rebasin": (a, b_aligned, plain),
    }
    if has_batchnorm(template):
        reset = _evaluator(work, test, batch_size, bn_sources, repair_batches, seed)
        paths["naive+bn-reset"] = (a, b, reset)
        paths["rebasin+bn-reset"] = (a, b_aligned, reset)
    methods = {}
    for name, (x, y, evaluate_point) in paths.items():
        curve = interpolation_curve(x, y, evaluate_point, lambdas)
        methods[name] = curve_record(curve.lambdas, curve.losses, curve.accuracies)
    naive = methods["naive"]
    return {
        "methods": methods,
        "endpoints": [
            {"loss": naive["loss"][0], "accuracy": naive["accuracy"][0]},
            {"loss": naive["loss"][-1], "accuracy": naive["accuracy"][-1]},
        ],
        "matching": {
            "sweeps": alignment.sweeps,
            "objective_gain": alignment.objective_gain,
            "seconds": alignment.seconds,
        },
    }


def _evaluator(
    work: nn.Module,
    test: LabeledData,
    batch_size: int,
    bn_sources: Sequence[LabeledData] | None,
    repair_batches: int,
    seed: int,
) -> Callable[[StateDict], tuple[float, float]]:
    """``state_dict -> (test loss, test accuracy)``, loaded into the working copy ``work``.

    With ``bn_sources``, BatchNorm statistics are first pooled from them; each point gets
    fresh loaders with the same seed, so every lambda sees the same batches.
    """

    def evaluate_point(state_dict: StateDict) -> tuple[float, float]:
        work.load_state_dict(state_dict)
        if bn_sources is not None:
            stats = [
                batchnorm_stats(work, d.loader(batch_size, shuffle=True, seed=seed), repair_batches)
                for d in bn_sources
            ]
            load_batchnorm_stats(work, combine_batchnorm_stats(stats))
        result = evaluate(work, test.loader(max(batch_size, 512)))
        return result.loss, result.accuracy

    return evaluate_point


# -------------------------------------------------------------------------------------------
# a pair of region models


def region_shards(train_set: LabeledData, own_fraction: float, seed: int) -> list[LabeledData]:
    """The two regions' training data of the US/EU split drawn with ``seed``."""
    parts = region_split(train_set.labels, 2, own_fraction, seed)
    sizes = [len(p) for p in parts]
    if min(sizes) == 0:
        raise ValueError(f"a region got no examples (sizes {sizes}); use more data")
    return [train_set.subset(p) for p in parts]


def measure_pair(
    *,
    model: str,
    dataset: str,
    width: float,
    norm: str,
    seed: int,
    shards: Sequence[LabeledData],
    test: LabeledData,
    checkpoints: Sequence[float],
    epochs: int,
    lr: float,
    optimizer: str,
    weight_decay: float,
    batch_size: int,
    lambdas: Sequence[float],
    max_iter: int,
    repair_batches: int,
    progress: Progress | None = None,
    recipe: TrainRecipe | None = None,
) -> list[dict]:
    """Train the two region models of ``seed`` and measure every checkpoint.

    Region ``i``'s model is initialised from seed ``1000 * seed + i`` and shuffled with the
    same seed (as in the one-shot experiment); weight matching uses ``seed``.

    Returns
    -------
    list of dict
        One record per checkpoint (in the order given): the settings, ``epoch``,
        ``steps`` (per region), ``params`` and :func:`compare_methods`' result, with
        ``train_seconds`` (both models) and ``measure_seconds`` (this checkpoint).
    """
    start = time.perf_counter()
    snapshots, steps = [], []
    template: nn.Module | None = None
    for i, shard in enumerate(shards[:2]):
        net = build_model(model, dataset, width=width, norm=norm, seed=1000 * seed + i)  # type: ignore[arg-type]
        if template is None:
            template = net
        steps_per_epoch = -(-len(shard) // batch_size)
        steps.append(checkpoint_steps(checkpoints, steps_per_epoch))
        snapshots.append(
            train_with_snapshots(
                net,
                shard,
                checkpoints,
                epochs=epochs,
                lr=lr,
                optimizer=optimizer,
                weight_decay=weight_decay,
                batch_size=batch_size,
                loader_seed=1000 * seed + i,
                progress=progress,
                description=f"{model} w{width:g} seed {seed}: region {i}",
                recipe=recipe,
            )
        )
    assert template is not None
    train_seconds = time.perf_counter() - start
    records = []
    for j, epoch in enumerate(checkpoints):
        t0 = time.perf_counter()
        measured = compare_methods(
            template,
            snapshots[0][float(epoch)],
            snapshots[1][float(epoch)],
            test,
            shards,
            lambdas=lambdas,
            batch_size=batch_size,
            seed=seed,
            max_iter=max_iter,
            repair_batches=repair_batches,
        )
        records.append(
            {
                "model": model,
                "dataset": dataset,
                "width": width,
                "norm": norm if model != "mlp" else None,
                "params": count_parameters(template),
                "seed": seed,
                "epoch": float(epoch),
                "steps": [s[j] for s in steps],
                "train_examples": [len(s) for s in shards[:2]],
                **measured,
                "training": resolve(recipe or TrainRecipe(), "cpu", optimizer, lr).as_dict(),
                "train_seconds": train_seconds,
                "measure_seconds": time.perf_counter() - t0,
            }
        )
        logger.info(
            "%s w%g seed %d epoch %g: accuracy barrier %s",
            model,
            width,
            seed,
            epoch,
            {m: round(100 * r["accuracy_barrier"], 2) for m, r in measured["methods"].items()},
        )
    return records
