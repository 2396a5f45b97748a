"""Reference models of the Git Re-Basin paper, each with its hand-written permutation spec.

Every model takes a ``width`` multiplier on its hidden widths. Normalisation choices for the
convolutional models: ``"batch"`` (BatchNorm2d), ``"layer"`` (LayerNorm over channels and
space, i.e. ``GroupNorm(1, C)``, which is permutation-equivariant) or ``"none"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rebasin.names import NORM_KINDS, NormKind
from rebasin.spec import PermutationSpec, conv, linear, norm


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def make_norm(kind: NormKind, channels: int) -> nn.Module:
    """A per-channel normalisation layer for ``(N, C, H, W)`` feature maps."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORM_KINDS}, got {kind!r}")


def _norm_spec(name: str, kind: NormKind, p: str) -> dict:
    if kind == "none":
        return {}
    return norm(name, p, running_stats=kind == "batch")


class MLP(nn.Module):
    """Fully connected ReLU network; the paper's MNIST model is ``MLP(hidden=(512,) * 3)``."""

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (512, 512, 512),
        num_classes: int = 10,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("MLP needs at least one hidden layer")
        widths = [in_features] + [_scaled(h, width) for h in hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)

    def permutation_spec(self) -> PermutationSpec:
        """One permutation per hidden layer, ``P0 .. P{k-1}``."""
        axes: dict = {}
        p_in = None
        for i in range(len(self.layers)):
            axes |= linear(f"layers.{i}", p_in, f"P{i}")
            p_in = f"P{i}"
        axes |= linear("head", p_in, None)
        return PermutationSpec(axes)


VGG11: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """VGG for 32 x 32 images: 3x3 conv blocks (conv, norm, ReLU), max-pool at ``"M"``,
    then flatten and one linear classifier."""

    def __init__(
        self,
        cfg: Sequence[int | str] = VGG11,
        num_classes: int = 10,
        width: float = 1.0,
        norm: NormKind = "batch",
        in_channels: int = 3,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        self.norm_kind = norm
        convs, norms, self.pool_after = [], [], []
        channels, size = in_channels, image_size
        for item in cfg:
            if item == "M":
                if not convs:
                    raise ValueError("VGG cfg must start with a conv layer")
                self.pool_after[-1] = True
                size //= 2
                continue
            out = _scaled(int(item), width)
            convs.append(nn.Conv2d(channels, out, 3, padding=1, bias=norm == "none"))
            norms.append(make_norm(norm, out))
            self.pool_after.append(False)
            channels = out
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(norms)
        self.head = nn.Linear(channels * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv_layer, norm_layer, pool in zip(self.convs, self.norms, self.pool_after):
            x = torch.relu(norm_layer(conv_layer(x)))
            if pool:
                x = nn.functional.max_pool2d(x, 2)
        return self.head(torch.flatten(x, 1))

    def permutation_spec(self) -> PermutationSpec:
        """One permutation per conv layer, ``P0 ..``; the classifier sees blocks of H*W."""
        bias = self.norm_kind == "none"
        axes: dict = {}
        p_in = None
        for i in range(len(self.convs)):
            axes |= conv(f"convs.{i}", p_in, f"P{i}", bias=bias)
            axes |= _norm_spec(f"norms.{i}", self.norm_kind, f"P{i}")
            p_in = f"P{i}"
        axes |= linear("head", p_in, None)
        return PermutationSpec(axes)


class BasicBlock(nn.Module):
    """ResNet basic block; a stride-2 1x1 conv shortcut (with norm) where the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: NormKind) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = make_norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=bias)
        self.norm2 = make_norm(norm, out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=bias), make_norm(norm, out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 for 32 x 32 images: 3 stages of 3 basic blocks, ``16, 32, 64`` x ``width``
    channels, global average pooling and a linear classifier."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, norm: NormKind = "batch") -> None:
        super().__init__()
        self.norm_kind = norm
        chans = [_scaled(c, width) for c in (16, 32, 64)]
        self.stem = nn.Conv2d(3, chans[0], 3, padding=1, bias=norm == "none")
        self.stem_norm = make_norm(norm, chans[0])
        blocks, in_ch = [], chans[0]
        for stage, out_ch in enumerate(chans):
            for b in range(3):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(BasicBlock(in_ch, out_ch, stride, norm))
                in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_norm(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.head(x)

    def permutation_spec(self) -> PermutationSpec:
        """``S0 S1 S2``: the residual stream of each stage (shared by every block's output);
        ``B0 .. B8``: the inner channels of each block."""
        kind, bias = self.norm_kind, self.norm_kind == "none"
        axes: dict = conv("stem", None, "S0", bias=bias) | _norm_spec("stem_norm", kind, "S0")
        stream = "S0"
        for i, block in enumerate(self.blocks):
            stage = i // 3
            out = f"S{stage}"
            name = f"blocks.{i}"
            axes |= conv(f"{name}.conv1", stream, f"B{i}", bias=bias)
            axes |= _norm_spec(f"{name}.norm1", kind, f"B{i}")
            axes |= conv(f"{name}.conv2", f"B{i}", out, bias=bias)
            axes |= _norm_spec(f"{name}.norm2", kind, out)
            if isinstance(block.shortcut, nn.Sequential):
                axes |= conv(f"{name}.shortcut.0", stream, out, bias=bias)
                axes |= _norm_spec(f"{name}.shortcut.1", kind, out)
            stream = out
        axes |= linear("head", stream, None)
        return PermutationSpec(axes)
