"""Structured axes in permutation specs: Concat blocks (torch.cat, packed q/k/v), Grid
factors (attention heads), and a depthwise convolution's one permutation. Functional
equivalence after random permutations, exact agreement of the engine with the textbook
matcher, and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rebasin.matching import reference_weight_matching, weight_matching
from rebasin.permute import apply_permutation, invert, random_perms
from rebasin.spec import (
    Concat,
    Grid,
    PermutationSpec,
    SpecError,
    attention,
    conv,
    linear,
    norm,
)


class ConcatDepthwiseNet(nn.Module):
    """Two conv branches joined by ``torch.cat``, a BatchNorm and a depthwise conv on the
    joined channels, then a conv and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.conv_b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 5, 1)
        self.bn = nn.BatchNorm2d(9)
        self.dw = nn.Conv2d(9, 9, 3, padding=1, groups=9)
        self.conv_c = nn.Conv2d(9, 6, 1)
        self.head = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.relu(self.conv_a(x)), torch.tanh(self.conv_b(x))], dim=1)
        h = torch.relu(self.dw(self.bn(h)))
        h = torch.relu(self.conv_c(h))
        return self.head(torch.flatten(nn.functional.avg_pool2d(h, 2), 1))

    def permutation_spec(self) -> PermutationSpec:
        joined = Concat((("A", 4), ("B", 5)))
        return PermutationSpec(
            conv("conv_a", None, "A")
            | conv("conv_b", None, "B")
            | {k: (joined,) for k in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")}
            | {"bn.num_batches_tracked": ()}
            | {"dw.weight": (joined, None, None, None), "dw.bias": (joined,)}
            | {"conv_c.weight": ("C", joined, None, None), "conv_c.bias": ("C",)}
            | linear("head", "C", None)
        )


class AttentionNet(nn.Module):
    """A token embedding, one self-attention block with a residual and a LayerNorm, a head."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.embed = nn.Linear(5, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = self.ln(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h.mean(dim=1))

    def permutation_spec(self, with_heads: bool = True) -> PermutationSpec:
        inner = {"heads": "H", "qk": "QK", "vo": "VO"} if with_heads else {}
        return PermutationSpec(
            linear("embed", None, "R")
            | attention("attn", "R", "R", embed_dim=self.dim, num_heads=self.heads, **inner)
            | norm("ln", "R")
            | linear("head", "R", None)
        )


def _randomized(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
        for p in module.parameters(recurse=False):
            p.data.normal_(0, 0.5)
    return model.double().eval()


CASES = {
    "concat-depthwise": (ConcatDepthwiseNet, (4, 3, 8, 8)),
    "attention": (AttentionNet, (4, 7, 5)),
}


def _model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _randomized(CASES[name][0](), seed)


def _input(name: str) -> torch.Tensor:
    return torch.randn(CASES[name][1], generator=torch.Generator().manual_seed(5)).double()


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("name", sorted(CASES))
def test_random_permutation_of_structured_axes_keeps_the_function(name: str) -> None:
    model = _model(name, 0)
    spec = model.permutation_spec()
    state = model.state_dict()
    spec.check(state)
    perms = random_perms(spec, state, seed=3)
    assert all(not torch.equal(p, torch.arange(p.numel())) for p in perms.values())
    permuted = apply_permutation(spec, perms, state)
    # Every entry a permutation acts on has changed; the others are untouched.
    for key, axes in spec.axes_to_perm.items():
        moved = any(entry is not None for entry in axes)
        assert torch.equal(permuted[key], state[key]) != moved, key
    clone = copy.deepcopy(model)
    clone.load_state_dict(permuted)
    x = _input(name)
    with torch.no_grad():
        assert _relative_error(clone(x), model(x)) <= 1e-12


def test_wrong_block_lengths_are_named() -> None:
    """Swapping the two concatenated blocks' lengths no longer fits the state dict."""
    model = _model("concat-depthwise", 0)
    axes = dict(model.permutation_spec().axes_to_perm)
    wrong = Concat((("A", 5), ("B", 4)))
    for key in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "dw.bias"):
        axes[key] = (wrong,)
    axes["dw.weight"] = (wrong, None, None, None)
    axes["conv_c.weight"] = ("C", wrong, None, None)
    spec = PermutationSpec(axes)
    with pytest.raises(
        SpecError,
        match=r"permutation 'A': axis 0 of 'bn.weight' has 5 entries, not a multiple of .* 4",
    ):
        spec.check(model.state_dict())


def test_packed_qkv_rows_follow_heads_and_head_dims() -> None:
    """``in_proj_weight`` rows ``16*h + d`` of q, k and v move as the spec says."""
    model = _model("attention", 0)
    spec = model.permutation_spec()
    state = model.state_dict()
    perms = random_perms(spec, state, seed=1)
    w = apply_permutation(spec, perms, state)["attn.in_proj_weight"]
    old = state["attn.in_proj_weight"]
    h_perm, qk, vo, r = perms["H"], perms["QK"], perms["VO"], perms["R"]
    for block, inner in ((0, qk), (1, qk), (2, vo)):
        for h in range(4):
            for d in range(4):
                new_row = w[16 * block + 4 * h + d]
                old_row = old[16 * block + 4 * h_perm[h] + inner[d]]
                assert torch.equal(new_row, old_row[r])


@pytest.mark.parametrize("name", sorted(CASES))
def test_matching_undoes_a_random_permutation(name: str) -> None:
    model = _model(name, 0)
    spec = model.permutation_spec()
    state = model.state_dict()
    perms = random_perms(spec, state, seed=4)
    permuted = apply_permutation(spec, perms, state)
    result = weight_matching(spec, state, permuted, seed=0)
    aligned = apply_permutation(spec, result.perms, permuted)
    for p, perm in perms.items():
        assert torch.equal(result.perms[p], invert(perm)), p
    assert all(torch.equal(aligned[k], state[k]) for k in state)


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_agrees_exactly_with_textbook_matcher_on_structured_axes(name: str) -> None:
    spec = _model(name, 0).permutation_spec()
    a, b = _model(name, 10).state_dict(), _model(name, 11).state_dict()
    for seed in (0, 1):
        fast = weight_matching(spec, a, b, seed=seed)
        slow = reference_weight_matching(spec, a, b, seed=seed)
        assert fast.sweeps == slow.sweeps >= 2
        assert fast.objective == slow.objective
        assert fast.objective[-1] > fast.objective[0]
        assert fast.products < slow.products
        for p in spec.perm_names:
            assert torch.equal(fast.perms[p], slow.perms[p]), p


def test_restrict_drops_head_permutations_to_the_identity() -> None:
    model = _model("attention", 0)
    full = model.permutation_spec()
    stream = full.restrict(lambda p: p == "R")
    assert stream.perm_names == ["R"]
    assert stream.canonical() == model.permutation_spec(with_heads=False).canonical()
    assert stream.axes_to_perm["attn.out_proj.weight"] == ("R", None)
    assert full.perm_sizes(model.state_dict()) == {"R": 16, "H": 4, "QK": 4, "VO": 4}


def test_canonical_tells_structured_axes_apart() -> None:
    base = {"w": (Concat((("A", 2), ("B", 3))),)}
    same = {"w": (Concat((("X", 2), ("Y", 3))),)}
    other = {"w": (Concat((("A", 3), ("B", 2))),)}
    assert PermutationSpec(base).canonical() == PermutationSpec(same).canonical()
    assert PermutationSpec(base).canonical() != PermutationSpec(other).canonical()
    grid = PermutationSpec({"w": (Grid(("H", "D"), (2, 3)),)})
    swapped = PermutationSpec({"w": (Grid(("D", "H"), (2, 3)),)})
    assert grid.canonical() == swapped.canonical()  # names do not matter, places do
    assert grid.canonical() != PermutationSpec({"w": (Grid(("H", None), (2, 3)),)}).canonical()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            Concat((("A", 2), ("B", 2))),
            r"'w', axis 0: the blocks cover 4 entries but the axis has 5",
        ),
        (Grid(("H", "D"), (2, 2)), r"'w', axis 0: a grid of \(2, 2\) \(4 entries\) on 5 entries"),
    ],
)
def test_structured_axis_that_does_not_fit_is_named(entry, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        PermutationSpec({"w": (entry,)}).check({"w": torch.zeros(5)})


def test_malformed_structured_entries_are_rejected() -> None:
    with pytest.raises(SpecError, match="one size per factor"):
        Grid(("H",), (2, 3))
    with pytest.raises(SpecError, match="Grid of 6 entries in a block of 5"):
        Concat(((Grid(("H", "D"), (2, 3)), 5),))
    with pytest.raises(SpecError, match=r"\(permutation, length\) pairs"):
        Concat(("A",))  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="expected a permutation name, Grid, Concat or None"):
        PermutationSpec({"w": (3,)})  # type: ignore[dict-item]


@pytest.mark.parametrize("name", sorted(CASES))
def test_traced_spec_of_the_structured_models_equals_the_hand_written_one(name: str) -> None:
    from rebasin.trace import spec_from_module

    model = _model(name, 0)
    traced = spec_from_module(model, example_input=_input(name))
    assert traced.canonical() == model.permutation_spec().canonical()
