"""The architecture table (simulations.architectures): torchvision models, nn.TransformerEncoder
and the zoo's transformers at random weights.

For each supported model: a random permutation of every traced permutation leaves the outputs
equal on a fixed batch (relative error <= 1e-4 in float32), and weight matching of two
independently initialised copies (of the same classes at small widths) raises the objective.
Refused models name the module and the op. Trace times are recorded as the test property
``trace_seconds`` (``pytest --junitxml``); ``python -m simulations.architectures`` prints them.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rebasin.matching import reference_weight_matching, weight_matching
from rebasin.merge import merge_many, merge_to_reference
from rebasin.permute import apply_permutation, invert, random_perms
from rebasin.trace import UnsupportedModelError, spec_from_module
from rebasin.transformers import GPT, ViT, is_head_perm, stream_only
from rebasin.zoo import build_model
from simulations.architectures import (
    ARCHITECTURES,
    REFUSED,
    permuted_output_error,
    randomize,
    traced,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torchvision init warnings


@pytest.fixture(autouse=True)
def _one_thread_for_this_module():
    """Small tensors: with one torch thread this file ran in 22 s, with two in 114 s (2-core
    project machine, 2026-12-01)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_random_permutation_of_the_traced_spec_keeps_the_outputs(
    name: str, record_property
) -> None:
    arch = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = randomize(arch.full())
    spec, seconds = traced(arch, model)
    record_property("trace_seconds", round(seconds, 3))
    spec.check(model.state_dict())
    assert len(spec.perm_names) >= 3
    assert permuted_output_error(model, spec, arch.example_input()) <= 1e-4


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_matching_two_independent_models_raises_the_objective(name: str) -> None:
    arch = ARCHITECTURES[name]
    torch.manual_seed(0)
    a = randomize(arch.small(), seed=0)
    torch.manual_seed(1)
    b = randomize(arch.small(), seed=1)
    spec, _ = traced(arch, a)
    result = weight_matching(spec, a.state_dict(), b.state_dict(), max_iter=3)
    assert result.objective[-1] > result.objective[0]
    assert result.objective == sorted(result.objective)
    # The aligned model computes what b computes.
    b_aligned = copy.deepcopy(b)
    b_aligned.load_state_dict(apply_permutation(spec, result.perms, b.state_dict()))
    with torch.no_grad():
        x = arch.example_input()
        expected, actual = b(x), b_aligned(x)
    assert float((actual - expected).norm() / expected.norm()) <= 1e-4


@pytest.mark.parametrize("name", ["densenet121", "vit_b_16", "zoo GPT", "TransformerEncoder"])
def test_engine_agrees_exactly_with_textbook_matcher_on_traced_specs(name: str) -> None:
    arch = ARCHITECTURES[name]
    torch.manual_seed(0)
    a, b = randomize(arch.small(), seed=0), randomize(arch.small(), seed=1)
    spec, _ = traced(arch, a)
    fast = weight_matching(spec, a.state_dict(), b.state_dict(), seed=3, max_iter=3)
    slow = reference_weight_matching(spec, a.state_dict(), b.state_dict(), seed=3, max_iter=3)
    assert fast.objective == slow.objective
    assert fast.sweeps == slow.sweeps >= 2
    assert all(torch.equal(fast.perms[p], slow.perms[p]) for p in spec.perm_names)


@pytest.mark.parametrize("name", list(REFUSED))
def test_models_still_refused_name_the_module_and_the_op(name: str) -> None:
    refusal = REFUSED[name]
    torch.manual_seed(0)
    with pytest.raises(UnsupportedModelError, match=refusal.reason):
        spec_from_module(refusal.build().eval(), example_input=torch.randn(refusal.input_shape))


@pytest.mark.parametrize("name", ["zoo ViT", "zoo GPT"])
def test_zoo_hand_written_spec_equals_the_traced_one(name: str) -> None:
    arch = ARCHITECTURES[name]
    for build in (arch.full, arch.small):
        model = randomize(build())
        spec, _ = traced(arch, model)
        assert spec.canonical() == model.permutation_spec().canonical()
        hand = model.permutation_spec()
        assert permuted_output_error(model, hand, arch.example_input()) <= 1e-4
        assert permuted_output_error(model, stream_only(hand), arch.example_input()) <= 1e-4


def test_vit_head_permutations_and_stream_only() -> None:
    model = ViT(width=0.5, depth=2)
    spec = model.permutation_spec()
    heads = [p for p in spec.perm_names if is_head_perm(p)]
    assert heads == ["H0", "H1", "QK0", "QK1", "VO0", "VO1"]
    assert stream_only(spec).perm_names == ["F0", "F1", "R"]
    assert spec.perm_sizes(model.state_dict()) == {
        "R": 32, "F0": 64, "F1": 64, "H0": 4, "H1": 4, "QK0": 8, "QK1": 8, "VO0": 8, "VO1": 8,
    }  # fmt: skip


def test_traced_gpt_heads_are_named_after_the_query_and_value_layers() -> None:
    model = GPT(dim=16, depth=1)
    spec = spec_from_module(model, example_input=torch.randint(0, 64, (2, 8)))
    assert [p for p in spec.perm_names if is_head_perm(p)] == [
        "P_blocks.0.q.head_dims", "P_blocks.0.q.heads", "P_blocks.0.v.head_dims",
    ]  # fmt: skip
    assert spec.axes_to_perm["blocks.0.proj.weight"][0] == "P_tok"


def test_matching_undoes_a_random_permutation_of_the_vit() -> None:
    """Exact recovery, heads included. Not guaranteed for every model: coordinate descent may
    stall when a layer's head permutation and its in-head permutations are both wrong (seen
    for 2 of 6 random initialisations of this ViT); this seed is one that recovers."""
    torch.manual_seed(0)
    model = randomize(ViT(width=0.5, depth=2))
    spec = model.permutation_spec()
    state = model.state_dict()
    perms = random_perms(spec, state, seed=2)
    result = weight_matching(spec, state, apply_permutation(spec, perms, state))
    for p, perm in perms.items():
        assert torch.equal(result.perms[p], invert(perm)), p


def test_offline_merges_of_zoo_vit_models() -> None:
    """merge_to_reference and MergeMany run on the ViT from the zoo (--model vit)."""
    models = [build_model("vit", "mnist", width=0.25, seed=s).eval() for s in (0, 1, 2)]
    spec = models[0].permutation_spec()
    states = [m.state_dict() for m in models]
    merged = merge_to_reference(spec, states, max_iter=5)
    many = merge_many(spec, states, max_iter=5, max_rounds=2)
    for state in (merged, many):
        assert set(state) == set(states[0])
        net = build_model("vit", "mnist", width=0.25)
        net.load_state_dict(state)
        assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


class QuickstartNet(nn.Module):
    """Flower's PyTorch quickstart CNN (CIFAR-10), written as there."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def test_flower_quickstart_view_names_the_remedy() -> None:
    model = QuickstartNet()
    message = (
        "QuickstartNet.forward, method .view(): reshape that is not flatten(1) may mix "
        "channels; pass example_input= (a batch the model accepts) so that the tracer can "
        "check shapes, or give an explicit spec="
    )
    with pytest.raises(UnsupportedModelError, match=f"^{re.escape(message)}$"):
        spec_from_module(model)
    x = torch.randn(4, 3, 32, 32)
    spec = spec_from_module(model, example_input=x)
    assert spec.perm_names == ["P_conv1", "P_conv2", "P_fc1", "P_fc2"]
    assert spec.axes_to_perm["fc1.weight"] == ("P_fc1", "P_conv2")
    assert permuted_output_error(model.eval(), spec, x) <= 1e-5


def test_a_batch_of_one_does_not_confuse_reshapes() -> None:
    """With N = 1, reshapes have leading dims of size 1 that match any prefix."""
    model = randomize(ViT(width=0.5, depth=1))
    spec = spec_from_module(model, example_input=torch.randn(1, 1, 28, 28))
    assert spec.canonical() == model.permutation_spec().canonical()


def test_merges_keep_the_module_versions_that_versioned_loaders_need() -> None:
    """torchvision's MNASNet refuses a state dict without ``_metadata`` (module versions):
    permuted, averaged, interpolated and merged state dicts keep the first model's."""
    import torchvision.models as tvm

    from rebasin.merge import average, interpolate

    models = [randomize(tvm.MNASNet(0.25, num_classes=10), seed=s) for s in (0, 1)]
    states = [m.state_dict() for m in models]
    spec, _ = traced(ARCHITECTURES["mnasnet0_5"], models[0])
    perms = random_perms(spec, states[1], seed=1)
    bare = dict(states[0])
    with pytest.raises(ValueError, match=r"^version should be set to 1 or 2 instead of None$"):
        tvm.MNASNet(0.25, num_classes=10).load_state_dict(bare)
    outputs = {
        "apply_permutation": apply_permutation(spec, perms, states[1]),
        "average": average(states),
        "interpolate": interpolate(states[0], states[1], 0.5),
        "merge_to_reference": merge_to_reference(spec, states, max_iter=2),
        "merge_many": merge_many(spec, states, max_rounds=1, max_iter=2),
    }
    for name, state in outputs.items():
        assert getattr(state, "_metadata", None) == states[0]._metadata, name
        tvm.MNASNet(0.25, num_classes=10).load_state_dict(state)
    # Plain dicts in, plain dicts out: nothing is invented.
    assert not hasattr(average([bare, bare]), "_metadata")
