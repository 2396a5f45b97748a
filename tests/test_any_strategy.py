"""Re-basin in front of every Flower strategy: Flower's own strategy is the oracle.

For each strategy: with identical client models the re-basin form returns exactly what the
bare strategy returns; with differently permuted copies of one model it returns exactly
what the bare strategy returns on the un-permuted copies. Then the DP order (alignment
before clipping), stateful strategies over rounds, and the instance form.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)
from strategy_messages import (
    SPEC,
    StateDict,
    _assert_equal,
    _FakeGrid,
    _mlp,
    _permuted,
    _reply,
    _sd,
    _serverapp_identity,  # noqa: F401 (autouse fixture)
    _tensors,
    _warnings,
)

from strategies import ReBasin, ReBasinFedAvg, rebasin, with_rebasin

NODES = [1, 2, 3, 4, 5]
WEIGHTS = {1: 10, 2: 20, 3: 30, 4: 40, 5: 50}


def _fedavg(**kwargs):
    return FedAvg(min_available_nodes=5, min_train_nodes=5, **kwargs)


# name -> (class, positional arguments made fresh, keyword arguments)
STRATEGIES = {
    "FedAvg": (FedAvg, lambda: (), {}),
    "FedAvgM": (FedAvgM, lambda: (), {"server_momentum": 0.9}),
    "FedAdam": (FedAdam, lambda: (), {}),
    "FedYogi": (FedYogi, lambda: (), {}),
    "FedAdagrad": (FedAdagrad, lambda: (), {}),
    "FedProx": (FedProx, lambda: (), {"proximal_mu": 0.1}),
    "FedMedian": (FedMedian, lambda: (), {}),
    "FedTrimmedAvg": (FedTrimmedAvg, lambda: (), {"beta": 0.2}),
    "Krum": (Krum, lambda: (), {"num_malicious_nodes": 1}),
    "MultiKrum": (MultiKrum, lambda: (), {"num_malicious_nodes": 1, "num_nodes_to_select": 3}),
    "Bulyan": (Bulyan, lambda: (), {"num_malicious_nodes": 0}),
    "DP-fixed": (
        DifferentialPrivacyServerSideFixedClipping,
        lambda: (_fedavg(),),
        {"noise_multiplier": 0.5, "clipping_norm": 0.5, "num_sampled_clients": 5},
    ),
    "DP-adaptive": (
        DifferentialPrivacyServerSideAdaptiveClipping,
        lambda: (_fedavg(),),
        {"noise_multiplier": 0.5, "num_sampled_clients": 5, "clipped_count_stddev": 1.0},
    ),
}
SAMPLING = {"min_available_nodes": 5, "min_train_nodes": 5}


def _make(name: str, aligned: bool):
    cls, args, kwargs = STRATEGIES[name]
    if args():  # a wrapper: the sampling settings are its inner strategy's
        full = dict(kwargs)
    else:
        full = {**SAMPLING, **kwargs}
    if aligned:
        return rebasin(cls)(*args(), model=_mlp(0), device="cpu", **full)
    return cls(*args(), **full)


def _run(strategy, global_sd: StateDict, models: dict[int, StateDict]):
    """One round: configure_train through a grid of five nodes, then aggregate_train."""

    def client(node_id: int, message: Message) -> Message:
        return _reply(node_id, models[node_id], WEIGHTS[node_id])

    grid = _FakeGrid(NODES, client)
    random.seed(0)  # Flower samples the nodes, and so orders the replies, with `random`
    sent = list(strategy.configure_train(1, ArrayRecord(global_sd), ConfigRecord(), grid))
    replies = grid.send_and_receive(sent, timeout=10)
    np.random.seed(0)  # Flower's DP noise and adaptive clipping draw from numpy
    return strategy.aggregate_train(1, replies)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_identical_models_give_the_bare_strategys_result_exactly(name: str) -> None:
    global_sd = _sd(_mlp(1))
    model = {k: v * 1.01 for k, v in global_sd.items()}
    models = {n: {k: v.clone() for k, v in model.items()} for n in NODES}
    bare_arrays, bare_metrics = _run(_make(name, False), global_sd, models)
    strategy = _make(name, True)
    arrays, metrics = _run(strategy, global_sd, models)
    assert bare_arrays is not None
    _assert_equal(_tensors(arrays), _tensors(bare_arrays))
    assert (metrics is None) == (bare_metrics is None)
    if metrics is not None:
        assert dict(metrics) == dict(bare_metrics)
    assert sorted(strategy.last_round.valid) == NODES
    assert all(a.sweeps == 1 for a in strategy.last_round.alignments.values())


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_permuted_copies_give_the_bare_strategys_result_on_the_originals(name: str) -> None:
    """Every client sends its own permutation of one model trained from the global one:
    aligned, they are that model again, so the strategy sees what it would without
    permutations."""
    global_sd = _sd(_mlp(1))
    trained = {k: v * 1.01 for k, v in global_sd.items()}
    originals = {n: {k: v.clone() for k, v in trained.items()} for n in NODES}
    permuted = {n: _permuted(trained, seed=n) for n in NODES}
    assert not torch.equal(permuted[1]["layers.0.weight"], trained["layers.0.weight"])
    bare_arrays, _ = _run(_make(name, False), global_sd, originals)
    arrays, _ = _run(_make(name, True), global_sd, permuted)
    _assert_equal(_tensors(arrays), _tensors(bare_arrays))
    # Without alignment the same strategy gives something else.
    unaligned, _ = _run(_make(name, False), global_sd, permuted)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(_tensors(unaligned).values(), _tensors(bare_arrays).values())
    )


class _Spy(FedAvg):
    """FedAvg that records the models it is asked to average."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[StateDict] = []

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.seen = [_tensors(m.content["arrays"]) for m in replies]
        return super().aggregate_train(server_round, replies)


def _update_norm(model: StateDict, global_sd: StateDict) -> float:
    return float(sum(((model[k] - global_sd[k]).double() ** 2).sum() for k in global_sd)) ** 0.5


@pytest.mark.parametrize("reference", ["global", "largest", "merge-many"])
def test_dp_clipping_bound_holds_for_what_is_averaged_in_the_right_order(reference: str) -> None:
    """rebasin(DP)(FedAvg): align, then clip. What FedAvg averages is within the clipping
    norm of the global model, whatever the reference. The other order,
    DP(rebasin(FedAvg)), clips the models as sent, then aligns them: aligning to a client
    ("largest", "merge-many") moves the clipped models away from the global model, past the
    bound. Aligning to the global model itself cannot: permutations keep norms and matching
    only raises <global, pi(model)>, so ||pi(model) - global|| only shrinks (no running
    statistics here; they are not in the matching objective)."""
    global_sd = _sd(_mlp(1))
    torch.manual_seed(0)
    trained = {k: v + 0.05 * torch.randn_like(v) for k, v in global_sd.items()}
    models = {n: _permuted(trained, seed=n) for n in NODES}
    # Clipping to 0.9 of the updates as sent: it acts, and the clipped copies still carry
    # their permutations for matching to find.
    clip = 0.9 * _update_norm(models[1], global_sd)
    dp = {"noise_multiplier": 0.0, "clipping_norm": clip, "num_sampled_clients": 5}
    options = {"model": _mlp(0), "device": "cpu", "reference": reference}

    right_inner = _Spy(**SAMPLING)
    right = rebasin(DifferentialPrivacyServerSideFixedClipping)(right_inner, **options, **dp)
    _run(right, global_sd, models)
    assert len(right_inner.seen) == 5
    assert max(_update_norm(m, global_sd) for m in right_inner.seen) <= clip * (1 + 1e-6)

    inner = with_rebasin(_Spy(**SAMPLING), **options)
    wrong = DifferentialPrivacyServerSideFixedClipping(inner, **dp)
    _run(wrong, global_sd, models)
    assert len(inner.seen) == 5
    longest = max(_update_norm(m, global_sd) for m in inner.seen)
    if reference == "global":
        assert longest <= clip * (1 + 1e-6)
    else:
        assert longest > 1.05 * clip


@pytest.mark.parametrize("name", ["FedAdam", "FedAvgM"])
def test_stateful_strategies_over_rounds_match_the_bare_strategy(name: str) -> None:
    """Three rounds through Strategy.start: clients return a permuted copy of the global
    model they received, scaled; the server optimiser's state evolves as without them."""

    def client(permute: bool):
        def reply(node_id: int, message: Message) -> Message:
            received = _tensors(message.content["arrays"])
            trained = {k: v * (1.0 + 0.01 * node_id) for k, v in received.items()}
            return _reply(node_id, _permuted(trained, node_id) if permute else trained, 10)

        return reply

    results = []
    for aligned in (False, True):
        strategy = _make(name, aligned)
        random.seed(0)
        result = strategy.start(
            grid=_FakeGrid(NODES, client(permute=aligned)),  # type: ignore[arg-type]
            initial_arrays=ArrayRecord(_sd(_mlp(1))),
            num_rounds=3,
        )
        results.append(_tensors(result.arrays))
    _assert_equal(results[1], results[0])


def test_a_stateful_strategy_with_another_reference_is_warned_about(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        rebasin(FedAdam)(model=_mlp(0), reference="largest")
    assert _warnings(caplog) == [
        "Re-Basin reference 'largest' with a strategy that keeps server-side state "
        "(ReBasinFedAdam): its pseudo-gradient then mixes the units of two basins; use 'global'"
    ]


def test_rebasin_fedavg_is_the_streamed_form_of_rebasin_fedavg_class() -> None:
    global_sd = _sd(_mlp(1))
    models = {n: _permuted({k: v * (1 + 0.01 * n) for k, v in global_sd.items()}, n) for n in NODES}
    short = ReBasinFedAvg(model=_mlp(0), device="cpu", **SAMPLING)
    long = rebasin(FedAvg)(model=_mlp(0), device="cpu", **SAMPLING)
    a, _ = _run(short, global_sd, models)
    b, _ = _run(long, global_sd, models)
    _assert_equal(_tensors(a), _tensors(b))
    assert isinstance(short, FedAvg) and isinstance(short, ReBasin)


def test_the_factory_and_the_instance_form_refuse_what_they_cannot_wrap() -> None:
    assert rebasin(FedMedian) is rebasin(FedMedian)
    assert rebasin(FedMedian).__name__ == "ReBasinFedMedian"
    with pytest.raises(TypeError, match="takes a flwr.serverapp.strategy.strategy.Strategy class"):
        rebasin(int)  # type: ignore[arg-type]
    wrapped = with_rebasin(FedMedian(min_train_nodes=3), model=_mlp(0))
    assert isinstance(wrapped, FedMedian) and wrapped.min_train_nodes == 3
    with pytest.raises(TypeError, match="has re-basin in front already"):
        with_rebasin(wrapped, model=_mlp(0))
    with pytest.raises(TypeError, match=r"unknown re-basin options \['modle'\]"):
        with_rebasin(FedAvg(), modle=_mlp(0))
    assert rebasin(ReBasinFedAvg) is ReBasinFedAvg
    assert SPEC.canonical() == wrapped.spec.canonical()
