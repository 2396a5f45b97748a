"""Which architectures the tracer supports: the table of tests/test_architectures.py and README.

Each supported entry builds the model at random weights (``full``: the real architecture, for
functional equivalence; ``small``: the same classes at small widths, for weight matching, which
costs far more than tracing) and a fixed input batch. Each refused entry names the module and
the op the tracer stops at.

``python -m simulations.architectures`` prints the README's table, with trace times measured
on this machine.
"""

from __future__ import annotations

import copy
import datetime
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rebasin.permute import apply_permutation, random_perms
from rebasin.spec import PermutationSpec
from rebasin.trace import UnsupportedModelError, spec_from_module


@dataclass(frozen=True)
class Architecture:
    """A model the tracer handles: how to build it and what to feed it."""

    kind: str  # "torchvision", "torch" or "zoo"
    full: Callable[[], nn.Module]
    small: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    tokens: int | None = None  # token-id inputs (a vocabulary of this size) instead of floats
    note: str = ""

    def example_input(self, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        if self.tokens is not None:
            return torch.randint(0, self.tokens, self.input_shape, generator=gen)
        return torch.randn(self.input_shape, generator=gen)


@dataclass(frozen=True)
class Refusal:
    """A model the tracer refuses, and the start of the reason it gives."""

    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    reason: str  # a regular expression the error message must match


def _tv(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, name)(weights=None, num_classes=10, **kwargs)

    return build


def _small_resnet(block_name: str) -> nn.Module:
    """torchvision's BasicBlock or Bottleneck at widths 16 and 32 (ResNet fixes 64 to 2048)."""
    from torchvision.models import resnet

    block = getattr(resnet, block_name)

    def down(i: int, o: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 1, stride=stride, bias=False), nn.BatchNorm2d(o))

    e = block.expansion
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        block(16, 16 // e, downsample=None if e == 1 else down(16, 16, 1)),
        block(16, 32 // e, stride=2, downsample=down(16, 32, 2)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def _small_resnext() -> nn.Module:
    """torchvision's Bottleneck with 4 groups of 4 channels."""
    from torchvision.models.resnet import Bottleneck

    down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        Bottleneck(16, 4, groups=4, base_width=64, downsample=nn.Sequential(
            nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))),
        Bottleneck(16, 8, stride=2, groups=4, base_width=32, downsample=down),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def _small_regnet() -> nn.Module:
    from torchvision.models.regnet import BlockParams, RegNet

    params = BlockParams.from_init_params(
        depth=2, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25
    )
    return RegNet(params, num_classes=10)


def _small_mobilenet_v2() -> nn.Module:
    """torchvision's InvertedResidual blocks (MobileNetV2 fixes its last 1280 channels)."""
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.ops.misc import Conv2dNormActivation

    return nn.Sequential(
        Conv2dNormActivation(3, 16, stride=2, activation_layer=nn.ReLU6),
        InvertedResidual(16, 8, 1, 1), InvertedResidual(8, 16, 2, 6),
        InvertedResidual(16, 16, 1, 6),
        Conv2dNormActivation(16, 64, kernel_size=1, activation_layer=nn.ReLU6),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


def _small_mnasnet() -> nn.Module:
    """MNASNet at width 0.25 (its stem and head stay 16-32 and 1280 wide)."""
    import torchvision.models as tvm

    return tvm.MNASNet(0.25, num_classes=10)


def _small_mobilenet_v3() -> nn.Module:
    from torchvision.models.mobilenetv3 import InvertedResidualConfig as Cfg
    from torchvision.models.mobilenetv3 import MobileNetV3

    setting = [
        Cfg(16, 3, 16, 16, True, "RE", 2, 1, 0.5), Cfg(16, 3, 72, 24, False, "RE", 2, 1, 0.5),
        Cfg(24, 5, 96, 40, True, "HS", 2, 1, 0.5), Cfg(40, 5, 96, 40, True, "HS", 1, 1, 0.5),
    ]  # fmt: skip
    return MobileNetV3(setting, last_channel=64, num_classes=10)


def _small_vgg() -> nn.Module:
    """torchvision's VGG layers (make_layers with BatchNorm, pooling to 7 x 7, the classifier
    25088 -> 4096 -> 4096 -> 10) at widths 16 to 64: VGG itself would allocate the wide
    classifier."""
    from torchvision.models.vgg import make_layers

    return nn.Sequential(
        make_layers([16, "M", 32, "M", 64, 64, "M"], batch_norm=True),
        nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(),
        nn.Linear(64 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64), nn.ReLU(True),
        nn.Dropout(), nn.Linear(64, 10),
    )  # fmt: skip


def _small_squeezenet() -> nn.Module:
    from torchvision.models.squeezenet import Fire

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(True), nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(16, 8, 16, 16), Fire(32, 8, 16, 16), nn.Dropout(0.5), nn.Conv2d(32, 10, 1),
        nn.ReLU(True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip


def _small_efficientnet() -> nn.Module:
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig

    setting = [
        MBConvConfig(1, 3, 1, 32, 16, 1, 0.25, 1.0),
        MBConvConfig(6, 3, 2, 16, 24, 2, 0.25, 1),
    ]
    return EfficientNet(setting, 0.2, num_classes=10, last_channel=64)


def _small_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10)


def _small_densenet() -> nn.Module:
    from torchvision.models.densenet import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=10)


def _small_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        32, 8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10
    )


def _small_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer([4, 4], 16, [1, 1], [2, 2], [4, 4], num_classes=10)


def _encoder(dim: int, layers: int) -> nn.Module:
    layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.Linear(6, dim), nn.TransformerEncoder(layer, layers), nn.Linear(dim, 3))


def _zoo_vit(width: float, depth: int) -> Callable[[], nn.Module]:
    from rebasin.transformers import ViT

    return lambda: ViT(1, 28, width=width, depth=depth)


def _zoo_gpt(dim: int, depth: int) -> Callable[[], nn.Module]:
    from rebasin.transformers import GPT

    return lambda: GPT(vocab=64, context=32, dim=dim, depth=depth)


IMAGE = (2, 3, 32, 32)
ARCHITECTURES: dict[str, Architecture] = {
    "resnet18": Architecture(
        "torchvision", _tv("resnet18"), lambda: _small_resnet("BasicBlock"), IMAGE
    ),
    "resnet50": Architecture(
        "torchvision", _tv("resnet50"), lambda: _small_resnet("Bottleneck"), IMAGE
    ),
    "vgg11_bn": Architecture("torchvision", _tv("vgg11_bn"), _small_vgg, IMAGE),
    "resnext50_32x4d": Architecture(
        "torchvision", _tv("resnext50_32x4d"), _small_resnext, IMAGE,
        note="grouped convolutions (groups kept intact)",
    ),
    "regnet_y_400mf": Architecture(
        "torchvision", _tv("regnet_y_400mf"), _small_regnet, IMAGE,
        note="grouped convolutions, squeeze-excitation",
    ),
    "mobilenet_v2": Architecture(
        "torchvision", _tv("mobilenet_v2"), _small_mobilenet_v2, IMAGE,
        note="depthwise convolutions",
    ),
    "mobilenet_v3_small": Architecture(
        "torchvision", _tv("mobilenet_v3_small"), _small_mobilenet_v3, IMAGE,
        note="depthwise, squeeze-excitation, Hardswish",
    ),
    "mnasnet0_5": Architecture(
        "torchvision", _tv("mnasnet0_5"), _small_mnasnet, IMAGE,
        note="depthwise; a versioned loader (the state dict's _metadata is kept)",
    ),
    "efficientnet_b0": Architecture(
        "torchvision", _tv("efficientnet_b0"), _small_efficientnet, IMAGE,
        note="depthwise, squeeze-excitation, SiLU, stochastic depth",
    ),
    "convnext_tiny": Architecture(
        "torchvision", _tv("convnext_tiny"), _small_convnext, IMAGE,
        note="depthwise, channels-last LayerNorm (permute), layer scale, stochastic depth",
    ),
    "densenet121": Architecture(
        "torchvision", _tv("densenet121"), _small_densenet, IMAGE, note="torch.cat (Concat axes)"
    ),
    "squeezenet1_0": Architecture(
        "torchvision", _tv("squeezenet1_0"), _small_squeezenet, IMAGE, note="torch.cat"
    ),
    "vit_b_16": Architecture(
        "torchvision", _tv("vit_b_16", image_size=32), _small_vit, (2, 3, 32, 32),
        note="nn.MultiheadAttention (heads), class token, position embedding",
    ),
    "swin_t": Architecture(
        "torchvision", _tv("swin_t"), _small_swin, IMAGE,
        note="partly: its window attention calls F.linear on the weights, which pins the "
        "residual stream; only the MLP units move",
    ),
    "TransformerEncoder": Architecture(
        "torch", lambda: _encoder(64, 2), lambda: _encoder(32, 2), (2, 5, 6),
        note="nn.TransformerEncoder(Layer) as one module",
    ),
    "zoo ViT": Architecture(
        "zoo", _zoo_vit(1.0, 4), _zoo_vit(0.5, 2), (2, 1, 28, 28),
        note="hand-written spec; traced spec equal",
    ),
    "zoo GPT": Architecture(
        "zoo", _zoo_gpt(32, 2), _zoo_gpt(16, 1), (2, 16), tokens=64,
        note="q/k/v Linear + scaled_dot_product_attention; hand-written spec; traced equal",
    ),
}  # fmt: skip

REFUSED: dict[str, Refusal] = {
    "shufflenet_v2_x0_5": Refusal(
        _tv("shufflenet_v2_x0_5"), IMAGE,
        r"module 'stage2\.0' \(InvertedResidual\), method \.view\(\): reshape from "
        r"\(2, 48, 4, 4\) to \(2, 2, 24, 4, 4\) splits the 48 channels",
    ),
}  # fmt: skip


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (torchvision starts some heads and tokens at zero, which would
    hide a wrong permutation) and random BatchNorm statistics; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if p.numel() == 1 or float(p.std()) == 0.0:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.uniform_(0.5, 2.0, generator=gen)
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
    return model.eval()


def traced(arch: Architecture, model: nn.Module) -> tuple[PermutationSpec, float]:
    """The traced spec and the seconds it took."""
    start = time.perf_counter()
    spec = spec_from_module(model, example_input=arch.example_input())
    return spec, time.perf_counter() - start


def permuted_output_error(model: nn.Module, spec: PermutationSpec, x: torch.Tensor) -> float:
    """Relative error ``|f_pi(x) - f(x)| / |f(x)|`` after a random permutation of every
    permutation of ``spec``."""
    state = model.state_dict()
    perms = random_perms(spec, state, seed=1)
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(spec, perms, state))
    with torch.no_grad():
        expected, actual = model(x), other(x)
    return float((actual - expected).norm() / expected.norm())


def main() -> None:
    """Print the README's table of supported architectures (trace times on this machine)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)  # trace times comparable between runs on a shared machine
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"{stamp}; {platform.machine()}, {os.cpu_count()} cores, 1 torch thread; "
        f"torch {torch.__version__}"
    )
    print("| model | kind | status | permutations | trace (s) | rel. error | what it needs |")
    print("|---|---|---|---|---|---|---|")
    for name, arch in ARCHITECTURES.items():
        model = randomize(arch.full())
        spec, seconds = traced(arch, model)
        error = permuted_output_error(model, spec, arch.example_input())
        status = "hand-specified + traced" if arch.kind == "zoo" else "traced"
        print(
            f"| {name} | {arch.kind} | {status} | {len(spec.perm_names)} | {seconds:.2f} | "
            f"{error:.1e} | {arch.note} |"
        )
    for name, refusal in REFUSED.items():
        try:
            spec_from_module(refusal.build().eval(), example_input=torch.randn(refusal.input_shape))
        except UnsupportedModelError as exc:
            print(f"| {name} | torchvision | refused | | | | {str(exc)[:160]} |")


if __name__ == "__main__":
    main()
