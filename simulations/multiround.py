"""Multi-round federated training: Flower's FedAvg against ReBasinFedAvg, several local epochs.

Each strategy runs the project's ServerApp logic (:func:`server.app.run_server`) against the
project's ClientApp (:data:`client.app.app`), one simulated SuperNode per client, through
:class:`simulations.local_grid.LocalGrid` (in-process message delivery; see there why not Ray).
The run-config is built from the experiment settings, so the clients partition the data
exactly as the one-shot experiment does for the same scenario and seed, only of the full
dataset (see :func:`max_examples_per_client` for quick runs).

Recorded per round: the global model's test loss and accuracy on the server (round 0 is the
initial model), the clients' weighted evaluation on their own test parts, and the mean
training loss; after the last round, the final global model's per-class test accuracy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

from flwr.app import Message
from pydantic import BaseModel, ConfigDict, Field, field_validator
from rich.progress import Progress

from client.app import app as client_app
from client.config import NodeDataConfig
from client.data import local_data
from rebasin.data import DATA_DIR_ENV, load_dataset, resolve_data_dir
from rebasin.names import ReferenceName
from rebasin.zoo import build_model
from server.app import run_server
from server.config import ServerConfig, StrategyName
from simulations.local_grid import LocalGrid, server_identity
from simulations.oneshot import OneShotConfig, model_metrics

logger = logging.getLogger(__name__)

# The run-config's partitioning name for each one-shot partition.
_PARTITIONING = {"region": "region", "dirichlet": "dirichlet", "pathological": "pathological"}


class MultiRoundConfig(BaseModel):
    """Settings of the multi-round experiment (the rest comes from :class:`OneShotConfig`).

    Attributes
    ----------
    rounds
        Federated rounds per strategy.
    strategies
        Which strategies to run, in order: ``fedavg`` (Flower's) and/or ``rebasin``.
    reference
        ReBasinFedAvg's alignment target; ``None`` picks ``largest`` with an independent start
        (round 1's global model is untrained, a poor target) and ``global`` otherwise.
    independent_start
        In round 1 every client trains from its own initialisation (the one-shot setting
        repeated over rounds); otherwise all start from the global model, as in plain FedAvg.
    bn_recalibration
        After each merge, pool the clients' BatchNorm statistics of the merged model (needs a
        model with BatchNorm).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rounds: int = Field(5, ge=1)
    strategies: tuple[StrategyName, ...] = ("fedavg", "rebasin")
    reference: ReferenceName | None = None
    independent_start: bool = True
    bn_recalibration: bool = False

    @field_validator("strategies")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("give at least one strategy")
        if len(set(value)) != len(value):
            raise ValueError(f"strategies must be distinct, got {list(value)}")
        return value

    @property
    def resolved_reference(self) -> ReferenceName:
        """The reference ReBasinFedAvg uses."""
        if self.reference is not None:
            return self.reference
        return "largest" if self.independent_start else "global"


def max_examples_per_client(experiment: OneShotConfig, num_classes: int = 10) -> int:
    """The clients' ``max-examples`` cap (0: none) that matches ``limit_per_class``.

    The one-shot experiment splits the first ``limit_per_class`` examples of every class;
    the ClientApp splits the whole dataset and keeps a seeded random ``max-examples`` of its
    part. Capping every client at its share of ``limit_per_class * num_classes`` gives about
    the same amount of data per client with the same class skew.
    """
    if experiment.limit_per_class is None:
        return 0
    return math.ceil(experiment.limit_per_class * num_classes / experiment.num_clients)


def server_config(
    experiment: OneShotConfig, rounds: MultiRoundConfig, strategy: StrategyName, seed: int
) -> ServerConfig:
    """The ServerApp's run-config for one strategy and seed, validated by ServerConfig.

    Raises
    ------
    strategies.run_config.RunConfigError
        If the combination is invalid (for example BatchNorm recalibration of an MLP).
    """
    num_classes = 10  # both datasets have ten classes
    k = experiment.num_clients
    test_examples = (
        experiment.test_limit_per_class * num_classes if experiment.test_limit_per_class else 0
    )
    values = {
        "num-server-rounds": rounds.rounds,
        "fraction-train": 1.0,
        "fraction-evaluate": 1.0,
        "min-train-nodes": k,
        "min-evaluate-nodes": k,
        "min-available-nodes": k,
        "round-timeout": 24 * 3600.0,
        "strategy": strategy,
        "reference": rounds.resolved_reference,
        "max-iter": experiment.max_iter,
        "model": experiment.model,
        "width": float(experiment.width),
        "norm": experiment.norm,
        "dataset": experiment.dataset,
        "partitioning": _PARTITIONING[experiment.partition],
        "dirichlet-alpha": float(experiment.alpha),
        "classes-per-client": experiment.classes_per_client,
        "region-own-fraction": float(experiment.own_fraction),
        "local-epochs": experiment.epochs,
        "learning-rate": float(experiment.lr),
        "batch-size": experiment.batch_size,
        "optimizer": experiment.optimizer,
        "seed": seed,
        "independent-start": rounds.independent_start,
        "max-examples": max_examples_per_client(experiment, num_classes),
        "device": "auto",
        "eval-on-server": True,
        "server-eval-examples": test_examples,
        "bn-recalibration": rounds.bn_recalibration,
        # Metrics come back in Flower's Result; checkpoints are not needed for a simulation.
        "checkpoint-dir": "",
        "resume-from": "",
    }
    return ServerConfig.from_mapping(values, what="multi-round run-config")


def validate_multiround(experiment: OneShotConfig, rounds: MultiRoundConfig) -> None:
    """Build every strategy's run-config once, so a bad combination fails before any work."""
    for strategy in rounds.strategies:
        server_config(experiment, rounds, strategy, seed=0)


@contextlib.contextmanager
def _data_dir_env(data_dir: Path) -> Iterator[None]:
    """Point ``$REBASIN_DATA_DIR`` at ``data_dir`` for the block.

    The ServerApp's evaluation loads the test set from the environment's data directory (its
    run-config has no data directory), so the simulation sets it for the ServerApp's sake.
    """
    saved = os.environ.get(DATA_DIR_ENV)
    os.environ[DATA_DIR_ENV] = str(data_dir)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(DATA_DIR_ENV, None)
        else:
            os.environ[DATA_DIR_ENV] = saved


def _series(per_round: dict, key: str, rounds: list[int]) -> list[float | None]:
    """``per_round[r][key]`` for every round (``None`` where a round has no such metric)."""
    out: list[float | None] = []
    for r in rounds:
        record = per_round.get(r)
        value = record.get(key) if record is not None else None
        out.append(None if value is None else float(value))
    return out


def run_multiround(
    experiment: OneShotConfig,
    rounds: MultiRoundConfig,
    seed: int,
    data_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> dict:
    """Run every strategy of ``rounds`` for one seed; return its metrics as plain JSON data.

    Returns
    -------
    dict
        ``{"seed", "rounds": [0..R], "shard_sizes", "shard_class_counts", "strategies":
        {name: {"server": {"loss", "accuracy"} per round 0..R, "clients": {"loss",
        "accuracy"} per round 1..R (``None`` at 0), "train_loss" per round, "final":
        {"loss", "accuracy", "per_class_accuracy"}, "wall_seconds"}}}``.
    """
    root = resolve_data_dir(data_dir).resolve()
    test_set = load_dataset(
        experiment.dataset, False, root, limit_per_class=experiment.test_limit_per_class
    )
    k = experiment.num_clients
    result: dict = {"seed": seed, "rounds": list(range(rounds.rounds + 1)), "strategies": {}}
    for strategy in rounds.strategies:
        config = server_config(experiment, rounds, strategy, seed)
        if "shard_sizes" not in result:
            # What the ClientApps train on: the same call they make, so the same data.
            shards = [
                local_data(
                    config.training_config(),
                    NodeDataConfig(partition_id=i, num_partitions=k, data_dir=str(root)),
                    train=True,
                )
                for i in range(k)
            ]
            result["shard_sizes"] = [len(s) for s in shards]
            result["shard_class_counts"] = [s.class_counts().tolist() for s in shards]
        per_message = 2 + (1 if rounds.bn_recalibration else 0)  # train, evaluate, BN query
        task = (
            progress.add_task(
                f"seed {seed}: {strategy}, {rounds.rounds} rounds",
                total=rounds.rounds * k * per_message,
            )
            if progress is not None
            else None
        )

        def advance(_reply: Message, task=task) -> None:
            if task is not None:
                progress.advance(task)  # type: ignore[union-attr]

        grid = LocalGrid(
            client_app,
            k,
            config.to_mapping(),
            run_id=1000 + seed,
            node_config={"data-dir": str(root)},
            on_reply=advance,
        )
        random.seed(seed)  # Flower samples nodes with the random module
        start = time.perf_counter()
        with server_identity(grid.run.run_id), _data_dir_env(root):
            flower_result = run_server(grid, config)
        wall = time.perf_counter() - start
        steps = result["rounds"]
        final = build_model(
            experiment.model, experiment.dataset, width=experiment.width, norm=experiment.norm
        )
        final.load_state_dict(flower_result.arrays.to_torch_state_dict())
        result["strategies"][strategy] = {
            "server": {
                "loss": _series(flower_result.evaluate_metrics_serverapp, "loss", steps),
                "accuracy": _series(flower_result.evaluate_metrics_serverapp, "accuracy", steps),
            },
            "clients": {
                "loss": _series(flower_result.evaluate_metrics_clientapp, "eval-loss", steps),
                "accuracy": _series(flower_result.evaluate_metrics_clientapp, "eval-acc", steps),
            },
            "train_loss": _series(flower_result.train_metrics_clientapp, "train-loss", steps),
            "final": model_metrics(final, test_set, experiment.batch_size),
            "wall_seconds": wall,
        }
        logger.info(
            "seed %d %s: final accuracy %.4f after %d rounds (%.1f s)",
            seed,
            strategy,
            result["strategies"][strategy]["final"]["accuracy"],
            rounds.rounds,
            wall,
        )
    return result
