"""The ServerApp's run-config: every key of ``[tool.flwr.app.config]``, validated with pydantic.

:class:`ServerConfig` adds the server's own keys (rounds, sampling, strategy, checkpoints,
...) to the keys clients read (:class:`strategies.run_config.TrainingConfig`). Unlike the
client side it forbids unknown keys, so a misspelt key in ``pyproject.toml`` is an error at
start instead of a silently ignored setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import ConfigDict, Field, model_validator

from rebasin.data import resolve_data_dir
from rebasin.names import ReferenceName
from rebasin.zoo import CONV_MODELS
from strategies.core import DEFAULT_MAX_NORM_RATIO
from strategies.run_config import TrainingConfig

StrategyName = Literal["rebasin", "fedavg"]


class ServerConfig(TrainingConfig):
    """All run-config keys (kebab-case in ``pyproject.toml``).

    Attributes
    ----------
    num_server_rounds
        Total number of rounds; a resumed run continues up to this round.
    fraction_train, fraction_evaluate
        Fraction of connected nodes sampled for training / federated evaluation (0 for
        evaluation turns it off).
    min_train_nodes, min_evaluate_nodes, min_available_nodes
        Flower's sampling minimums; ``min-train-nodes`` is also the least number of valid
        replies ReBasinFedAvg merges (with fewer it keeps the previous global model).
    round_timeout
        Seconds the server waits for replies in each phase of a round; nodes that have not
        replied by then are left out of the round (and named in the log).
    strategy
        ``rebasin`` (ReBasinFedAvg: align by weight matching, then average) or ``fedavg``.
    reference, max_iter
        ReBasinFedAvg's alignment target (``global``, ``largest``, ``merge-many``) and most
        weight-matching sweeps.
    max_norm_ratio
        ReBasinFedAvg drops a reply whose norm is more than this many times
        ``max(||global model||, 1)`` (see :func:`rebasin.permute.magnitude_problem`).
    eval_on_server, server_eval_examples
        Evaluate the global model on the test set on the server before the first and after
        every round, on at most ``server-eval-examples`` examples (0: all).
    server_data_dir
        The data directory of that server-side evaluation (``""``: ``$REBASIN_DATA_DIR``,
        else ``./data``). A relative path is relative to the ServerApp's working directory.
    bn_recalibration
        After each merge, recompute the BatchNorm statistics from the clients' data (query
        messages; needs a model with BatchNorm).
    checkpoint_dir
        Where the global model is written after every round (safetensors); ``""`` disables.
        A relative path is relative to the ServerApp's working directory.
    resume_from
        A checkpoint file to start from (``""``: start fresh); the run continues with the
        round after the checkpoint's.
    """

    model_config = ConfigDict(extra="forbid")

    num_server_rounds: int = Field(default=3, ge=1)
    fraction_train: float = Field(default=1.0, gt=0, le=1)
    fraction_evaluate: float = Field(default=1.0, ge=0, le=1)
    min_train_nodes: int = Field(default=2, ge=1)
    min_evaluate_nodes: int = Field(default=2, ge=0)
    min_available_nodes: int = Field(default=2, ge=1)
    round_timeout: float = Field(default=3600.0, gt=0)
    strategy: StrategyName = "rebasin"
    reference: ReferenceName = "global"
    max_iter: int = Field(default=100, ge=1)
    max_norm_ratio: float = Field(default=DEFAULT_MAX_NORM_RATIO, gt=0)
    eval_on_server: bool = True
    server_eval_examples: int = Field(default=0, ge=0)
    server_data_dir: str = ""
    bn_recalibration: bool = False
    checkpoint_dir: str = "checkpoints"
    resume_from: str = ""

    @model_validator(mode="after")
    def _bn_recalibration_needs_batchnorm(self) -> Self:
        if self.bn_recalibration and (self.model not in CONV_MODELS or self.norm != "batch"):
            has = {"mlp": "has no normalisation", "vit": "uses LayerNorm"}.get(
                self.model, f"uses norm {self.norm!r}"
            )
            raise ValueError(
                f"'bn-recalibration' = True needs a model with BatchNorm, but model "
                f"{self.model!r} {has}; set 'bn-recalibration' = false or use "
                "model 'vgg'/'resnet20' with norm 'batch'"
            )
        return self

    @property
    def server_data_path(self) -> Path:
        """The data directory of the server-side evaluation, resolved."""
        return resolve_data_dir(self.server_data_dir or None)

    @property
    def checkpoint_path(self) -> Path | None:
        """The checkpoint directory, or ``None`` when checkpointing is off."""
        return Path(self.checkpoint_dir).expanduser() if self.checkpoint_dir else None

    @property
    def resume_path(self) -> Path | None:
        """The checkpoint to resume from, or ``None`` for a fresh start."""
        return Path(self.resume_from).expanduser() if self.resume_from else None

    def training_config(self) -> TrainingConfig:
        """Only the keys clients read (what a ClientApp sees of this config)."""
        return TrainingConfig.from_mapping(self.to_mapping())


def load_server_config(run_config: Mapping[str, Any]) -> ServerConfig:
    """Validate Flower's ``context.run_config``; :class:`RunConfigError` names bad keys."""
    return ServerConfig.from_mapping(run_config, what="run-config")
