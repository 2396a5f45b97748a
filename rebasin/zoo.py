"""Build a reference model by name for a dataset: the one model factory of the project.

The ServerApp, the ClientApp and the simulations all need "the model named ``mlp`` at width
0.5 for MNIST"; they get it here, so that every side builds exactly the same architecture
(same state-dict keys and shapes) from the same few settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rebasin.models import MLP, VGG, ResNet20
from rebasin.names import MODEL_NAMES, NormKind
from rebasin.transformers import ViT


@dataclass(frozen=True)
class InputGeometry:
    """What a dataset feeds a model: image channels, height, width and number of classes."""

    channels: int
    height: int
    width: int
    num_classes: int

    @property
    def features(self) -> int:
        """Number of input values per example (what an MLP's first layer sees)."""
        return self.channels * self.height * self.width


# The datasets rebasin.data loads, as the models see them.
DATASET_GEOMETRY: dict[str, InputGeometry] = {
    "mnist": InputGeometry(channels=1, height=28, width=28, num_classes=10),
    "cifar10": InputGeometry(channels=3, height=32, width=32, num_classes=10),
}

# The convolutional models are the paper's CIFAR models: VGG-11 halves the image five times
# and ResNet-20's stem takes RGB, so both need 3 x 32 x 32 inputs.
_CONV_INPUT = (3, 32, 32)
CONV_MODELS = ("vgg", "resnet20")
# The ViT cuts images into patches of this size; both datasets' images are multiples of it.
VIT_PATCH = 4


def dataset_geometry(dataset: str) -> InputGeometry:
    """The input geometry of ``dataset``; ``ValueError`` naming the known ones otherwise."""
    try:
        return DATASET_GEOMETRY[dataset]
    except KeyError:
        raise ValueError(
            f"unknown dataset {dataset!r}; expected one of {tuple(DATASET_GEOMETRY)}"
        ) from None


def check_model_fits_dataset(name: str, dataset: str) -> None:
    """Raise ``ValueError`` unless model ``name`` can take ``dataset``'s images.

    The MLP takes any image size, the ViT any multiple of its patch size; VGG and ResNet-20
    need 3 x 32 x 32 images.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    geometry = dataset_geometry(dataset)
    shape = (geometry.channels, geometry.height, geometry.width)
    if name in CONV_MODELS and shape != _CONV_INPUT:
        raise ValueError(
            f"model {name!r} needs 3x32x32 images, but dataset {dataset!r} has "
            f"{'x'.join(map(str, shape))}; use model 'mlp' or 'vit' for {dataset!r}"
        )
    if name == "vit" and (geometry.height % VIT_PATCH or geometry.width % VIT_PATCH):
        raise ValueError(
            f"model 'vit' needs images whose sides are multiples of {VIT_PATCH}, but dataset "
            f"{dataset!r} has {geometry.height}x{geometry.width}"
        )


def build_model(
    name: str,
    dataset: str,
    *,
    width: float = 1.0,
    norm: NormKind = "batch",
    seed: int | None = None,
) -> nn.Module:
    """The reference model ``name`` sized for ``dataset``, initialised from ``seed``.

    Parameters
    ----------
    name
        ``"mlp"`` (three hidden layers of 512 x ``width``), ``"vgg"`` (VGG-11),
        ``"resnet20"`` or ``"vit"`` (a 4-block ViT of width 64 x ``width``, 4 heads).
    dataset
        ``"mnist"`` or ``"cifar10"``: sets the input size and the number of classes.
    width
        Width multiplier of the hidden layers, > 0.
    norm
        Normalisation of the convolutional models (``"batch"``, ``"layer"``, ``"none"``);
        ignored by the MLP, which has none, and the ViT (LayerNorm).
    seed
        Seeds the initial weights without touching the global random state; ``None`` draws
        them from the global generator.

    Raises
    ------
    ValueError
        On an unknown model or dataset, a model that cannot take the dataset's images, or
        ``width <= 0``.
    """
    check_model_fits_dataset(name, dataset)
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    geometry = dataset_geometry(dataset)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if name == "mlp":
            return MLP(geometry.features, num_classes=geometry.num_classes, width=width)
        if name == "vgg":
            return VGG(num_classes=geometry.num_classes, width=width, norm=norm)
        if name == "vit":
            return ViT(
                geometry.channels,
                geometry.height,
                num_classes=geometry.num_classes,
                width=width,
                patch=VIT_PATCH,
            )
        return ResNet20(num_classes=geometry.num_classes, width=width, norm=norm)
