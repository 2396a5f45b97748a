"""The run-config keys that the ServerApp and the ClientApp both read, validated with pydantic.

Flower hands the same ``run_config`` (``[tool.flwr.app.config]`` in ``pyproject.toml`` plus
``flwr run --run-config`` overrides) to the ServerApp and to every ClientApp. The keys that
say *how clients train* (model, data, optimiser, ...) are declared once here, in
:class:`TrainingConfig`; the ServerApp's :class:`server.config.ServerConfig` extends it with
the server's own keys. Keys are kebab-case, as Flower's own (``local-epochs``).

Validation happens at the edge, once per app start: a bad value raises
:class:`RunConfigError` whose message names every offending key and its value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Self

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from rebasin.names import DatasetName, ModelName, NormKind, OptimizerName, ScheduleName
from rebasin.recipe import TrainRecipe
from rebasin.zoo import build_model, check_model_fits_dataset

Partitioning = Literal["iid", "dirichlet", "pathological", "region"]
DeviceName = Literal["auto", "cpu", "cuda"]
# "auto": the dataset's default (TrainRecipe.for_dataset); a run-config has no null.
Switch = Literal["auto", "on", "off"]
ScheduleKey = Literal["auto", ScheduleName]


class RunConfigError(ValueError):
    """A run-config (or node-config) value is missing, unknown or out of range."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def format_validation_error(exc: ValidationError, what: str) -> str:
    """One line per problem: ``'<key>' = <value>: <why>``, headed by ``invalid <what>``.

    Pydantic reports field locations by alias, i.e. by the kebab-case key the user wrote.
    """
    lines = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            lines.append(f"unknown key {error['loc'][0]!r} (= {error['input']!r})")
        elif not error["loc"]:  # a check across several keys
            lines.append(message)
        else:
            key = ".".join(str(part) for part in error["loc"])
            lines.append(f"{key!r} = {error['input']!r}: {message}")
    return f"invalid {what}: " + "; ".join(lines)


class KebabConfig(BaseModel):
    """A frozen, strictly typed model whose fields are read from kebab-case keys."""

    model_config = ConfigDict(
        alias_generator=_kebab,
        populate_by_name=True,
        strict=True,
        frozen=True,
        extra="ignore",
        allow_inf_nan=False,  # width=inf would only fail later, naming no key
    )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], what: str = "run-config") -> Self:
        """Validate ``values`` (kebab-case keys); :class:`RunConfigError` on any problem."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            raise RunConfigError(format_validation_error(exc, what)) from None

    def to_mapping(self) -> dict[str, Any]:
        """The values under their kebab-case keys (what ``from_mapping`` reads back)."""
        return self.model_dump(by_alias=True)


class TrainingConfig(KebabConfig):
    """How clients train: the run-config keys both apps read.

    Attributes
    ----------
    model, width, norm
        Architecture (``mlp``, ``vgg``, ``resnet20``), width multiplier and normalisation of
        the convolutional models (``batch``, ``layer``, ``none``).
    dataset
        ``mnist`` or ``cifar10``; the data directory comes from each node's node-config
        (``data-dir``) or ``$REBASIN_DATA_DIR`` (the server's from ``server-data-dir``).
    partitioning
        How the training and test sets are split among ``num-partitions`` clients: ``iid``,
        ``dirichlet`` (``dirichlet-alpha``), ``pathological`` (``classes-per-client``) or
        ``region`` (each region keeps ``region-own-fraction`` of its own classes).
    local_epochs, learning_rate, batch_size, optimizer
        Local training per round (SGD with momentum and a cosine schedule, or Adam).
    weight_decay
        L2 weight decay of the local optimiser (0: none, the default; the one-shot
        simulations use 5e-4).
    seed
        Seeds the initial global model, the partition and data order.
    independent_start
        In round 1 every client trains from its own seed instead of the global model (the
        one-shot "two models trained apart" scenario).
    max_examples
        Keep at most this many examples of each client's partition (0: all); for quick runs.
    device
        ``auto`` (CUDA when available), ``cpu`` or ``cuda``: where clients train and the
        server matches.
    augment, channels_last, bf16
        The training recipe's switches (:class:`rebasin.recipe.TrainRecipe`): ``auto`` is the
        dataset's default (CIFAR-10: random crop + flip on, channels_last for convolutional
        models, bf16 where the hardware has it; MNIST: all off), else ``on`` / ``off``.
    label_smoothing, schedule, max_lr, nesterov
        Label smoothing in ``[0, 1)``; the learning-rate schedule of each round's local
        training (``auto``: cosine with SGD, constant with Adam; or ``cosine``, ``onecycle``,
        ``constant``); the one-cycle peak (0: the learning rate); Nesterov momentum (SGD).
    """

    model: ModelName = "mlp"
    width: float = Field(default=1.0, gt=0)
    norm: NormKind = "batch"
    dataset: DatasetName = "mnist"
    partitioning: Partitioning = "iid"
    dirichlet_alpha: float = Field(default=0.5, gt=0)
    classes_per_client: int = Field(default=2, ge=1)
    region_own_fraction: float = Field(default=0.8, gt=0, le=1)
    local_epochs: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=0.05, gt=0)
    batch_size: int = Field(default=32, ge=1)
    optimizer: OptimizerName = "sgd"
    weight_decay: float = Field(default=0.0, ge=0)
    seed: int = Field(default=0, ge=0)
    independent_start: bool = False
    max_examples: int = Field(default=0, ge=0)
    device: DeviceName = "auto"
    augment: Switch = "auto"
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    schedule: ScheduleKey = "auto"
    max_lr: float = Field(default=0.0, ge=0)
    nesterov: bool = False
    channels_last: Switch = "auto"
    bf16: Switch = "auto"

    @model_validator(mode="after")
    def _model_fits_dataset(self) -> Self:
        check_model_fits_dataset(self.model, self.dataset)
        return self

    @model_validator(mode="after")
    def _recipe_consistent(self) -> Self:
        if self.nesterov and self.optimizer != "sgd":
            raise ValueError(f"'nesterov' = true needs 'optimizer' = 'sgd', got {self.optimizer!r}")
        if self.max_lr > 0 and self.schedule != "onecycle":
            raise ValueError(
                f"'max-lr' = {self.max_lr} is the one-cycle peak; it needs 'schedule' = "
                f"'onecycle', got {self.schedule!r}"
            )
        return self

    def recipe(self) -> TrainRecipe:
        """The clients' training recipe: the dataset's defaults with this config's keys."""

        def switch(value: str) -> bool | None:
            return None if value == "auto" else value == "on"

        return TrainRecipe.for_dataset(
            self.dataset,
            self.model,
            augment=switch(self.augment),
            label_smoothing=self.label_smoothing,
            schedule=None if self.schedule == "auto" else self.schedule,
            max_lr=self.max_lr or None,
            nesterov=self.nesterov,
            channels_last=switch(self.channels_last),
            bf16=None if self.bf16 == "auto" else self.bf16,
        )

    def build_model(self, seed: int | None = None) -> nn.Module:
        """A freshly initialised model of this config, from ``seed`` (default: ``seed``)."""
        return build_model(
            self.model,
            self.dataset,
            width=self.width,
            norm=self.norm,
            seed=self.seed if seed is None else seed,
        )

    @property
    def torch_device(self) -> torch.device:
        """The device named by ``device``, with ``auto`` resolved."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RunConfigError("invalid run-config: 'device' = 'cuda': CUDA is not available")
        return torch.device(self.device)
