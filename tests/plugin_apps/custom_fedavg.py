"""A user's own FedAvg subclass, shaped like Flower's advanced PyTorch example: a learning
rate schedule in ``configure_train`` and a ``start`` of its own that keeps the best round and
writes the results of every round to a JSON file. Re-basin comes in with the marked lines."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from strategies import ReBasin  # re-basin


class CustomFedAvg(ReBasin, FedAvg):  # re-basin: was `class CustomFedAvg(FedAvg):`
    """FedAvg with a learning-rate schedule and its own round loop."""

    def __init__(self, *args, results_path: Path, halve_lr_at: int = 2, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.results_path = results_path
        self.halve_lr_at = halve_lr_at
        self.best_round: int | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid):  # fmt: skip
        if server_round >= self.halve_lr_at:
            config = ConfigRecord({**config, "lr": float(config["lr"]) * 0.5})
        return super().configure_train(server_round, arrays, config, grid)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None) -> Result:  # fmt: skip
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result, arrays, rounds, best = Result(), initial_arrays, [], -1.0
        for server_round in range(1, num_rounds + 1):
            replies = grid.send_and_receive(
                self.configure_train(server_round, arrays, train_config, grid), timeout=timeout
            )
            new_arrays, metrics = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            replies = grid.send_and_receive(
                self.configure_evaluate(server_round, arrays, evaluate_config, grid),
                timeout=timeout,
            )
            evaluation = self.aggregate_evaluate(server_round, replies)
            accuracy = float(evaluation["accuracy"]) if evaluation is not None else -1.0
            if accuracy > best:
                best, self.best_round = accuracy, server_round
            rounds.append({"round": server_round, "accuracy": accuracy,
                           "train": dict(metrics) if metrics is not None else {}})  # fmt: skip
        self.results_path.write_text(json.dumps(rounds))
        return result
