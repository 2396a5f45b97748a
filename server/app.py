"""The ServerApp: run-config -> model -> strategy -> rounds, with checkpoints and evaluation.

``flwr run .`` (simulation) or ``flwr run . <connection>`` (deployment) starts :data:`app`.
Each start validates the run-config (:class:`server.config.ServerConfig`; a bad value stops
the run with a message naming the key), builds the model, optionally resumes from a
checkpoint, and runs the strategy (ReBasinFedAvg or FedAvg) through Flower's
``Strategy.start`` loop, wrapped in :class:`server.rounds.ServerRounds` for the per-round
duties: BatchNorm recalibration, a safetensors checkpoint of the global model after every
round, and naming nodes that did not reply. With ``eval-on-server`` the global model is
evaluated on the test set before the first and after every round. All metrics are written
to ``<checkpoint-dir>/metrics.json`` at the end.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result, Strategy
from torch import nn

from rebasin.data import load_dataset
from rebasin.train import evaluate as evaluate_model
from server.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from server.config import ServerConfig, load_server_config
from server.identity import ModelIdentity
from server.recalibration import recalibrate_batchnorm
from server.rounds import ServerRounds
from strategies import ReBasinFedAvg

logger = logging.getLogger("flwr.rebasin." + __name__)

METRICS_FILE = "metrics.json"

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower's entry point: validate the run-config, then :func:`run_server`."""
    run_server(grid, load_server_config(context.run_config))


def model_identity(config: ServerConfig) -> ModelIdentity:
    """What a checkpoint records about the architecture, and a resume must match."""
    return ModelIdentity(config.model, config.dataset, config.width, config.norm)


def build_strategy(config: ServerConfig, model: nn.Module) -> Strategy:
    """ReBasinFedAvg or FedAvg with the run-config's sampling settings."""
    sampling = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": config.min_train_nodes,
        "min_evaluate_nodes": config.min_evaluate_nodes,
        "min_available_nodes": config.min_available_nodes,
    }
    if config.strategy == "fedavg":
        return FedAvg(**sampling)
    if config.independent_start and config.reference == "global":
        logger.warning(
            "independent-start with reference 'global' aligns round 1's client models to the "
            "untrained initial model; 'largest' or 'merge-many' suit a one-shot merge better"
        )
    return ReBasinFedAvg(
        **sampling,
        model=model,
        reference=config.reference,
        max_iter=config.max_iter,
        seed=config.seed,
        device=None if config.device == "auto" else config.device,
        max_norm_ratio=config.max_norm_ratio,
    )


def resume(config: ServerConfig, model: nn.Module) -> int:
    """Load ``resume-from`` into ``model``; return its round (0 without ``resume-from``).

    Raises
    ------
    CheckpointError
        If the checkpoint is unreadable, of another model, or already at or past
        ``num-server-rounds``.
    """
    path = config.resume_path
    if path is None:
        return 0
    checkpoint = load_checkpoint(
        path, reference=model.state_dict(), identity=model_identity(config)
    )
    if checkpoint.round >= config.num_server_rounds:
        raise CheckpointError(
            f"checkpoint {path} is of round {checkpoint.round}, but 'num-server-rounds' = "
            f"{config.num_server_rounds}: no rounds left to run"
        )
    model.load_state_dict(checkpoint.state_dict)
    logger.info("resuming from %s: round %d done", path, checkpoint.round)
    return checkpoint.round


def server_evaluation(
    config: ServerConfig, round_offset: int
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Flower's ``evaluate_fn``: the global model's loss and accuracy on the test set."""
    test = load_dataset(config.dataset, train=False, data_dir=config.server_data_path)
    if config.server_eval_examples:
        test = test.subset(range(min(config.server_eval_examples, len(test))))
    loader = test.loader(batch_size=256)
    model = config.build_model()
    device = config.torch_device

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        result = evaluate_model(model.to(device), loader)
        logger.info(
            "round %d server evaluation: accuracy %.4f, loss %.4f on %d examples",
            server_round + round_offset,
            result.accuracy,
            result.loss,
            result.num_examples,
        )
        return MetricRecord(
            {"loss": result.loss, "accuracy": result.accuracy, "num-examples": result.num_examples}
        )

    return evaluate


def run_server(grid: Grid, config: ServerConfig) -> Result:
    """Run the federated rounds the config describes; return Flower's ``Result``."""
    model = config.build_model()
    round_offset = resume(config, model)
    strategy = build_strategy(config, model)
    checkpoint_dir = config.checkpoint_path
    identity = model_identity(config)

    def recalibrate(server_round: int, arrays: ArrayRecord, node_ids: list[int]) -> ArrayRecord:
        return recalibrate_batchnorm(
            grid, arrays, config.build_model(), node_ids, server_round, config.round_timeout
        )

    def save(server_round: int, arrays: ArrayRecord) -> None:
        save_checkpoint(checkpoint_dir, server_round, arrays.to_torch_state_dict(), identity)

    rounds = ServerRounds(
        strategy,
        round_timeout=config.round_timeout,
        round_offset=round_offset,
        after_merge=recalibrate if config.bn_recalibration else None,
        on_round_end=save if checkpoint_dir is not None else None,
    )
    result = rounds.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=config.num_server_rounds - round_offset,
        timeout=config.round_timeout,
        evaluate_fn=server_evaluation(config, round_offset) if config.eval_on_server else None,
    )
    if checkpoint_dir is not None:
        write_metrics(checkpoint_dir / METRICS_FILE, result, round_offset)
    return result


def write_metrics(path: Path, result: Result, round_offset: int) -> None:
    """Write ``result``'s metrics per round as JSON, merged into an existing file.

    A resumed run adds its rounds to those already in the file; rounds are numbered as the
    run numbered them (``round_offset`` added, so a resumed run's evaluation of its starting
    model is that of the checkpoint's round).
    """
    sections = {
        "train-clientapp": result.train_metrics_clientapp,
        "evaluate-clientapp": result.evaluate_metrics_clientapp,
        "evaluate-serverapp": result.evaluate_metrics_serverapp,
    }
    merged: dict[str, dict[str, dict]] = {name: {} for name in sections}
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
            for name in sections:
                merged[name].update(previous.get(name, {}))
        except (json.JSONDecodeError, AttributeError) as exc:
            logger.warning("ignoring unreadable metrics file %s: %s", path, exc)
    for name, per_round in sections.items():
        for server_round, record in per_round.items():
            merged[name][str(server_round + round_offset)] = dict(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2, sort_keys=True))
    logger.info("metrics written to %s", path)
