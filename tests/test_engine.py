"""Exactness of the core engine: specs, permutation, weight matching, merging."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rebasin.align import align_many
from rebasin.matching import reference_weight_matching, weight_matching
from rebasin.merge import (
    average,
    barrier,
    interpolation_curve,
    merge_many,
    merge_to_reference,
)
from rebasin.models import MLP, VGG, ResNet20
from rebasin.permute import apply_permutation, invert, random_perms, validate_state_dict
from rebasin.spec import PermutationSpec, SpecError, conv, is_running_stat, linear, norm

MODELS = {
    "mlp": lambda: MLP(hidden=(64, 48, 32)),
    "mlp-3x512": lambda: MLP(),
    "vgg-batch": lambda: VGG(width=0.125, norm="batch"),
    "vgg-layer": lambda: VGG(width=0.125, norm="layer"),
    "vgg-none": lambda: VGG(width=0.125, norm="none"),
    "vgg-flatten-blocks": lambda: VGG(cfg=(8, "M", 16, "M"), norm="batch"),
    "resnet20-batch": lambda: ResNet20(width=1, norm="batch"),
    "resnet20-layer": lambda: ResNet20(width=1, norm="layer"),
    "resnet20-none": lambda: ResNet20(width=1, norm="none"),
}


def _randomized(name: str, seed: int) -> nn.Module:
    """A model with random weights and random (positive-variance) BatchNorm statistics."""
    torch.manual_seed(seed)
    model = MODELS[name]()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
            module.bias.data.normal_()
        if isinstance(module, nn.GroupNorm):
            module.weight.data.normal_()
            module.bias.data.normal_()
    return model.eval()


def _input(model: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    shape = (5, 1, 28, 28) if isinstance(model, MLP) else (5, 3, 32, 32)
    return torch.randn(shape, generator=gen)


def _load(model: nn.Module, state_dict) -> nn.Module:
    clone = copy.deepcopy(model)
    clone.load_state_dict(state_dict)
    return clone.eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hidden_unit_permutation_leaves_outputs_unchanged(name: str) -> None:
    model = _randomized(name, seed=0)
    spec = model.permutation_spec()
    state = model.state_dict()
    spec.check(state)
    perms = random_perms(spec, state, seed=1)
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in perms.values())
    permuted = apply_permutation(spec, perms, state)
    assert any(not torch.equal(permuted[k], state[k]) for k in state)
    x = _input(model)
    torch.testing.assert_close(_load(model, permuted)(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_matching_recovers_the_exact_permutation_and_merge_is_the_original(name: str) -> None:
    model = _randomized(name, seed=0)
    spec = model.permutation_spec()
    state = model.state_dict()
    perms = random_perms(spec, state, seed=2)
    permuted = apply_permutation(spec, perms, state)

    result = weight_matching(spec, state, permuted, seed=0)

    for p, perm in perms.items():
        assert torch.equal(result.perms[p], invert(perm)), p
    aligned = apply_permutation(spec, result.perms, permuted)
    assert all(torch.equal(aligned[k], state[k]) for k in state)
    assert result.objective == sorted(result.objective)  # the descent never lowers it
    merged = merge_to_reference(spec, [state, permuted])
    for k in state:
        torch.testing.assert_close(merged[k], state[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "name", ["mlp", "vgg-batch", "vgg-flatten-blocks", "resnet20-batch", "resnet20-none"]
)
def test_engine_agrees_exactly_with_textbook_matcher(name: str) -> None:
    spec = _randomized(name, 0).permutation_spec()
    a = _randomized(name, 10).state_dict()
    b = _randomized(name, 11).state_dict()  # unrelated weights: a real, multi-sweep descent
    for seed in (0, 1):
        fast = weight_matching(spec, a, b, seed=seed)
        slow = reference_weight_matching(spec, a, b, seed=seed)
        assert fast.sweeps == slow.sweeps >= 2
        assert fast.objective == slow.objective
        # The textbook loop makes every term and solves every permutation in every sweep;
        # the engine makes each term at least once, and fewer in all.
        terms, solvable = _work_per_sweep(spec)
        assert (slow.products, slow.solves) == (slow.sweeps * terms, slow.sweeps * solvable)
        assert terms <= fast.products < slow.products
        assert solvable <= fast.solves < slow.solves
        assert fast.objective[-1] > fast.objective[0]
        for p in spec.perm_names:
            assert torch.equal(fast.perms[p], slow.perms[p]), p


def _work_per_sweep(spec) -> tuple[int, int]:
    """(similarity terms, permutations with a weight) of one full textbook sweep."""
    terms = [
        (k, ax) for axes in spec.perm_to_axes.values() for k, ax in axes if not is_running_stat(k)
    ]
    return len(terms), len(
        {p for p, axes in spec.perm_to_axes.items() if any(not is_running_stat(k) for k, _ in axes)}
    )


def test_matching_is_deterministic_for_a_seed_and_warm_start_takes_one_sweep() -> None:
    spec = _randomized("mlp", 0).permutation_spec()
    a = _randomized("mlp", 10).state_dict()
    b = _randomized("mlp", 11).state_dict()
    first = weight_matching(spec, a, b, seed=5)
    again = weight_matching(spec, a, b, seed=5)
    assert first.objective == again.objective
    assert all(torch.equal(first.perms[p], again.perms[p]) for p in first.perms)

    warm = weight_matching(spec, a, b, seed=6, init=first.perms)
    assert warm.sweeps == 1
    assert (warm.products, warm.solves) == _work_per_sweep(spec)
    # The per-sweep objective is tracked from float32 similarity products: ~1e-7 relative.
    assert warm.objective[0] == pytest.approx(first.objective[-1], rel=1e-6)
    assert warm.objective[1] == warm.objective[0]
    assert all(torch.equal(warm.perms[p], first.perms[p]) for p in first.perms)


def test_merge_to_reference_reports_each_matching_to_on_match() -> None:
    spec = _randomized("mlp", 0).permutation_spec()
    models = [_randomized("mlp", s).state_dict() for s in (20, 21, 22)]
    seen: dict[int, object] = {}
    merged = merge_to_reference(
        spec, models, [1.0, 2.0, 3.0], reference=1, seed=7, on_match=seen.__setitem__
    )
    assert sorted(seen) == [0, 2]  # every model but the reference, matched with seed 7 + i
    for i in (0, 2):
        own = weight_matching(spec, models[1], models[i], seed=7 + i)
        assert seen[i].sweeps == own.sweeps  # type: ignore[attr-defined]
        gain = own.objective[-1] - own.objective[0]
        assert seen[i].objective_gain == gain  # type: ignore[attr-defined]
        assert all(torch.equal(seen[i].perms[p], own.perms[p]) for p in own.perms)
    plain = merge_to_reference(spec, models, [1.0, 2.0, 3.0], reference=1, seed=7)
    assert all(torch.equal(merged[k], plain[k]) for k in plain)


def test_merge_many_of_permuted_copies_is_a_permutation_of_the_original() -> None:
    model = _randomized("resnet20-batch", 0)
    spec = model.permutation_spec()
    state = model.state_dict()
    copies = [apply_permutation(spec, random_perms(spec, state, s), state) for s in range(3)]
    merged = merge_many(spec, copies, weights=[1.0, 2.0, 3.0], seed=0)
    back = apply_permutation(spec, weight_matching(spec, state, merged).perms, merged)
    for k in state:
        torch.testing.assert_close(back[k], state[k], atol=1e-6, rtol=0)
    x = _input(model)
    torch.testing.assert_close(_load(model, merged)(x), model(x), atol=1e-5, rtol=0)


def test_align_many_returns_the_permutations_that_produce_the_aligned_models() -> None:
    model = _randomized("vgg-batch", 0)
    spec = model.permutation_spec()
    state = model.state_dict()
    copies = [apply_permutation(spec, random_perms(spec, state, s), state) for s in range(4)]
    alignment = align_many(spec, copies, seed=1)
    aligned, perms = alignment.aligned, alignment.perms
    for original, result, p in zip(copies, aligned, perms):
        again = apply_permutation(spec, p, original)
        assert all(torch.equal(again[k], result[k]) for k in state)
    # All four now sit in one basin: pairwise identical.
    assert all(torch.equal(aligned[0][k], aligned[3][k]) for k in state)


def test_average_is_weighted_and_keeps_dtypes() -> None:
    a = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 0.0]), "n": torch.tensor(9)}
    merged = average([a, b], weights=[1.0, 3.0])
    assert torch.equal(merged["w"], torch.tensor([3.0, 1.0]))
    assert merged["n"].item() == 9  # integer entries come from the heaviest model
    assert merged["w"].dtype == torch.float32


def test_barrier_of_identical_models_is_zero_and_rebasin_removes_the_naive_barrier() -> None:
    model = _randomized("mlp", 0)
    spec = model.permutation_spec()
    state = model.state_dict()
    x = _input(model)
    target = model(x).detach()

    @torch.no_grad()
    def evaluate(sd):
        # Loss: relative squared distance to the original function's outputs.
        logits = _load(model, sd)(x)
        loss = float(((logits - target) ** 2).mean() / (target**2).mean())
        return loss, float((logits.argmax(1) == target.argmax(1)).float().mean())

    same = interpolation_curve(state, state, evaluate, lambdas=[0.0, 0.5, 1.0])
    assert same.loss_barrier == pytest.approx(0.0, abs=1e-6)
    assert same.accuracy_barrier == 0.0

    permuted = apply_permutation(spec, random_perms(spec, state, 3), state)
    naive = interpolation_curve(state, permuted, evaluate, lambdas=[0.0, 0.5, 1.0])
    assert naive.loss_barrier > 0.02
    aligned = apply_permutation(spec, weight_matching(spec, state, permuted).perms, permuted)
    rebasin = interpolation_curve(state, aligned, evaluate, lambdas=[0.0, 0.5, 1.0])
    assert rebasin.loss_barrier == pytest.approx(0.0, abs=1e-6)
    assert barrier([1.0, 3.0, 2.0]) == 1.5


# --- bad input -------------------------------------------------------------------------


@pytest.fixture
def mlp_case():
    model = _randomized("mlp", 0)
    return model.permutation_spec(), model.state_dict()


def test_mismatched_state_dicts_are_named(mlp_case) -> None:
    spec, state = mlp_case
    missing = {k: v for k, v in state.items() if k != "head.bias"}
    with pytest.raises(ValueError, match=r"model to align: missing keys \['head.bias'\]"):
        weight_matching(spec, state, missing)
    extra = dict(state, **{"extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        weight_matching(spec, state, extra)
    shape = dict(state, **{"head.bias": torch.zeros(11)})
    with pytest.raises(ValueError, match=r"'head.bias' has shape \(11,\), expected \(10,\)"):
        weight_matching(spec, state, shape)
    dtype = dict(state, **{"head.bias": state["head.bias"].double()})
    with pytest.raises(
        ValueError, match=r"'head.bias' has dtype torch.float64, expected torch.float32"
    ):
        merge_to_reference(spec, [state, dtype])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_rejected(mlp_case, bad: float) -> None:
    spec, state = mlp_case
    poisoned = {k: v.clone() for k, v in state.items()}
    poisoned["layers.1.weight"][3, 4] = bad
    with pytest.raises(
        ValueError, match=r"'layers.1.weight' has 1 non-finite values \(NaN or Inf\)"
    ):
        weight_matching(spec, state, poisoned)
    with pytest.raises(ValueError, match="non-finite"):
        merge_many(spec, [state, poisoned])
    with pytest.raises(ValueError, match="reference model: 'layers.1.weight' has 1 non-finite"):
        weight_matching(spec, poisoned, state)


def test_empty_model_list_and_bad_weights(mlp_case) -> None:
    spec, state = mlp_case
    with pytest.raises(ValueError, match="cannot merge an empty list of models"):
        merge_to_reference(spec, [])
    with pytest.raises(ValueError, match="cannot merge an empty list of models"):
        merge_many(spec, [])
    with pytest.raises(ValueError, match="got 1 weights for 2 models"):
        average([state, state], weights=[1.0])
    with pytest.raises(ValueError, match="merge weights must be positive and finite, got -1.0"):
        average([state, state], weights=[1.0, -1.0])


def test_spec_that_does_not_cover_the_model_is_rejected(mlp_case) -> None:
    spec, state = mlp_case
    partial = PermutationSpec({k: v for k, v in spec.axes_to_perm.items() if k != "head.weight"})
    with pytest.raises(
        SpecError, match=r"spec does not cover these state-dict keys: \['head.weight'\]"
    ):
        weight_matching(partial, state, state)
    wrong_rank = PermutationSpec(dict(spec.axes_to_perm, **{"head.bias": (None, None)}))
    with pytest.raises(SpecError, match=r"'head.bias' lists 2 axes but the tensor has 1"):
        wrong_rank.check(state)
    ghost = PermutationSpec(dict(spec.axes_to_perm, **{"ghost.weight": ("P0",)}))
    with pytest.raises(
        SpecError, match=r"spec names keys the state dict lacks: \['ghost.weight'\]"
    ):
        ghost.check(state)
    # P0 acts on 64 outputs of layer 0 but, wrongly, on the 48 inputs of layer 2.
    mixed = PermutationSpec(dict(spec.axes_to_perm, **{"layers.2.weight": ("P2", "P0")}))
    with pytest.raises(
        SpecError,
        match=r"permutation 'P0': axis 0 of 'layers.0.weight' has 64 entries, not a multiple "
        r"of the permutation's size 48",
    ):
        mixed.check(state)


def test_bad_warm_start_and_max_iter(mlp_case) -> None:
    spec, state = mlp_case
    with pytest.raises(SpecError, match=r"warm start lacks permutations \['P2'\]"):
        weight_matching(spec, state, state, init={"P0": torch.arange(64), "P1": torch.arange(48)})
    bad = {"P0": torch.zeros(64, dtype=torch.long), "P1": torch.arange(48), "P2": torch.arange(32)}
    with pytest.raises(SpecError, match="warm start for 'P0' is not a permutation of 64 units"):
        weight_matching(spec, state, state, init=bad)
    with pytest.raises(ValueError, match="max_iter must be >= 1, got 0"):
        weight_matching(spec, state, state, max_iter=0)


def test_hand_written_spec_in_a_few_lines() -> None:
    """A two-layer conv net, spec by hand with the builders, round-trips exactly."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    ).eval()
    spec = PermutationSpec(
        conv("0", None, "P0")
        | norm("1", "P0", running_stats=True)
        | conv("3", "P0", "P1")
        | linear("6", "P1", None)
    )
    state = net.state_dict()
    spec.check(state)
    assert spec.perm_sizes(state) == {"P0": 8, "P1": 6}
    permuted = apply_permutation(spec, random_perms(spec, state, 0), state)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(_load(net, permuted)(x), net(x), atol=1e-5, rtol=0)
    validate_state_dict(permuted, state)
