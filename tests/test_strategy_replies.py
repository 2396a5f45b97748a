"""ReBasinFedAvg (Message API): unusable replies are dropped with the node named, where
Flower's FedAvg stops; evaluation replies likewise.

Unit tests: replies are built as Flower ``Message`` objects in memory, no network.
"""

from __future__ import annotations

import logging

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from strategy_messages import (
    StateDict,
    _assert_close,
    _instruction,
    _mlp,
    _permuted,
    _reply,
    _sd,
    _serverapp_identity,  # noqa: F401 (autouse fixture)
    _strategy,
    _tensors,
    _warnings,
)

from strategies import ReBasinFedAvg

# --- robustness -----------------------------------------------------------------------------


def _set_nan(sd: StateDict) -> Message:
    sd["layers.1.weight"][3, 4] = float("nan")
    return _reply(99, sd)


def _set_inf(sd: StateDict) -> Message:
    sd["head.bias"][0] = float("inf")
    return _reply(99, sd)


def _drop_key(sd: StateDict) -> Message:
    del sd["layers.0.bias"]
    return _reply(99, sd)


def _add_key(sd: StateDict) -> Message:
    sd["extra.weight"] = torch.zeros(3)
    return _reply(99, sd)


def _reshape(sd: StateDict) -> Message:
    sd["head.weight"] = torch.zeros(6, 32)
    return _reply(99, sd)


def _retype(sd: StateDict) -> Message:
    sd["head.weight"] = sd["head.weight"].double()
    return _reply(99, sd)


def _error_reply(sd: StateDict) -> Message:
    return Message(Error(code=3, reason="client crashed"), reply_to=_instruction(99))


def _no_arrays(sd: StateDict) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": 10, "loss": 0.1})})
    return Message(content, reply_to=_instruction(99))


BAD_REPLIES = {
    "nan": (_set_nan, "'layers.1.weight' has 1 non-finite values"),
    "inf": (_set_inf, "'head.bias' has 1 non-finite values"),
    "missing-key": (_drop_key, "missing keys ['layers.0.bias']"),
    "extra-key": (_add_key, "unexpected keys ['extra.weight']"),
    "wrong-shape": (_reshape, "'head.weight' has shape (6, 32), expected (5, 32)"),
    "wrong-dtype": (_retype, "'head.weight' has dtype torch.float64, expected torch.float32"),
    "no-num-examples": (lambda sd: _reply(99, sd, None), "no 'num-examples' in its metrics"),
    "zero-num-examples": (lambda sd: _reply(99, sd, 0), "'num-examples' must be positive"),
    "list-num-examples": (lambda sd: _reply(99, sd, [1, 2]), "must be a single number"),
    "error-reply": (_error_reply, "error reply (code 3): client crashed"),
    "no-arrayrecord": (_no_arrays, "no ArrayRecord in the reply"),
}


@pytest.mark.parametrize("kind", sorted(BAD_REPLIES))
def test_bad_reply_is_dropped_with_a_log_line_and_the_rest_merged(kind, caplog) -> None:
    make_bad, problem = BAD_REPLIES[kind]
    original = _sd(_mlp(1))
    good = [_reply(n, _permuted(original, seed=n), 10 * n) for n in (1, 2, 3)]
    bad = make_bad(_permuted(original, seed=4))
    replies = [good[0], bad, good[1], good[2]]  # the bad one in the middle of the stream
    strategy = _strategy(original)
    with caplog.at_level(logging.INFO):
        arrays, metrics = strategy.aggregate_train(1, replies)
    _assert_close(_tensors(arrays), original)
    assert strategy.last_round.valid == [1, 2, 3]
    assert problem in strategy.last_round.dropped[99]
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert "node 99" in warnings[0] and problem in warnings[0]
    # Metrics come from the valid replies only, weighted by their examples.
    expected_loss = (0.51 * 10 + 0.52 * 20 + 0.53 * 30) / 60
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-12)
    assert set(strategy.warm_starts) == {1, 2, 3}


def test_flowers_fedavg_stops_on_the_same_reply_where_ours_goes_on() -> None:
    original = _sd(_mlp(1))
    replies = [_reply(1, original), _drop_key(_sd(_mlp(1))), _reply(2, original)]
    with pytest.raises(InconsistentMessageReplies):
        FedAvg().aggregate_train(1, replies)
    arrays, _ = _strategy(original).aggregate_train(1, replies)
    assert arrays is not None


def test_too_few_valid_replies_keep_the_previous_global_model(caplog) -> None:
    original = _sd(_mlp(1))
    previous = ArrayRecord(original)
    strategy = ReBasinFedAvg(model=_mlp(0), device="cpu", min_train_nodes=3)
    strategy.set_global_arrays(previous)
    replies = [_reply(1, _permuted(original, 1)), _set_nan(_sd(_mlp(2))), _reply(2, original)]
    with caplog.at_level(logging.INFO):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is previous
    assert strategy.last_round.kept_previous and strategy.last_round.valid == []
    assert metrics is None
    assert strategy.warm_starts == {}
    warnings = _warnings(caplog)
    assert len(warnings) == 2
    assert "node 99" in warnings[0]
    assert (
        "Keeping the previous global model: 2 valid replies of 3, fewer than the 3" in warnings[1]
    )


def test_no_replies_at_all_keep_the_previous_global_model() -> None:
    previous = ArrayRecord(_sd(_mlp(1)))
    strategy = ReBasinFedAvg(model=_mlp(0), device="cpu")
    strategy.set_global_arrays(previous)
    assert strategy.aggregate_train(1, []) == (previous, None)


def test_evaluate_drops_bad_replies_where_fedavg_stops() -> None:
    def eval_reply(node: int, metrics: dict) -> Message:
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=_instruction(node))

    good = [
        eval_reply(1, {"num-examples": 10, "acc": 0.5}),
        eval_reply(2, {"num-examples": 30, "acc": 0.9}),
    ]
    bad = eval_reply(3, {"acc": 0.1})
    with pytest.raises(InconsistentMessageReplies):
        FedAvg().aggregate_evaluate(1, [*good, bad])
    strategy = ReBasinFedAvg(model=_mlp(0), device="cpu")
    metrics = strategy.aggregate_evaluate(1, [good[0], bad, good[1]])
    assert dict(metrics) == dict(FedAvg().aggregate_evaluate(1, good))
    assert metrics["acc"] == pytest.approx(0.8)
