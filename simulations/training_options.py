"""The training-recipe settings that ``simulate`` and ``study`` share (validated, in JSON).

:class:`TrainingOptions` is a pydantic base of both commands' configs: its fields are the
options of :class:`rebasin.recipe.TrainRecipe`, ``None`` meaning the dataset's default
(:meth:`rebasin.recipe.TrainRecipe.for_dataset`). The configs that inherit it have the
``dataset`` and ``optimizer`` fields it reads.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from rebasin.names import Bf16Mode, ScheduleName
from rebasin.recipe import TrainRecipe


class TrainingOptions(BaseModel):
    """Augmentation, label smoothing, schedule, Nesterov, memory order and bf16 settings."""

    augment: bool | None = None
    label_smoothing: float = Field(0.0, ge=0, lt=1, allow_inf_nan=False)
    schedule: ScheduleName | None = None
    max_lr: float | None = Field(None, gt=0, allow_inf_nan=False)
    nesterov: bool = False
    channels_last: bool | None = None
    bf16: Bf16Mode | None = None

    @model_validator(mode="after")
    def _recipe_consistent(self) -> TrainingOptions:
        optimizer = getattr(self, "optimizer", "sgd")
        if self.nesterov and optimizer != "sgd":
            raise ValueError(f"nesterov needs optimizer 'sgd', got {optimizer!r}")
        if self.max_lr is not None and self.schedule != "onecycle":
            raise ValueError("max_lr is the one-cycle peak; it needs schedule 'onecycle'")
        return self

    def recipe(self, model: str | None = None) -> TrainRecipe:
        """The recipe for ``model`` (default: the config's ``model``) on the config's dataset."""
        return TrainRecipe.for_dataset(
            getattr(self, "dataset", ""),
            model or getattr(self, "model", "mlp"),
            augment=self.augment,
            label_smoothing=self.label_smoothing,
            schedule=self.schedule,
            max_lr=self.max_lr,
            nesterov=self.nesterov,
            channels_last=self.channels_last,
            bf16=self.bf16,
        )
