"""One-shot merging: clients train apart from their own initialisations, the server merges once.

This is the US/EU scenario: data that may not be pooled, one model per region, one merge.
Compared: each client alone, naive averaging, re-basin to a reference, re-basin MergeMany,
re-basin with activation repair (federated BatchNorm statistics, or REPAIR for models
without BatchNorm), the logit ensemble (an upper bound that keeps every model), and
optionally centralised training on the pooled data.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field, model_validator
from rich.progress import Progress
from torch import nn

from rebasin.data import LabeledData, load_dataset
from rebasin.merge import average, interpolation_curve, merge_many
from rebasin.names import DatasetName, ModelName, NormKind, OptimizerName
from rebasin.norm import (
    batchnorm_stats,
    combine_batchnorm_stats,
    has_batchnorm,
    load_batchnorm_stats,
    repair,
)
from rebasin.partition import dirichlet_split, pathological_split, region_split
from rebasin.recipe import resolve
from rebasin.spec import PermutationSpec, StateDict
from rebasin.train import evaluate, logit_metrics, predict_logits, train
from rebasin.transformers import is_head_perm, stream_only
from rebasin.zoo import CONV_MODELS, build_model, check_model_fits_dataset
from simulations.training_options import TrainingOptions

if TYPE_CHECKING:
    from simulations.client_store import ClientStore

logger = logging.getLogger(__name__)

Partition = Literal["region", "dirichlet", "pathological"]


class OneShotConfig(TrainingOptions):
    """Settings of a one-shot experiment (validated; every field is in the results JSON).

    The training recipe's fields come from :class:`~simulations.training_options.TrainingOptions`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: DatasetName = "mnist"
    model: ModelName = "mlp"
    width: float = Field(1.0, gt=0)
    norm: NormKind = "batch"
    partition: Partition = "region"
    num_clients: int = Field(2, ge=1)
    own_fraction: float = Field(0.8, gt=0, le=1)
    alpha: float = Field(0.5, gt=0)
    classes_per_client: int = Field(2, ge=1)
    epochs: int = Field(5, ge=1)
    lr: float = Field(0.05, gt=0)
    optimizer: OptimizerName = "sgd"
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(128, ge=1)
    limit_per_class: int | None = Field(None, ge=1)
    test_limit_per_class: int | None = Field(None, ge=1)
    centralized: bool = True
    repair_batches: int = Field(20, ge=1)
    lambdas: int = Field(11, ge=2)
    max_iter: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _check(self) -> OneShotConfig:
        if self.model in CONV_MODELS and self.dataset == "mnist":
            raise ValueError(f"model {self.model!r} needs 3x32x32 images; use mlp for mnist")
        check_model_fits_dataset(self.model, self.dataset)
        return self


def training_of(cfg: OneShotConfig) -> dict:
    """The training this machine resolves for ``cfg``'s clients (what a seed's results record
    as ``training``; bf16 ``auto`` resolves per CPU)."""
    return resolve(cfg.recipe(), "cpu", cfg.optimizer, cfg.lr).as_dict()


def split_clients(cfg: OneShotConfig, labels: torch.Tensor, seed: int) -> list[np.ndarray]:
    """Index arrays, one per client, by the configured partitioner."""
    if cfg.partition == "region":
        return region_split(labels, cfg.num_clients, cfg.own_fraction, seed)
    if cfg.partition == "dirichlet":
        return dirichlet_split(labels, cfg.num_clients, cfg.alpha, seed)
    return pathological_split(labels, cfg.num_clients, cfg.classes_per_client, seed)


def model_metrics(model: nn.Module, test: LabeledData, batch_size: int) -> dict:
    """Test loss, accuracy and per-class accuracy of ``model`` (see :func:`logit_metrics`)."""
    logits, labels = predict_logits(model, test.loader(batch_size))
    return logit_metrics(logits, labels, test.num_classes)


def _load(template: nn.Module, state_dict: StateDict) -> nn.Module:
    model = copy.deepcopy(template)
    model.load_state_dict(state_dict)
    return model.eval()


def spec_of(model: nn.Module) -> PermutationSpec:
    """The model's hand-written spec if it has one, else one traced from the module."""
    if hasattr(model, "permutation_spec"):
        return model.permutation_spec()
    from rebasin.trace import spec_from_module

    return spec_from_module(model)


def load_split(
    cfg: OneShotConfig, seed: int, data_dir: str | Path | None
) -> tuple[LabeledData, LabeledData, list[np.ndarray]]:
    """The training and test sets and the clients' shards of ``seed`` (no shard empty)."""
    train_set = load_dataset(cfg.dataset, True, data_dir, limit_per_class=cfg.limit_per_class)
    test_set = load_dataset(cfg.dataset, False, data_dir, limit_per_class=cfg.test_limit_per_class)
    shards = split_clients(cfg, train_set.labels, seed)
    sizes = [len(s) for s in shards]
    if min(sizes) == 0:
        raise ValueError(f"a client got no examples (shard sizes {sizes}); change the split")
    return train_set, test_set, shards


def fit(
    cfg: OneShotConfig,
    model: nn.Module,
    data: LabeledData,
    description: str,
    seed: int,
    progress: Progress | None,
) -> float:
    """Train ``model`` on ``data`` by ``cfg``'s recipe (loader and augmentation seeded by
    ``seed``); return the seconds it took."""
    start = time.perf_counter()
    train(
        model,
        data.loader(cfg.batch_size, shuffle=True, seed=seed),
        cfg.epochs,
        cfg.lr,
        optimizer=cfg.optimizer,
        weight_decay=cfg.weight_decay,
        progress=progress,
        description=description,
        recipe=cfg.recipe(),
        seed=seed,
    )
    return time.perf_counter() - start


def train_centralized(
    cfg: OneShotConfig,
    seed: int,
    train_set: LabeledData,
    shards: Sequence[np.ndarray],
    progress: Progress | None = None,
) -> tuple[nn.Module, float]:
    """The centralised baseline: one model (seed ``1000 * seed + 999``) trained on the pooled
    shards; returns it and its training seconds."""
    init = 1000 * seed + 999
    model = build_model(cfg.model, cfg.dataset, width=cfg.width, norm=cfg.norm, seed=init)
    pooled = train_set.subset(np.concatenate(shards))
    return model, fit(cfg, model, pooled, f"seed {seed}: centralized", init, progress)


def run_centralized(
    cfg: OneShotConfig,
    seed: int,
    data_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> dict:
    """The centralised baseline of one seed alone, as :func:`run_oneshot` makes it (the same
    data, initialisation and order): ``{"metrics", "train_seconds"}``.

    For runs made without it (``--resume`` adds it to their finished seeds).
    """
    torch.manual_seed(seed)
    train_set, test_set, shards = load_split(cfg, seed, data_dir)
    model, seconds = train_centralized(cfg, seed, train_set, shards, progress)
    return {"metrics": model_metrics(model, test_set, cfg.batch_size), "train_seconds": seconds}


def run_oneshot(
    cfg: OneShotConfig,
    seed: int,
    data_dir: str | Path | None = None,
    progress: Progress | None = None,
    store: ClientStore | None = None,
) -> dict:
    """Run one seed of the one-shot experiment; return every metric as plain JSON data.

    Client ``i`` is initialised from seed ``1000 * seed + i`` and sees only its shard.
    ``store`` keeps each trained client on disk and, where it reuses them, loads a stored
    client instead of training it (listed in ``clients_from_disk``; its ``train_seconds``
    are the stored ones).
    """
    torch.manual_seed(seed)
    train_set, test_set, shards = load_split(cfg, seed, data_dir)
    sizes = [len(s) for s in shards]
    train_seconds: dict[str, float] = {}
    clients = []
    from_disk: list[int] = []
    for i, idx in enumerate(shards):
        model = build_model(
            cfg.model, cfg.dataset, width=cfg.width, norm=cfg.norm, seed=1000 * seed + i
        )
        name = f"client {i}"
        seconds = store.load(cfg, seed, i, model) if store is not None else None
        if seconds is None:
            seconds = fit(
                cfg, model, train_set.subset(idx), f"seed {seed}: {name}", 1000 * seed + i, progress
            )
            if store is not None:
                store.save(cfg, seed, i, model, seconds)
        else:
            from_disk.append(i)
        train_seconds[name] = seconds
        clients.append(model)
    template = clients[0]
    spec = spec_of(template)
    states = [m.state_dict() for m in clients]
    largest = int(np.argmax(sizes))
    timings: dict[str, float] = {}

    def timed(name: str, fn):
        start = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - start
        return out

    def rebasin() -> StateDict:
        # The aligned clients are kept: REPAIR needs them too (one matching per client).
        aligned_states[:] = _align_to(spec, states, largest, seed, cfg.max_iter)
        return average(aligned_states, sizes)

    # Transformers: also re-basin over the residual stream and MLP units only (no heads).
    stream = stream_only(spec) if any(is_head_perm(p) for p in spec.perm_names) else None

    aligned_states: list[StateDict] = []
    merged: dict[str, StateDict] = {
        "naive": timed("naive", lambda: average(states, sizes)),
        "rebasin": timed("rebasin", rebasin),
        "merge-many": timed(
            "merge-many",
            lambda: merge_many(spec, states, sizes, seed=seed, max_iter=cfg.max_iter),
        ),
    }
    stream_states: list[StateDict] = []
    if stream is not None:

        def rebasin_stream() -> StateDict:
            stream_states[:] = _align_to(stream, states, largest, seed, cfg.max_iter)
            return average(stream_states, sizes)

        merged["rebasin-stream"] = timed("rebasin-stream", rebasin_stream)
    models = {name: _load(template, sd) for name, sd in merged.items()}
    # Activation repair. BatchNorm: statistics pooled from per-client moments, as the
    # federated recalibration does. Without BatchNorm: REPAIR against the endpoints.
    repair_loaders = [
        train_set.subset(idx).loader(cfg.batch_size, shuffle=True, seed=seed) for idx in shards
    ]
    pooled_data: LabeledData | None = None  # all regions' data, copied once, for REPAIR only
    for base in ("naive", "rebasin"):
        model = copy.deepcopy(models[base])
        if has_batchnorm(model):
            stats = [batchnorm_stats(model, ld, cfg.repair_batches) for ld in repair_loaders]
            models[f"{base}+bn-reset"] = load_batchnorm_stats(model, combine_batchnorm_stats(stats))
        elif stream is None:
            # REPAIR measures Linear/Conv outputs as (N, C, ...) maps: not for transformers.
            # Its targets are the endpoints' unit statistics: the aligned clients for re-basin,
            # the clients as they are for naive (the control: repair without matching).
            if base == "rebasin":
                endpoints = [_load(template, sd) for sd in aligned_states]
            else:
                endpoints = clients
            if pooled_data is None:
                pooled_data = train_set.subset(np.concatenate(shards))
            pooled = pooled_data.loader(cfg.batch_size, shuffle=True, seed=seed)
            models[f"{base}+repair"] = repair(model, endpoints, pooled, sizes, cfg.repair_batches)

    results: dict = {
        "seed": seed,
        "shard_sizes": sizes,
        "shard_class_counts": [
            np.bincount(train_set.labels[idx].numpy(), minlength=test_set.num_classes).tolist()
            for idx in shards
        ],
        "clients": [model_metrics(m, test_set, cfg.batch_size) for m in clients],
        "methods": {name: model_metrics(m, test_set, cfg.batch_size) for name, m in models.items()},
        "merge_seconds": timings,
        "training": training_of(cfg),
        "train_seconds": train_seconds,
    }
    if from_disk:
        results["clients_from_disk"] = from_disk
    logits = [predict_logits(m, test_set.loader(cfg.batch_size)) for m in clients]
    mean_logits = sum(w * lg for w, (lg, _) in zip(sizes, logits)) / sum(sizes)
    results["methods"]["ensemble"] = logit_metrics(mean_logits, logits[0][1], test_set.num_classes)
    if cfg.centralized:
        pooled_model, train_seconds["centralized"] = train_centralized(
            cfg, seed, train_set, shards, progress
        )
        results["methods"]["centralized"] = model_metrics(pooled_model, test_set, cfg.batch_size)
    if len(clients) >= 2:
        ends = {"rebasin": (spec, aligned_states)}
        if stream is not None:
            ends["rebasin-stream"] = (stream, stream_states)
        b_aligned = {
            name: _aligned_to_first(sp, states, largest, kept, seed, cfg.max_iter)
            for name, (sp, kept) in ends.items()
        }
        results["interpolation"] = _interpolation(
            cfg, states, b_aligned, template, test_set, repair_loaders
        )
    return results


def _align_to(
    spec: PermutationSpec,
    states: Sequence[StateDict],
    reference: int,
    seed: int,
    max_iter: int,
) -> list[StateDict]:
    """Every client aligned to client ``reference`` (as ``merge_to_reference`` does)."""
    from rebasin.align import align_to_reference

    stream = align_to_reference(spec, states, reference=reference, seed=seed, max_iter=max_iter)
    return [item.state_dict for item in stream]


def _aligned_to_first(
    spec: PermutationSpec,
    states: Sequence[StateDict],
    largest: int,
    kept: Sequence[StateDict],
    seed: int,
    max_iter: int,
) -> StateDict:
    """Client 1 aligned to client 0, matched as the merge matches it (seed ``seed + 1``).

    Where client 0 is the merge's reference this is the merge's own aligned client ``kept[1]``,
    so the re-basin path passes through the re-basin merge (its midpoint, for equal weights).
    Weight matching's random unit order finds other local optima under other seeds, so a path
    aligned apart would describe another model than the one reported as merged.
    """
    if largest == 0:
        return kept[1]
    return _align_to(spec, states[:2], 0, seed, max_iter)[1]


def _interpolation(
    cfg: OneShotConfig,
    states: Sequence[StateDict],
    b_aligned: dict[str, StateDict],
    template: nn.Module,
    test_set: LabeledData,
    loaders: Sequence,
) -> dict:
    """Loss and accuracy along the path from client 0 to client 1: naive, and to each of
    ``b_aligned`` (client 1 aligned to client 0, by name: ``rebasin``, ``rebasin-stream``)."""
    a, b = states[0], states[1]
    lambdas = np.linspace(0.0, 1.0, cfg.lambdas).tolist()
    test_loader = test_set.loader(cfg.batch_size)

    def evaluator(bn_reset: bool):
        def evaluate_point(sd: StateDict) -> tuple[float, float]:
            model = _load(template, sd)
            if bn_reset:
                stats = [batchnorm_stats(model, ld, cfg.repair_batches) for ld in loaders[:2]]
                load_batchnorm_stats(model, combine_batchnorm_stats(stats))
            result = evaluate(model, test_loader)
            return result.loss, result.accuracy

        return evaluate_point

    curves = {"naive": interpolation_curve(a, b, evaluator(False), lambdas)}
    for name, end in b_aligned.items():
        curves[name] = interpolation_curve(a, end, evaluator(False), lambdas)
    if has_batchnorm(template):
        curves["rebasin+bn-reset"] = interpolation_curve(
            a, b_aligned["rebasin"], evaluator(True), lambdas
        )
    return {
        name: {
            "lambdas": c.lambdas,
            "loss": c.losses,
            "accuracy": c.accuracies,
            "loss_barrier": c.loss_barrier,
            "accuracy_barrier": c.accuracy_barrier,
        }
        for name, c in curves.items()
    }
