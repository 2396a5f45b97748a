"""Hostile or buggy clients: finite but huge replies, absurd ``num-examples``, rounds where
every reply is bad. No finite reply may stop the server or silently spoil the global model.

Flower's own FedAvg on the honest replies is the oracle: the honest clients here send scaled
copies of the global model, which matching leaves in place (the identity is optimal for
them), so the re-basin result is FedAvg's bit for bit.
"""

from __future__ import annotations

import logging

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from strategy_messages import (
    SPEC,
    StateDict,
    _assert_close,
    _assert_equal,
    _FakeGrid,
    _instruction,
    _mlp,
    _reply,
    _sd,
    _serverapp_identity,  # noqa: F401 (autouse fixture)
    _strategy,
    _tensors,
    _warnings,
)

import strategies.aggregate as aggregate_module
from rebasin.matching import MatchingError, weight_matching
from rebasin.merge import merge_many
from rebasin.permute import magnitude_problem, model_norm
from strategies import ReBasinFedAvg

REFERENCES = ["global", "largest", "merge-many"]
OBJECTIVE_OVERFLOW = (
    "weight matching failed: the matching objective is inf (weights too large for "
    "torch.float32 products)"
)
FLOAT32_MAX = torch.finfo(torch.float32).max


def _scaled(state_dict: StateDict, factor: float) -> StateDict:
    return {k: v * factor if v.is_floating_point() else v.clone() for k, v in state_dict.items()}


def _filled(state_dict: StateDict, value: float) -> StateDict:
    return {k: torch.full_like(v, value) for k, v in state_dict.items()}


HUGE = {
    "float32-max": (
        lambda sd: _filled(sd, FLOAT32_MAX),
        "'layers.0.weight' holds a value of magnitude 3.4e+38, whose square overflows "
        "torch.float32",
    ),
    "1e20": (
        lambda sd: _scaled(sd, 1e20 / float(sd["layers.0.weight"].abs().max())),
        "'layers.0.weight' holds a value of magnitude 1e+20, whose square overflows torch.float32",
    ),
    "1e25": (
        lambda sd: _filled(sd, 1e25),
        "'layers.0.weight' holds a value of magnitude 1e+25, whose square overflows torch.float32",
    ),
    "1e6-times-the-norm": (
        lambda sd: _scaled(sd, 1e6),
        "is more than max_norm_ratio = 1000 times the global model's norm",
    ),
}


def _honest(global_sd: StateDict) -> list[Message]:
    # Scaled copies of the global model: matching keeps them as they are, as it does for
    # clients that trained a little from it.
    return [_reply(1, _scaled(global_sd, 1.01), 50), _reply(2, _scaled(global_sd, 0.98), 70)]


@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize("kind", sorted(HUGE))
def test_a_huge_reply_is_dropped_and_the_rest_merged_as_fedavg_would(
    kind: str, reference: str, caplog: pytest.LogCaptureFixture
) -> None:
    make_huge, problem = HUGE[kind]
    global_sd = _sd(_mlp(1))
    honest = _honest(global_sd)
    # The heaviest reply: the "largest" reference must not pick it.
    hostile = _reply(9, make_huge(_sd(_mlp(2))), 1000)
    strategy = _strategy(global_sd, reference=reference)
    with caplog.at_level(logging.INFO):
        arrays, _ = strategy.aggregate_train(1, [honest[0], hostile, honest[1]])
    assert strategy.last_round.valid == [1, 2]
    assert problem in strategy.last_round.dropped[9]
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "node 9" in warnings[0] and problem in warnings[0]
    merged = _tensors(arrays)
    if reference == "merge-many":
        models = [_tensors(m.content["arrays"]) for m in honest]
        _assert_equal(merged, merge_many(SPEC, models, [50, 70]))
    else:
        fed_arrays, _ = FedAvg().aggregate_train(1, honest)
        _assert_equal(merged, _tensors(fed_arrays))


@pytest.mark.parametrize("reference", REFERENCES)
def test_start_with_a_hostile_node_returns_fedavg_of_the_honest_nodes(
    reference: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Strategy.start, 3 rounds: node 3 sends float32 max, then 1e20, then 1e25 (a reply
    that, merged, would poison the next round's global model)."""
    hostile_values = {1: FLOAT32_MAX, 2: 1e20, 3: 1e25}

    def client(node_id: int, message: Message) -> Message:
        if message.metadata.message_type == MessageType.EVALUATE:
            metrics = MetricRecord({"num-examples": 5, "acc": float(node_id)})
            return Message(RecordDict({"metrics": metrics}), reply_to=message)
        received = _tensors(message.content["arrays"])
        server_round = int(message.content["config"]["server-round"])
        if node_id == 3:
            trained = _filled(received, hostile_values[server_round])
        else:
            trained = _scaled(received, 1.0 + 0.01 * node_id)
        metrics = MetricRecord({"num-examples": 10 * node_id})
        content = RecordDict({"arrays": ArrayRecord(trained), "metrics": metrics})
        return Message(content, reply_to=message)

    initial = ArrayRecord(_sd(_mlp(1)))
    ours = ReBasinFedAvg(model=_mlp(0), device="cpu", reference=reference, min_available_nodes=3)
    with caplog.at_level(logging.INFO):
        result = ours.start(
            grid=_FakeGrid([1, 2, 3], client),  # type: ignore[arg-type]
            initial_arrays=initial,
            num_rounds=3,
        )
    oracle = FedAvg(min_available_nodes=2).start(
        grid=_FakeGrid([1, 2], client),  # type: ignore[arg-type]
        initial_arrays=initial,
        num_rounds=3,
    )
    if reference == "merge-many":  # MergeMany averages in float64: equal up to rounding
        _assert_close(_tensors(result.arrays), _tensors(oracle.arrays), atol=1e-6)
    else:
        _assert_equal(_tensors(result.arrays), _tensors(oracle.arrays))
    dropped = [w for w in _warnings(caplog) if "node 3" in w]
    assert [("whose square overflows" in w) for w in dropped] == [True, True, True]
    assert sorted(ours.last_round.valid) == [1, 2]


@pytest.mark.parametrize(
    "num_examples, problem",
    [
        (1e308, "'num-examples' = 1e+308 is more than the 1e+12 examples allowed"),
        (10**12 + 1, "'num-examples' = 1000000000001 is more than the 1e+12 examples allowed"),
        (2.5, "'num-examples' must be a whole number of examples, got 2.5"),
    ],
)
def test_absurd_num_examples_are_refused_never_a_zero_model(
    num_examples: float, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    global_sd = _sd(_mlp(1))
    previous = ArrayRecord(global_sd)
    strategy = ReBasinFedAvg(model=_mlp(0), device="cpu")
    strategy.set_global_arrays(previous)
    # Two such replies: their sum overflows, and FedAvg's weights w / W would all be 0.
    replies = [_reply(n, _scaled(global_sd, 1.01), num_examples) for n in (1, 2)]
    with caplog.at_level(logging.INFO):
        arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is previous
    assert strategy.last_round.dropped == {1: problem, 2: problem}
    # Beside honest replies, such a reply is left out and the rest merge as FedAvg would.
    honest = _honest(global_sd)
    replies = [honest[0], _reply(3, global_sd, num_examples), honest[1]]
    arrays, _ = strategy.aggregate_train(2, replies)
    fed_arrays, _ = FedAvg().aggregate_train(2, honest)
    _assert_equal(_tensors(arrays), _tensors(fed_arrays))
    assert any(torch.count_nonzero(v) for v in _tensors(arrays).values())


def test_an_all_bad_round_names_every_bad_reply(caplog: pytest.LogCaptureFixture) -> None:
    global_sd = _sd(_mlp(1))
    previous = ArrayRecord(global_sd)
    strategy = ReBasinFedAvg(model=_mlp(0), device="cpu", min_train_nodes=2)
    strategy.set_global_arrays(previous)
    crashed = Message(Error(code=3, reason="client crashed"), reply_to=_instruction(4))
    nan = _sd(_mlp(2))
    nan["head.bias"][1] = float("nan")
    with caplog.at_level(logging.INFO):
        arrays, metrics = strategy.aggregate_train(1, [crashed, _reply(5, nan)])
    assert arrays is previous and metrics is None
    assert _warnings(caplog) == [
        "Dropping the reply from node 4: error reply (code 3): client crashed",
        "Dropping the reply from node 5: model: 'head.bias' has 1 non-finite values (NaN or Inf)",
        "Keeping the previous global model: 0 valid replies of 2, fewer than the 2 needed to merge",
    ]


def test_a_reply_whose_matching_fails_is_dropped_and_the_round_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the norm bound relaxed, two replies of 1.5e19 pass the screen (their squares fit
    float32) but their products overflow: the second is dropped, not the round."""
    global_sd = _sd(_mlp(1))
    big = [_reply(n, _filled(global_sd, 1.5e19), w) for n, w in ((7, 100), (8, 90))]
    honest = _reply(1, _scaled(global_sd, 1.01), 10)
    strategy = _strategy(global_sd, reference="largest", max_norm_ratio=1e30)
    with caplog.at_level(logging.INFO):
        arrays, _ = strategy.aggregate_train(1, [big[0], big[1], honest])
    assert strategy.last_round.valid == [7, 1]
    assert strategy.last_round.dropped == {8: OBJECTIVE_OVERFLOW}
    merged = _tensors(arrays)
    assert all(bool(torch.isfinite(v).all()) for v in merged.values())


def test_merge_many_drops_the_model_whose_matching_fails_and_aligns_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    global_sd = _sd(_mlp(1))
    replies = [_reply(n, _filled(global_sd, 1.5e19), 10) for n in (7, 8)] + _honest(global_sd)
    strategy = _strategy(global_sd, reference="merge-many", max_norm_ratio=1e30)
    strategy.aggregate_train(1, replies)
    report = strategy.last_round
    assert not report.kept_previous
    # Once one huge model is gone, the other one matches the honest models' mean.
    assert len(report.dropped) == 1
    ((node, reason),) = report.dropped.items()
    assert node in (7, 8)
    assert reason == OBJECTIVE_OVERFLOW.replace("failed: ", f"failed: model {[7, 8].index(node)}: ")
    assert sorted(report.valid) == sorted({7, 8, 1, 2} - {node})


def test_a_merged_model_that_is_not_finite_keeps_the_previous_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A guard after the sum (it cannot overflow for screened replies): faked here."""
    global_sd = _sd(_mlp(1))
    previous = ArrayRecord(global_sd)
    result = aggregate_module._FedAvgSum.result

    def overflowing(self) -> StateDict:
        merged = result(self)
        merged["layers.1.bias"][0] = float("inf")
        return merged

    monkeypatch.setattr(aggregate_module._FedAvgSum, "result", overflowing)
    strategy = ReBasinFedAvg(model=_mlp(0), device="cpu")
    strategy.set_global_arrays(previous)
    with caplog.at_level(logging.INFO):
        arrays, _ = strategy.aggregate_train(1, _honest(global_sd))
    assert arrays is previous and strategy.last_round.kept_previous
    assert _warnings(caplog) == [
        "Keeping the previous global model: the merged model is not finite in 'layers.1.bias'"
    ]


def test_max_norm_ratio_is_validated_and_bounds_the_norm() -> None:
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_norm_ratio"):
            ReBasinFedAvg(model=_mlp(0), max_norm_ratio=bad)
    sd = _sd(_mlp(1))
    norm = model_norm(sd)
    assert norm == pytest.approx(
        sum(float((v.double() ** 2).sum()) for v in sd.values()) ** 0.5, rel=1e-12
    )
    assert magnitude_problem(_scaled(sd, 9.9), norm, 10.0) is None
    assert "max_norm_ratio = 10 times" in magnitude_problem(_scaled(sd, 10.1), norm, 10.0)
    # An all-zero global model: the bound is max_norm_ratio * 1, not 0.
    zeros = _filled(sd, 0.0)
    assert magnitude_problem(_scaled(sd, 1.0 / norm), model_norm(zeros), 2.0) is None


def test_weight_matching_refuses_a_non_finite_objective_or_similarity() -> None:
    a = _filled(_sd(_mlp(1)), 1.5e19)
    with pytest.raises(MatchingError) as info:
        weight_matching(SPEC, a, a)
    assert f"weight matching failed: {info.value}" == OBJECTIVE_OVERFLOW
    assert info.value.model is None
    # Huge rows that never meet in the objective (unit 0 of A, unit 1 of B) meet in S_P.
    a, b = _sd(_mlp(1)), _sd(_mlp(2))
    a["layers.0.weight"][0] = 1.5e19
    b["layers.0.weight"][1] = 1.5e19
    perm = SPEC.axes_to_perm["layers.0.weight"][0]
    with pytest.raises(MatchingError) as info:
        weight_matching(SPEC, a, b)
    assert str(info.value) == (
        f"the similarity matrix of permutation {perm!r} has 1 non-finite entries (weights too "
        "large for torch.float32 products)"
    )
