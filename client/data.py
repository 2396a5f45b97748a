"""A client's local data: its partition of the train / test split, as the configs say.

Every client computes the same partition of the whole dataset (it is a pure function of the
labels and the run's seed) and keeps its own part, so no coordination is needed. The test
split is partitioned the same way, and a client evaluates on its part of it. The result is
cached per process: a simulated node's ClientApp is called many times in one worker.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from client.config import NodeDataConfig
from rebasin.data import LabeledData, load_dataset
from rebasin.partition import dirichlet_split, pathological_split, region_split
from strategies.run_config import RunConfigError, TrainingConfig

logger = logging.getLogger("flwr.rebasin." + __name__)


def iid_split(num_examples: int, num_parts: int, seed: int) -> list[np.ndarray]:
    """A seeded shuffle of ``range(num_examples)`` cut into ``num_parts`` near-equal parts."""
    if not 1 <= num_parts <= num_examples:
        raise ValueError(f"cannot split {num_examples} examples into {num_parts} parts")
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_parts)]


def partition(data: LabeledData, config: TrainingConfig, num_parts: int) -> list[np.ndarray]:
    """Index arrays of the ``num_parts`` parts of ``data`` under ``config.partitioning``."""
    labels = data.labels.numpy()
    if config.partitioning == "iid":
        return iid_split(len(labels), num_parts, config.seed)
    if config.partitioning == "dirichlet":
        return dirichlet_split(labels, num_parts, config.dirichlet_alpha, config.seed)
    if config.partitioning == "pathological":
        return pathological_split(labels, num_parts, config.classes_per_client, config.seed)
    return region_split(
        labels, num_parts, config.region_own_fraction, config.seed, num_classes=data.num_classes
    )


def cap_examples(data: LabeledData, max_examples: int, seed: int) -> LabeledData:
    """At most ``max_examples`` examples of ``data`` (a seeded random choice; 0: all)."""
    if max_examples == 0 or len(data) <= max_examples:
        return data
    keep = np.random.default_rng(seed).choice(len(data), size=max_examples, replace=False)
    return data.subset(np.sort(keep))


def local_data(config: TrainingConfig, node: NodeDataConfig, train: bool) -> LabeledData:
    """This node's examples of the train (``train=True``) or test split.

    Raises
    ------
    RunConfigError
        If the node names a region but the run is not partitioned by region.
    FileNotFoundError
        If the dataset is not in the node's data directory (the message names it).
    """
    if node.region and config.partitioning != "region":
        raise RunConfigError(
            f"node-config 'region' = {node.region!r} needs run-config 'partitioning' = "
            f"'region', got {config.partitioning!r}"
        )
    return _local_data_cached(
        config.dataset,
        node.data_path.resolve(),
        train,
        config.partitioning,
        config.dirichlet_alpha,
        config.classes_per_client,
        config.region_own_fraction,
        config.seed,
        config.max_examples,
        node.partition,
    )


# Keyed per node and split: simulations run many clients in one process.
@functools.lru_cache(maxsize=64)
def _local_data_cached(
    dataset: str,
    data_dir: Path,
    train: bool,
    partitioning: str,
    dirichlet_alpha: float,
    classes_per_client: int,
    region_own_fraction: float,
    seed: int,
    max_examples: int,
    node_partition: tuple[int, int] | None,
) -> LabeledData:
    # Only hashable settings are arguments, so the cache key is exactly what the data depends on.
    config = TrainingConfig(
        dataset=dataset,
        partitioning=partitioning,
        dirichlet_alpha=dirichlet_alpha,
        classes_per_client=classes_per_client,
        region_own_fraction=region_own_fraction,
        seed=seed,
        max_examples=max_examples,
    )
    data = load_dataset(config.dataset, train=train, data_dir=data_dir)
    if node_partition is not None:
        part, num_parts = node_partition
        data = data.subset(partition(data, config, num_parts)[part])
    data = cap_examples(data, max_examples, seed)
    split = "train" if train else "test"
    where = f"partition {node_partition[0]}/{node_partition[1]}" if node_partition else "all"
    logger.info("local %s data: %d examples of %s (%s)", split, len(data), dataset, where)
    return data
