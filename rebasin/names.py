"""The names users choose from, declared once: models, data sets, normalisations, references.

Every other list (run-config types, ``rebasin`` CLI choices, checkpoint metadata checks) is
derived from these. The module imports nothing heavy, so that the CLI can build its option
choices from it without importing torch.
"""

from __future__ import annotations

from typing import Literal, get_args

# The zoo's models (rebasin.zoo.build_model builds each).
ModelName = Literal["mlp", "vgg", "resnet20", "vit"]
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)

# The data sets rebasin.data loads.
DatasetName = Literal["mnist", "cifar10"]
DATASET_NAMES: tuple[str, ...] = get_args(DatasetName)

# Normalisation of the convolutional models (rebasin.models.make_norm).
NormKind = Literal["batch", "layer", "none"]
NORM_KINDS: tuple[str, ...] = get_args(NormKind)

# What a federated merge aligns the clients' models to: the round's global model, the client
# with the most examples, or each other (MergeMany, rebasin.merge.merge_many).
ReferenceName = Literal["global", "largest", "merge-many"]
REFERENCE_NAMES: tuple[str, ...] = get_args(ReferenceName)

# Local optimisers (rebasin.train.make_optimizer): SGD with momentum, or Adam.
OptimizerName = Literal["sgd", "adam"]
OPTIMIZER_NAMES: tuple[str, ...] = get_args(OptimizerName)

# Learning-rate schedules (rebasin.recipe.make_scheduler).
ScheduleName = Literal["cosine", "onecycle", "constant"]
SCHEDULE_NAMES: tuple[str, ...] = get_args(ScheduleName)

# bf16 autocast (rebasin.recipe.TrainRecipe.bf16): where supported, always, never.
Bf16Mode = Literal["auto", "on", "off"]
BF16_MODES: tuple[str, ...] = get_args(Bf16Mode)
