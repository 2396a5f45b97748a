"""Specs built by tracing (rebasin.trace): equal to hand-written ones, function-preserving,
and clear errors for ops that are not permutation-equivariant."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rebasin.models import MLP, VGG, ResNet20
from rebasin.permute import apply_permutation, random_perms
from rebasin.spec import Grid, PermutationSpec, SpecError
from rebasin.trace import UnsupportedModelError, spec_from_module

HAND_SPEC_MODELS = {
    "mlp-default": lambda: MLP(),
    "mlp-small": lambda: MLP(in_features=20, hidden=(16, 12, 8), num_classes=3),
    "mlp-one-hidden": lambda: MLP(hidden=(32,), width=0.5),
    "vgg-batch": lambda: VGG(width=0.25, norm="batch"),
    "vgg-layer": lambda: VGG(width=0.25, norm="layer"),
    "vgg-none": lambda: VGG(width=0.25, norm="none"),
    "resnet20-batch": lambda: ResNet20(width=1, norm="batch"),
    "resnet20-layer": lambda: ResNet20(width=1, norm="layer"),
    "resnet20-none": lambda: ResNet20(width=1, norm="none"),
}


def _randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random affine parameters and running statistics, so that permuting them wrongly shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen))
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def _assert_function_preserved(
    model: nn.Module, spec: PermutationSpec, x: torch.Tensor, seed: int = 0
) -> None:
    """Random permutations of ``spec`` change the weights but not the outputs."""
    state = model.state_dict()
    spec.check(state)
    perms = random_perms(spec, state, seed=seed)
    assert perms, "the spec has no permutation to test"
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in perms.values())
    permuted_state = apply_permutation(spec, perms, state)
    assert any(not torch.equal(state[k], permuted_state[k]) for k in state)
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(permuted_state)
    with torch.no_grad():
        expected, actual = model(x), permuted(x)
    gap = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-5), f"outputs differ by {gap}"


@pytest.mark.parametrize("name", sorted(HAND_SPEC_MODELS))
def test_traced_spec_equals_hand_written(name: str) -> None:
    torch.manual_seed(0)
    model = HAND_SPEC_MODELS[name]()
    spec = spec_from_module(model)
    assert spec.canonical() == model.permutation_spec().canonical()
    assert set(spec.axes_to_perm) == set(model.state_dict())
    spec.check(model.state_dict())


def test_perm_names_follow_the_first_producing_layer() -> None:
    spec = spec_from_module(MLP(hidden=(8, 8)))
    assert spec.perm_names == ["P_layers.0", "P_layers.1"]
    assert spec.axes_to_perm["layers.1.weight"] == ("P_layers.1", "P_layers.0")
    assert spec.axes_to_perm["head.bias"] == (None,)
    # A residual stream is named after the layer that starts it (the stem).
    resnet = spec_from_module(ResNet20(norm="batch"))
    assert resnet.axes_to_perm["blocks.2.conv2.weight"][0] == "P_stem"
    assert resnet.axes_to_perm["stem_norm.num_batches_tracked"] == ()


def test_flatten_after_conv_moves_blocks_of_pixels() -> None:
    torch.manual_seed(0)
    model = _randomize_norms(VGG(cfg=(8, "M", 16), width=1, norm="batch"))
    assert model.head.in_features == 16 * 16 * 16
    spec = spec_from_module(model)
    assert spec.canonical() == model.permutation_spec().canonical()
    assert spec.axes_to_perm["head.weight"] == (None, "P_convs.1")
    assert spec.perm_sizes(model.state_dict()) == {"P_convs.0": 8, "P_convs.1": 16}
    _assert_function_preserved(model, spec, torch.randn(4, 3, 32, 32))


def test_the_check_can_fail_with_a_wrong_spec() -> None:
    """Sanity check of the helper: dropping one axis from the spec breaks the function."""
    torch.manual_seed(0)
    model = MLP(in_features=6, hidden=(10, 10), num_classes=3).eval()
    axes = dict(spec_from_module(model).axes_to_perm)
    axes["layers.1.weight"] = ("P_layers.1", None)
    with pytest.raises(AssertionError):
        _assert_function_preserved(model, PermutationSpec(axes), torch.randn(5, 6))


class LayerNormMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln1 = nn.Linear(6, 12), nn.LayerNorm(12)
        self.fc2, self.ln2 = nn.Linear(12, 10), nn.LayerNorm(10)
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.ln1(self.fc1(x)))
        x = torch.tanh(self.ln2(self.fc2(x)))
        return self.head(x)


def test_layer_norm_mlp() -> None:
    torch.manual_seed(0)
    model = _randomize_norms(LayerNormMLP())
    spec = spec_from_module(model)
    assert spec.axes_to_perm["ln1.weight"] == ("P_fc1",)
    assert spec.axes_to_perm["ln2.bias"] == ("P_fc2",)
    assert spec.axes_to_perm["fc2.weight"] == ("P_fc2", "P_fc1")
    _assert_function_preserved(model, spec, torch.randn(5, 6))


def test_sequential_with_modules() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.GroupNorm(1, 8),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 12),
        nn.BatchNorm1d(12),
        nn.Dropout(0.5),
        nn.ReLU(),
        nn.Linear(12, 4),
    )
    model = _randomize_norms(model)
    spec = spec_from_module(model)
    assert spec.perm_names == ["P_0", "P_4", "P_9"]
    assert spec.axes_to_perm["1.running_var"] == ("P_0",)
    assert spec.axes_to_perm["1.num_batches_tracked"] == ()
    assert spec.axes_to_perm["5.weight"] == ("P_4",)
    assert spec.axes_to_perm["9.weight"] == ("P_9", "P_4")
    assert spec.axes_to_perm["10.running_mean"] == ("P_9",)
    assert spec.axes_to_perm["13.weight"] == (None, "P_9")
    _assert_function_preserved(model, spec, torch.randn(4, 3, 8, 8))


class FunctionalNet(nn.Module):
    """The same kinds of ops written as functions, methods and operators."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6 * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 10)
        self.head = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = torch.add(x, torch.relu(self.conv2(x)))  # residual: conv1 and conv2 share a perm
        x = x + self.conv3(x).relu() * 0.5
        x = F.avg_pool2d(F.dropout(x, 0.1, self.training), 2)
        x = self.fc(x.view(x.size(0), -1))
        y = torch.sigmoid(self.fc2(x.flatten(1)))
        return self.head(x * y - x / 2)


def test_functional_ops_and_residual_unification() -> None:
    torch.manual_seed(0)
    model = FunctionalNet().eval()
    spec = spec_from_module(model)
    assert spec.canonical() == PermutationSpec.from_axes(
        {
            "conv1.weight": ("A", None, None, None), "conv1.bias": ("A",),
            "conv2.weight": ("A", "A", None, None), "conv2.bias": ("A",),
            "conv3.weight": ("A", "A", None, None), "conv3.bias": ("A",),
            "fc.weight": ("B", "A"), "fc.bias": ("B",),
            "fc2.weight": ("B", "B"), "fc2.bias": ("B",),
            "head.weight": (None, "B"), "head.bias": (None,),
        }
    ).canonical()  # fmt: skip
    assert spec.perm_names == ["P_conv1", "P_fc"]
    _assert_function_preserved(model, spec, torch.randn(3, 3, 8, 8))


class InputResidual(nn.Module):
    """``fc2``'s output is added to the model input, so its permutation is fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(5, 9), nn.Linear(9, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(x)))
        return self.head(torch.relu(x + h))


def test_residual_with_the_input_fixes_the_permutation() -> None:
    torch.manual_seed(0)
    model = InputResidual()
    spec = spec_from_module(model)
    assert spec.perm_names == ["P_fc1"]
    assert dict(spec.axes_to_perm) == {
        "fc1.weight": ("P_fc1", None),
        "fc1.bias": ("P_fc1",),
        "fc2.weight": (None, "P_fc1"),
        "fc2.bias": (None,),
        "head.weight": (None, None),
        "head.bias": (None,),
    }
    _assert_function_preserved(model, spec, torch.randn(4, 5))


class ViewFlatten(nn.Module):
    """A flatten written with a literal size: only shapes tell it apart from a channel mix."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).view(-1, 4 * 6 * 6))


def test_example_input_recognises_reshape_as_flatten() -> None:
    torch.manual_seed(0)
    model = ViewFlatten().train()
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(UnsupportedModelError, match=r"method \.view\(\).*not flatten\(1\)"):
        spec_from_module(model)
    spec = spec_from_module(model, example_input=x)
    assert spec.axes_to_perm["fc.weight"] == (None, "P_conv")
    assert model.training  # the shape pass restores the training flag
    _assert_function_preserved(model.eval(), spec, x)


def test_example_input_leaves_the_model_unchanged() -> None:
    torch.manual_seed(0)
    model = VGG(cfg=(4, "M", 8), width=1, norm="batch").train()
    before = copy.deepcopy(model.state_dict())
    spec = spec_from_module(model, example_input=torch.randn(2, 3, 32, 32))
    assert spec.canonical() == model.permutation_spec().canonical()
    assert all(module.training for module in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_bad_example_input_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"example_input of shape \(2, 7\) cannot be run"):
        spec_from_module(MLP(in_features=6, hidden=(4,)), example_input=torch.randn(2, 7))


def test_unknown_op_on_the_fixed_input_is_allowed() -> None:
    class SortedInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.fc(torch.sort(x, dim=1).values)))

    torch.manual_seed(0)
    model = SortedInput()
    spec = spec_from_module(model)
    assert spec.perm_names == ["P_fc"]
    _assert_function_preserved(model, spec, torch.randn(3, 4))


class ConvThen(nn.Module):
    """The module under test between a conv and a pooled classifier.

    A head is needed: if the block fed the output, the conv's channels would be fixed by
    the output and any op on them would be allowed.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.conv, self.block, self.head = nn.Conv2d(3, 8, 3), block, nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(self.conv(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class SortChannels(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sort(x, dim=1).values


class SwapAxes(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 3)


class ConcatSelf(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x * 2], dim=1)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            nn.Sequential(nn.Conv2d(8, 8, 1, groups=2), nn.Conv2d(8, 8, 1, groups=4)),
            r"module 'block\.1' \(Conv2d\): grouped convolution \(groups=4, 8 -> 8 channels\): "
            r"its input channels are already split into other groups",
        ),
        (nn.GroupNorm(2, 8), r"module 'block' \(GroupNorm\): GroupNorm with 2 groups"),
        (SortChannels(), r"module 'block' \(SortChannels\), function torch\.sort: not known"),
        (SwapAxes(), r"module 'block' \(SwapAxes\), method \.transpose\(\): transpose of ch"),
        (ConcatSelf(), r"module 'block' \(ConcatSelf\), function torch\.cat: concatenation of p"),
        (nn.Softmax(dim=2), r"module 'block' \(Softmax\): not known to be permutation-equ"),
        (nn.Linear(6, 6), r"module 'block' \(Linear\): input channels not on last dim"),
        (nn.LayerNorm([6, 6]), r"module 'block' \(LayerNorm\): LayerNorm must normalise only"),
        (nn.Flatten(0), r"module 'block' \(Flatten\): flattening that moves channels"),
    ],
)
def test_non_equivariant_ops_raise(block: nn.Module, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        spec_from_module(ConvThen(block))


def test_any_op_on_channels_fixed_by_the_output_is_allowed() -> None:
    """A conv whose channels are the model's output: nothing to permute, nothing to check."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LayerNorm([6, 6]), nn.Flatten(0))
    spec = spec_from_module(model)
    assert spec.perm_names == []
    assert set(spec.axes_to_perm) == {"0.weight", "0.bias", "1.weight", "1.bias"}


def test_sequence_features_need_example_input_for_batch_norm() -> None:
    """BatchNorm1d on (N, L, F) normalises L, not the Linear's features: shapes reveal it."""
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(3), nn.Linear(6, 2))
    with pytest.raises(UnsupportedModelError, match=r"module '1' \(BatchNorm1d\): input chan"):
        spec_from_module(model, example_input=torch.randn(2, 3, 4))


def test_untraceable_model_raises() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(UnsupportedModelError, match=re.escape("cannot trace DataDependent")):
        spec_from_module(DataDependent())


def test_errors_are_spec_errors() -> None:
    assert issubclass(UnsupportedModelError, SpecError)


def test_reused_module_and_tied_parameters_share_one_permutation() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc0, self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6)
            self.fc2.weight = self.fc1.weight  # two keys, one tensor
            self.shared, self.head = nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fc2(torch.relu(self.fc1(torch.relu(self.fc0(x))))))
            h = self.shared(torch.relu(self.shared(h)))  # one module called twice
            return self.head(torch.relu(h))

    torch.manual_seed(0)
    model = Tied()
    spec = spec_from_module(model)
    # The tied weight's rows and columns, and the reused module's, must carry one perm.
    assert spec.perm_names == ["P_fc0"]
    assert spec.axes_to_perm["fc1.weight"] == spec.axes_to_perm["fc2.weight"] == ("P_fc0",) * 2
    assert spec.axes_to_perm["shared.weight"] == ("P_fc0", "P_fc0")
    assert spec.axes_to_perm["fc2.bias"] == ("P_fc0",)
    _assert_function_preserved(model, spec, torch.randn(3, 4))


class ChannelsLastBlock(nn.Module):
    """ConvNeXt's pattern: depthwise conv, permute to channels-last, LayerNorm and an MLP over
    channels, permute back, layer scale ``(C, 1, 1)``, residual."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.ln = nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.ln(y)))).permute(0, 3, 1, 2)
        x = x + self.gamma * y
        return self.head(x.mean(dim=(2, 3)))


def test_channels_last_layer_norm_and_layer_scale_follow_the_channels() -> None:
    torch.manual_seed(0)
    model = _randomize_norms(ChannelsLastBlock())
    x = torch.randn(2, 3, 6, 6)
    spec = spec_from_module(model, example_input=x)
    assert spec.perm_names == ["P_fc1", "P_stem"]
    assert spec.axes_to_perm["dw.weight"] == ("P_stem", None, None, None)
    assert spec.axes_to_perm["ln.weight"] == ("P_stem",)
    assert spec.axes_to_perm["fc1.weight"] == ("P_fc1", "P_stem")
    assert spec.axes_to_perm["gamma"] == ("P_stem", None, None)
    assert spec.axes_to_perm["head.weight"] == (None, "P_stem")
    _assert_function_preserved(model, spec, x)


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(scale * x, 1), 1))


def test_squeeze_excitation_gate_carries_the_channels_permutation() -> None:
    torch.manual_seed(0)
    model = SqueezeExcite().eval()
    spec = spec_from_module(model)
    assert spec.perm_names == ["P_conv", "P_fc1"]
    assert spec.axes_to_perm["fc2.weight"] == ("P_conv", "P_fc1", None, None)
    _assert_function_preserved(model, spec, torch.randn(2, 3, 8, 8))


def test_attention_on_tensors_not_split_into_heads_is_refused() -> None:
    class Unsplit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.q(x)
            return self.head(F.scaled_dot_product_attention(q, q, q))

    message = r"scaled_dot_product_attention: attention needs q, k and v split into heads"
    with pytest.raises(UnsupportedModelError, match=message):
        spec_from_module(Unsplit(), example_input=torch.randn(2, 5, 4))


def test_grouped_convolution_keeps_its_groups_intact() -> None:
    """groups=2: whole groups move together (P_conv.groups) and the channels inside every group
    alike (P_conv.in_group on the input, P_block.in_group on the output)."""
    torch.manual_seed(0)
    model = ConvThen(nn.Conv2d(8, 8, 3, padding=1, groups=2)).eval()
    spec = spec_from_module(model)
    assert spec.axes_to_perm["conv.weight"] == (
        Grid(("P_conv.groups", "P_conv.in_group"), (2, 4)), None, None, None,
    )  # fmt: skip
    assert spec.axes_to_perm["block.weight"] == (
        Grid(("P_conv.groups", "P_block.in_group"), (2, 4)), "P_conv.in_group", None, None,
    )  # fmt: skip
    _assert_function_preserved(model, spec, torch.randn(2, 3, 8, 8))
