"""ReBasinFedAvgLegacy (legacy ``aggregate_fit`` API): the same merge and robustness."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.common import (
    Code,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg
from torch import nn

from rebasin.models import MLP
from rebasin.permute import apply_permutation, random_perms
from strategies import ReBasinFedAvgLegacy

StateDict = dict[str, torch.Tensor]


def _mlp(seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP(in_features=20, hidden=(32, 32), num_classes=5)


MODEL = _mlp(0)
SPEC = MODEL.permutation_spec()
KEYS = list(MODEL.state_dict())


def _sd(model: nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _permuted(state_dict: StateDict, seed: int) -> StateDict:
    permuted = apply_permutation(SPEC, random_perms(SPEC, state_dict, seed), state_dict)
    return {k: v.clone() for k, v in permuted.items()}


def _params(state_dict: StateDict) -> Parameters:
    return ndarrays_to_parameters([state_dict[k].numpy() for k in KEYS])


def _result(node_id: int, params: Parameters, num_examples: int = 10, code: Code = Code.OK):
    proxy = GridClientProxy(node_id, grid=None, run_id=1)  # type: ignore[arg-type]
    res = FitRes(
        Status(code, "ok" if code == Code.OK else "fit failed"),
        params,
        num_examples,
        {"loss": float(node_id)},
    )
    return proxy, res


def _tensors(params: Parameters) -> StateDict:
    return {k: torch.from_numpy(a) for k, a in zip(KEYS, parameters_to_ndarrays(params))}


def _strategy(global_sd: StateDict, **kwargs) -> ReBasinFedAvgLegacy:
    strategy = ReBasinFedAvgLegacy(model=MODEL, device="cpu", **kwargs)
    strategy.set_global_parameters(_params(global_sd))
    return strategy


def _weighted_loss(metrics: list[tuple[int, dict]]) -> dict:
    total = sum(n for n, _ in metrics)
    return {"loss": sum(n * m["loss"] for n, m in metrics) / total}


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_identical_models_equal_legacy_fedavg_exactly() -> None:
    model = _sd(_mlp(1))
    results = [_result(n, _params(model), w) for n, w in [(1, 50), (2, 70), (3, 30)]]
    strategy = _strategy(model)
    params, _ = strategy.aggregate_fit(1, results, [])
    fedavg, _ = FedAvg().aggregate_fit(
        1, [_result(n, _params(model), w) for n, w in [(1, 50), (2, 70), (3, 30)]], []
    )
    ours, theirs = _tensors(params), _tensors(fedavg)
    assert any(not torch.equal(v, model[k]) for k, v in theirs.items())  # FedAvg rounds
    for key in KEYS:
        assert torch.equal(ours[key], theirs[key]), key


def test_permuted_copies_merge_back_to_the_original() -> None:
    original = _sd(_mlp(1))
    results = [_result(n, _params(_permuted(original, n)), 10 * n) for n in (1, 2, 3)]
    strategy = _strategy(original, fit_metrics_aggregation_fn=_weighted_loss)
    params, metrics = strategy.aggregate_fit(1, results, [])
    merged = _tensors(params)
    for key in KEYS:
        torch.testing.assert_close(merged[key], original[key], atol=1e-6, rtol=0)
    assert metrics == {"loss": pytest.approx((10 + 40 + 90) / 60)}
    assert set(strategy.warm_starts) == {"1", "2", "3"}
    assert all(g > 0 for g in strategy.last_round.objective_gains.values())


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("nan", "'layers.0.weight' has 1 non-finite values"),
        ("count", "7 arrays sent, the model has 6"),
        ("dtype", "'head.weight' has dtype torch.float64, expected torch.float32"),
        ("zero-examples", "'num_examples' must be positive"),
        ("status", "status FIT_NOT_IMPLEMENTED: fit failed"),
    ],
)
def test_bad_result_is_dropped_with_a_log_line(kind, problem, caplog) -> None:
    original = _sd(_mlp(1))
    bad = _permuted(original, 4)
    num_examples, code = 10, Code.OK
    arrays = [bad[k].numpy() for k in KEYS]
    if kind == "nan":
        arrays[0][2, 3] = np.nan
    elif kind == "count":
        arrays.append(np.zeros(3, dtype=np.float32))
    elif kind == "dtype":
        arrays[KEYS.index("head.weight")] = arrays[KEYS.index("head.weight")].astype(np.float64)
    elif kind == "zero-examples":
        num_examples = 0
    else:
        code = Code.FIT_NOT_IMPLEMENTED
    results = [_result(n, _params(_permuted(original, n)), 10 * n) for n in (1, 2)]
    results.insert(1, _result(99, ndarrays_to_parameters(arrays), num_examples, code))
    strategy = _strategy(original, fit_metrics_aggregation_fn=_weighted_loss)
    with caplog.at_level(logging.INFO):
        params, metrics = strategy.aggregate_fit(1, results, [])
    merged = _tensors(params)
    for key in KEYS:
        torch.testing.assert_close(merged[key], original[key], atol=1e-6, rtol=0)
    assert metrics == {"loss": pytest.approx((10 + 40) / 30)}
    assert strategy.last_round.valid == ["1", "2"]
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "node 99" in warnings[0] and problem in warnings[0]


def test_too_few_valid_results_keep_the_previous_parameters(caplog) -> None:
    original = _sd(_mlp(1))
    strategy = _strategy(original, min_fit_clients=2)
    previous = strategy._global_parameters
    nan = _permuted(original, 2)
    nan["head.bias"][0] = float("inf")
    results = [_result(1, _params(original)), _result(2, _params(nan))]
    with caplog.at_level(logging.INFO):
        params, _ = strategy.aggregate_fit(1, results, [])
    assert params is previous
    assert strategy.last_round.kept_previous
    assert "1 valid replies of 2, fewer than the 2" in _warnings(caplog)[-1]


def test_failures_are_logged_and_refused_when_not_accepted(caplog) -> None:
    original = _sd(_mlp(1))
    results = [_result(n, _params(original)) for n in (1, 2)]
    strategy = _strategy(original, accept_failures=False)
    with caplog.at_level(logging.INFO):
        params, metrics = strategy.aggregate_fit(1, results, [TimeoutError("node 5 timed out")])
    assert params is strategy._global_parameters and metrics == {}
    assert any("TimeoutError: node 5 timed out" in w for w in _warnings(caplog))
    accepting = _strategy(original)
    params, _ = accepting.aggregate_fit(1, results, [TimeoutError("late")])
    assert accepting.last_round.valid == ["1", "2"]


def test_keys_are_required_without_a_model() -> None:
    with pytest.raises(ValueError, match="state_dict_keys="):
        ReBasinFedAvgLegacy(spec=SPEC)
    with pytest.raises(ValueError, match=r"missing \['head.bias'\]"):
        ReBasinFedAvgLegacy(spec=SPEC, state_dict_keys=KEYS[:-1])
    strategy = ReBasinFedAvgLegacy(spec=SPEC, state_dict_keys=KEYS, min_fit_clients=3)
    assert strategy.keys == KEYS and strategy.min_fit_clients == 3
    with pytest.raises(RuntimeError, match="configure_fit"):
        strategy.aggregate_fit(1, [], [])


# --- hostile clients (see tests/test_hostile.py for the Message API) ------------------------


def _scaled(state_dict: StateDict, factor: float) -> StateDict:
    return {k: v * factor for k, v in state_dict.items()}


@pytest.mark.parametrize("reference", ["global", "largest", "merge-many"])
def test_huge_results_over_two_rounds_leave_fedavg_of_the_honest_clients(
    reference: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Round 1: a 1e25 result (that, merged, would poison round 2); round 2: float32 max."""
    global_sd = _sd(_mlp(1))
    strategy = _strategy(global_sd, reference=reference, min_fit_clients=2)
    oracle_params = _params(global_sd)
    for server_round, value in ((1, 1e25), (2, float(np.finfo(np.float32).max))):
        current = _tensors(strategy._global_parameters)
        honest = [(1, 1.01, 50), (2, 0.98, 70)]
        hostile = _result(9, _params({k: torch.full_like(v, value) for k, v in current.items()}))
        results = [_result(n, _params(_scaled(current, f)), w) for n, f, w in honest]
        with caplog.at_level(logging.INFO):
            params, _ = strategy.aggregate_fit(server_round, [results[0], hostile, results[1]], [])
        assert strategy.last_round.valid == ["1", "2"]
        assert "whose square overflows torch.float32" in strategy.last_round.dropped["9"]
        oracle = _tensors(oracle_params)
        oracle_results = [_result(n, _params(_scaled(oracle, f)), w) for n, f, w in honest]
        oracle_params, _ = FedAvg().aggregate_fit(server_round, oracle_results, [])
        ours, theirs = _tensors(params), _tensors(oracle_params)
        for key in KEYS:
            if reference == "merge-many":  # MergeMany averages in float64
                torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0)
            else:
                assert torch.equal(ours[key], theirs[key]), key


def test_absurd_num_examples_are_refused_by_the_legacy_adapter(caplog) -> None:
    global_sd = _sd(_mlp(1))
    strategy = _strategy(global_sd, min_fit_clients=2)
    previous = strategy._global_parameters
    results = [_result(n, _params(global_sd), 10**13) for n in (1, 2)]
    with caplog.at_level(logging.INFO):
        params, _ = strategy.aggregate_fit(1, results, [])
    assert params is previous
    problem = "'num_examples' = 10000000000000 is more than the 1e+12 examples allowed"
    assert strategy.last_round.dropped == {"1": problem, "2": problem}


# --- re-basin in front of other legacy strategies ----------------------------------------


@pytest.mark.parametrize("name", ["FedMedian", "FedTrimmedAvg", "Krum", "FedAdam", "DP-fixed"])
def test_legacy_strategies_after_alignment_equal_the_bare_strategy_on_the_originals(
    name: str,
) -> None:
    from flwr.server.strategy import (
        DifferentialPrivacyServerSideFixedClipping,
        FedAdam,
        FedMedian,
        FedTrimmedAvg,
        Krum,
    )

    from strategies import rebasin_legacy

    global_sd = _sd(_mlp(1))
    trained = {k: v * 1.01 for k, v in global_sd.items()}
    initial = _params(global_sd)
    made = {
        "FedMedian": (FedMedian, (), {}),
        "FedTrimmedAvg": (FedTrimmedAvg, (), {"beta": 0.2}),
        "Krum": (Krum, (), {"num_malicious_clients": 1}),
        "FedAdam": (FedAdam, (), {"initial_parameters": initial}),
        "DP-fixed": (
            DifferentialPrivacyServerSideFixedClipping,
            (FedAvg(),),
            {"noise_multiplier": 0.0, "clipping_norm": 10.0, "num_sampled_clients": 5},
        ),
    }
    cls, args, kwargs = made[name]
    bare = cls(*args, **kwargs)
    ours = rebasin_legacy(cls)(*args, model=MODEL, device="cpu", **kwargs)
    ours.set_global_parameters(initial)
    if name == "DP-fixed":  # the wrapper clips against the parameters it configured
        bare.current_round_params = ours.current_round_params = parameters_to_ndarrays(initial)
    originals = [_result(n, _params(trained), 10 * n) for n in range(1, 6)]
    permuted = [_result(n, _params(_permuted(trained, n)), 10 * n) for n in range(1, 6)]
    theirs, _ = bare.aggregate_fit(1, originals, [])
    mine, _ = ours.aggregate_fit(1, permuted, [])
    ours_t, theirs_t = _tensors(mine), _tensors(theirs)
    for key in KEYS:
        assert torch.equal(ours_t[key], theirs_t[key]), key
    assert sorted(ours.last_round.valid) == ["1", "2", "3", "4", "5"]
