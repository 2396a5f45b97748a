"""ReBasinFedAvg (Message API): exactness against FedAvg, alignment, warm start, the loop.

Unit tests: replies are built as Flower ``Message`` objects in memory, no network.
"""

from __future__ import annotations

import logging

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from pydantic import ValidationError
from strategy_messages import (
    SPEC,
    StateDict,
    _assert_close,
    _assert_equal,
    _FakeGrid,
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
from torch import nn

from rebasin.align import align_many
from rebasin.merge import merge_many
from rebasin.models import MLP, VGG
from rebasin.permute import apply_permutation, random_perms
from rebasin.spec import SpecError
from strategies import ReBasinFedAvg

# --- helpers: tests/strategy_messages.py ---------------------------------------------------


# --- exactness against FedAvg --------------------------------------------------------------


def test_identical_models_equal_fedavg_exactly() -> None:
    # Weights whose factors w/W are not dyadic: FedAvg's float32 sum then differs from the
    # common model in the last bit of many entries; ours must reproduce FedAvg, not the model.
    model = _sd(_mlp(1))
    replies = [_reply(n, model, w) for n, w in [(1, 50), (2, 70), (3, 30)]]
    strategy = _strategy(model)
    arrays, metrics = strategy.aggregate_train(1, replies)
    fed_arrays, fed_metrics = FedAvg().aggregate_train(1, replies)
    assert any(not torch.equal(v, model[k]) for k, v in _tensors(fed_arrays).items())
    _assert_equal(_tensors(arrays), _tensors(fed_arrays))
    assert dict(metrics) == dict(fed_metrics)
    assert all(a.sweeps == 1 for a in strategy.last_round.alignments.values())
    assert strategy.last_objective_gains == {1: 0.0, 2: 0.0, 3: 0.0}


def test_identical_models_with_reference_largest_equal_fedavg_exactly() -> None:
    model = _sd(_mlp(1))
    replies = [_reply(n, model, w) for n, w in [(1, 50), (2, 70), (3, 30)]]
    strategy = _strategy(_sd(_mlp(9)), reference="largest")  # global unrelated to clients
    arrays, _ = strategy.aggregate_train(1, replies)
    _assert_equal(_tensors(arrays), _tensors(FedAvg().aggregate_train(1, replies)[0]))
    assert strategy.last_round.alignments[2].sweeps == 0  # node 2 is the reference


def test_identical_models_far_from_global_are_permuted_alike() -> None:
    # Every client gets the same matching seed, so identical models get identical permutations
    # and the result is exactly FedAvg's, permuted into the global model's basin.
    model = _sd(_mlp(1))
    replies = [_reply(n, model, w) for n, w in [(1, 50), (2, 70), (3, 30)]]
    strategy = _strategy(_sd(_mlp(9)))
    arrays, _ = strategy.aggregate_train(1, replies)
    perms = strategy.last_perms
    for node in (2, 3):
        for p in perms[1]:
            assert torch.equal(perms[node][p], perms[1][p])
    assert not all(torch.equal(t, torch.arange(t.numel())) for t in perms[1].values())
    fedavg = _tensors(FedAvg().aggregate_train(1, replies)[0])
    _assert_equal(_tensors(arrays), apply_permutation(SPEC, perms[1], fedavg))


def test_clients_near_the_global_model_keep_identity_perms() -> None:
    # Round 1 of ordinary FL: every client trained a little from the global model.
    global_sd = _sd(_mlp(1))
    gen = torch.Generator().manual_seed(0)
    replies = [
        _reply(n, {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in global_sd.items()})
        for n in (1, 2, 3)
    ]
    strategy = _strategy(global_sd)
    arrays, _ = strategy.aggregate_train(1, replies)
    for alignment in strategy.last_round.alignments.values():
        assert all(torch.equal(t, torch.arange(t.numel())) for t in alignment.perms.values())
        assert alignment.sweeps == 1 and alignment.objective_gain == 0.0
    _assert_equal(_tensors(arrays), _tensors(FedAvg().aggregate_train(1, replies)[0]))


# --- alignment ----------------------------------------------------------------------------


def test_permuted_copies_merge_back_to_the_original() -> None:
    original = _sd(_mlp(1))
    replies = [_reply(n, _permuted(original, seed=n), 10 * n) for n in (1, 2, 3)]
    strategy = _strategy(original)
    arrays, _ = strategy.aggregate_train(1, replies)
    _assert_close(_tensors(arrays), original)
    # Naive averaging of the same replies is far from the original.
    fedavg = _tensors(FedAvg().aggregate_train(1, replies)[0])
    assert (fedavg["layers.0.weight"] - original["layers.0.weight"]).abs().max() > 0.1
    for n in (1, 2, 3):
        aligned = apply_permutation(SPEC, strategy.last_perms[n], _permuted(original, seed=n))
        _assert_equal(aligned, original)
        assert strategy.last_objective_gains[n] > 0
        assert strategy.last_round.alignments[n].sweeps >= 2
    assert set(strategy.warm_starts) == {1, 2, 3}


def test_batchnorm_model_merges_running_stats_and_keeps_integer_buffers() -> None:
    torch.manual_seed(3)
    model = VGG(cfg=(8, "M", 16, "M"), norm="batch")
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(7)
    original = _sd(model)
    spec = model.permutation_spec()
    replies = []
    for n in (1, 2):
        perms = random_perms(spec, original, seed=n)
        replies.append(_reply(n, apply_permutation(spec, perms, original), 10 * n))
    strategy = ReBasinFedAvg(model=model, device="cpu")
    strategy.set_global_arrays(ArrayRecord(original))
    arrays, _ = strategy.aggregate_train(1, replies)
    merged = _tensors(arrays)
    _assert_close(merged, original, atol=1e-5)
    tracked = [k for k in merged if k.endswith("num_batches_tracked")]
    assert tracked and all(merged[k].dtype == torch.int64 and int(merged[k]) == 7 for k in tracked)


def test_reference_largest_merges_into_the_largest_clients_basin() -> None:
    original = _sd(_mlp(1))
    weights = {1: 10, 2: 50, 3: 20}
    replies = [_reply(n, _permuted(original, seed=n), w) for n, w in weights.items()]
    strategy = _strategy(_sd(_mlp(9)), reference="largest")
    arrays, _ = strategy.aggregate_train(1, replies)
    _assert_close(_tensors(arrays), _permuted(original, seed=2))
    reference = strategy.last_round.alignments[2]
    assert reference.sweeps == 0
    assert all(torch.equal(t, torch.arange(t.numel())) for t in reference.perms.values())


def test_reference_largest_skips_an_invalid_largest_reply(caplog) -> None:
    original = _sd(_mlp(1))
    bad = _permuted(original, seed=2)
    bad["head.bias"][0] = float("nan")
    replies = [
        _reply(1, _permuted(original, seed=1), 10),
        _reply(2, bad, 50),
        _reply(3, _permuted(original, seed=3), 20),
    ]
    strategy = _strategy(_sd(_mlp(9)), reference="largest")
    arrays, _ = strategy.aggregate_train(1, replies)
    _assert_close(_tensors(arrays), _permuted(original, seed=3))
    assert strategy.last_round.valid == [1, 3]
    assert "non-finite" in strategy.last_round.dropped[2]


def test_merge_many_recovers_a_function_equal_model() -> None:
    original_model = _mlp(1).eval()
    original = _sd(original_model)
    replies = [_reply(n, _permuted(original, seed=n), 10 * n) for n in (1, 2, 3)]
    strategy = _strategy(_sd(_mlp(9)), reference="merge-many")
    arrays, _ = strategy.aggregate_train(1, replies)
    merged_model = _mlp(0).eval()
    merged_model.load_state_dict(_tensors(arrays))
    x = torch.randn(16, 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged_model(x), original_model(x), atol=1e-5, rtol=0)
    assert strategy.last_round.valid == [1, 2, 3]
    assert sorted(strategy.last_round.alignments) == [1, 2, 3]


def test_merge_many_reports_each_nodes_real_permutations(caplog) -> None:
    original = _sd(_mlp(1))
    perms_in = {n: random_perms(SPEC, original, seed=n) for n in (1, 2, 4)}
    models = {n: _permuted(original, seed=n) for n in perms_in}
    bad = _permuted(original, seed=3)
    bad["head.bias"][0] = float("nan")
    replies = [_reply(1, models[1], 10), _reply(2, models[2], 20), _reply(3, bad, 40)]
    replies.append(_reply(4, models[4], 30))
    strategy = _strategy(_sd(_mlp(9)), reference="merge-many", seed=5)
    with caplog.at_level(logging.INFO, logger="flwr.rebasin"):
        arrays, _ = strategy.aggregate_train(1, replies)
    report = strategy.last_round
    assert report.valid == [1, 2, 4] and list(report.dropped) == [3]

    # The merged model is merge_many's, bit for bit, computed outside the strategy.
    valid = [models[n] for n in (1, 2, 4)]
    expected = merge_many(SPEC, valid, [10.0, 20.0, 30.0], seed=5, max_iter=100)
    _assert_equal(_tensors(arrays), {k: expected[k] for k in original})

    # Each node's perms map its model into the common basin: all aligned copies are one
    # model, the original under one permutation (the input's permutation, then the node's).
    assert sorted(report.alignments) == [1, 2, 4]
    common = {p: perms_in[1][p][report.alignments[1].perms[p]] for p in report.alignments[1].perms}
    assert not all(torch.equal(t, torch.arange(t.numel())) for t in common.values())
    basin = apply_permutation(SPEC, common, original)
    for n in (1, 2, 4):
        perms = report.alignments[n].perms
        for p in common:
            assert torch.equal(perms_in[n][p][perms[p]], common[p]), (n, p)
        _assert_equal(apply_permutation(SPEC, perms, models[n]), basin)
    # Averaging identical copies in float64 is exact: the merged model is that basin's copy.
    _assert_equal(_tensors(arrays), basin)

    # Sweeps and objective gains are those of the alignment itself, not made up.
    stats = align_many(SPEC, valid, [10.0, 20.0, 30.0], seed=5, max_iter=100)
    for i, n in enumerate((1, 2, 4)):
        alignment = report.alignments[n]
        assert alignment.sweeps == stats.sweeps[i] and alignment.sweeps >= 2  # >= 2 rounds
        assert alignment.objective_gain == stats.objective_gains[i]
        assert alignment.seconds > 0 and not alignment.warm_start
    # With this seed nodes 1 and 2 were moved into node 4's basin; node 4 never moved.
    assert all(torch.equal(common[p], perms_in[4][p]) for p in common)
    assert report.alignments[4].objective_gain == 0.0
    assert report.alignments[1].objective_gain > 0 and report.alignments[2].objective_gain > 0
    # Stored for the next round like any other reference's permutations.
    assert set(strategy.warm_starts) == {1, 2, 4}
    assert all(strategy.warm_starts[n] is report.alignments[n].perms for n in (1, 2, 4))
    node_lines = [r.getMessage() for r in caplog.records if "matching sweeps" in r.getMessage()]
    assert [line.split()[1] for line in node_lines] == ["1:", "2:", "4:"]


def test_merge_many_of_distinct_models_is_merge_many_s_weighted_average() -> None:
    # Permuted copies plus a little noise each: the aligned models differ, so the weights and
    # which node gets which permutations show in the result.
    original = _sd(_mlp(1))
    gen = torch.Generator().manual_seed(0)
    models = [
        {
            k: v + 1e-2 * torch.randn(v.shape, generator=gen)
            for k, v in _permuted(original, n).items()
        }
        for n in (1, 2, 3)
    ]
    weights = [7.0, 11.0, 13.0]
    replies = [_reply(n, m, int(w)) for n, m, w in zip((1, 2, 3), models, weights)]
    strategy = _strategy(_sd(_mlp(9)), reference="merge-many", seed=2)
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = merge_many(SPEC, models, weights, seed=2, max_iter=100)
    _assert_equal(_tensors(arrays), {k: expected[k] for k in original})
    stats = align_many(SPEC, models, weights, seed=2, max_iter=100)
    for i, n in enumerate((1, 2, 3)):
        perms = strategy.last_round.alignments[n].perms
        assert all(torch.equal(perms[p], stats.perms[i][p]) for p in stats.perms[i])
        _assert_equal(apply_permutation(SPEC, perms, models[i]), stats.aligned[i])
    assert not torch.equal(stats.aligned[0]["layers.0.weight"], stats.aligned[1]["layers.0.weight"])


def test_merge_many_of_a_single_model_reports_the_identity() -> None:
    original = _sd(_mlp(1))
    strategy = _strategy(_sd(_mlp(9)), reference="merge-many", min_train_nodes=1)
    arrays, _ = strategy.aggregate_train(1, [_reply(7, _permuted(original, seed=7))])
    _assert_equal(_tensors(arrays), _permuted(original, seed=7))
    alignment = strategy.last_round.alignments[7]
    assert all(torch.equal(t, torch.arange(t.numel())) for t in alignment.perms.values())
    assert (alignment.sweeps, alignment.seconds, alignment.objective_gain) == (0, 0.0, 0.0)
    assert not alignment.warm_start


def test_align_many_reports_a_common_basin_and_its_cost_per_model() -> None:
    original = _sd(_mlp(1))
    models = [_permuted(original, seed=n) for n in (1, 2, 3)]
    result = align_many(SPEC, models, [1.0, 2.0, 3.0], seed=4)
    for i in range(3):
        # Permuted copies of one model land on one basin, and perms say how.
        _assert_equal(result.aligned[i], result.aligned[0])
        _assert_equal(apply_permutation(SPEC, result.perms[i], models[i]), result.aligned[i])
    # Round 1 matches every model, the last round changes nothing (no more than 20 rounds).
    assert 2 <= result.rounds <= 20
    assert all(s >= 1 for s in result.sweeps) and all(t > 0 for t in result.seconds)
    assert len(result.objective_gains) == 3
    again = align_many(SPEC, models, [1.0, 2.0, 3.0], seed=4)
    assert again.sweeps == result.sweeps and again.objective_gains == result.objective_gains


# --- warm start ----------------------------------------------------------------------------


def test_warm_start_is_stored_per_node_and_reused() -> None:
    original = _sd(_mlp(1))
    own_basin = _permuted(original, seed=5)  # a client that keeps its own model between rounds
    strategy = _strategy(original, min_train_nodes=1)
    arrays, _ = strategy.aggregate_train(1, [_reply(7, own_basin)])
    first = strategy.last_round.alignments[7]
    assert first.sweeps >= 2 and not first.warm_start
    assert set(strategy.warm_starts) == {7}

    strategy.set_global_arrays(arrays)
    strategy.aggregate_train(2, [_reply(7, own_basin)])
    second = strategy.last_round.alignments[7]
    assert second.warm_start and second.sweeps == 1  # started at the optimum
    for p, perm in first.perms.items():
        assert torch.equal(second.perms[p], perm)
    assert second.objective_gain == pytest.approx(first.objective_gain, rel=1e-5)


def test_stale_warm_start_is_ignored_when_the_client_restarted_from_global() -> None:
    original = _sd(_mlp(1))
    strategy = _strategy(original, min_train_nodes=1)
    arrays, _ = strategy.aggregate_train(1, [_reply(7, _permuted(original, seed=5))])
    strategy.set_global_arrays(arrays)
    # Round 2: the client trained from the new global model, which identity aligns best.
    strategy.aggregate_train(2, [_reply(7, _tensors(arrays))])
    alignment = strategy.last_round.alignments[7]
    assert not alignment.warm_start and alignment.sweeps == 1
    assert all(torch.equal(t, torch.arange(t.numel())) for t in alignment.perms.values())


# --- set-up and the whole loop -------------------------------------------------------------


def test_constructor_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="give model= .* or spec="):
        ReBasinFedAvg()
    with pytest.raises(ValidationError, match="reference"):
        ReBasinFedAvg(model=_mlp(0), reference="median")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="max_iter"):
        ReBasinFedAvg(model=_mlp(0), max_iter=0)
    with pytest.raises(ValidationError, match="unknown torch device"):
        ReBasinFedAvg(model=_mlp(0), device="abacus")
    with pytest.raises(SpecError):
        ReBasinFedAvg(model=nn.Linear(3, 2), spec=SPEC)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert ReBasinFedAvg(model=_mlp(0)).options.torch_device.type == expected


def test_spec_is_traced_from_a_model_without_a_hand_written_one() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    strategy = ReBasinFedAvg(model=model, device="cpu")
    assert strategy.spec.canonical() == frozenset(
        {frozenset({("0.weight", 0), ("0.bias", 0), ("2.weight", 1)})}
    )


def test_global_model_must_fit_the_spec() -> None:
    strategy = ReBasinFedAvg(model=_mlp(0), device="cpu")
    with pytest.raises(SpecError, match="global model does not fit"):
        strategy.set_global_arrays(
            ArrayRecord(_sd(MLP(in_features=20, hidden=(32,), num_classes=5)))
        )
    with pytest.raises(RuntimeError, match="configure_train"):
        strategy.aggregate_train(1, [_reply(1, _sd(_mlp(1)))])


def test_start_runs_rounds_through_a_grid_and_survives_a_broken_node(caplog) -> None:
    """Strategy.start with an in-memory grid: node 3 always returns NaN weights."""
    original = _sd(_mlp(1))

    def client(node_id: int, message: Message) -> Message:
        received = _tensors(message.content["arrays"])
        if message.metadata.message_type == MessageType.EVALUATE:
            metrics = MetricRecord({"num-examples": 5, "acc": float(node_id)})
            return Message(RecordDict({"metrics": metrics}), reply_to=message)
        # "Training" lands in a node-specific basin: a permuted copy of the original.
        trained = _permuted(original, seed=node_id)
        if node_id == 3:
            trained["head.bias"][:] = float("nan")
        assert set(received) == set(original)
        return _reply_to(message, trained, 10 * node_id)

    def _reply_to(message: Message, sd: StateDict, n: int) -> Message:
        content = RecordDict(
            {"arrays": ArrayRecord(sd), "metrics": MetricRecord({"num-examples": n})}
        )
        return Message(content, reply_to=message)

    strategy = ReBasinFedAvg(model=_mlp(0), device="cpu", min_available_nodes=3)
    grid = _FakeGrid([1, 2, 3], client)
    with caplog.at_level(logging.INFO):
        result = strategy.start(
            grid=grid,  # type: ignore[arg-type]
            initial_arrays=ArrayRecord(original),
            num_rounds=2,
            train_config=ConfigRecord({"lr": 0.1}),
        )
    _assert_close(_tensors(result.arrays), original)
    assert sorted(strategy.last_round.valid) == [1, 2]
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2]
    dropped = [w for w in _warnings(caplog) if "node 3" in w]
    assert len(dropped) == 2 and all("non-finite" in w for w in dropped)
    # Round 2: both nodes still sent their own basin, so the stored warm start was used.
    assert all(a.warm_start and a.sweeps == 1 for a in strategy.last_round.alignments.values())


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reference", ["global", "largest", "merge-many"])
def test_every_reference_on_every_device_recovers_the_original(device, reference) -> None:
    """Matching runs on ``device``; the merged model comes back as CPU arrays."""
    original_model = _mlp(1).eval()
    original = _sd(original_model)
    replies = [_reply(n, _permuted(original, seed=n), 10 * n) for n in (1, 2, 3)]
    strategy = ReBasinFedAvg(model=_mlp(0), device=device, reference=reference)
    strategy.set_global_arrays(ArrayRecord(original if reference == "global" else _sd(_mlp(9))))
    arrays, _ = strategy.aggregate_train(1, replies)
    merged_model = _mlp(0).eval()
    merged_model.load_state_dict(_tensors(arrays))
    x = torch.randn(16, 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged_model(x), original_model(x), atol=1e-5, rtol=0)
    assert strategy.last_round.valid == [1, 2, 3]


def test_an_error_reply_made_by_the_superlink_names_the_node_it_stands_for(caplog) -> None:
    """The SuperLink answers for a vanished node with an error reply of its own: the log
    must name the node the instruction went to, found through ``reply_to_message_id``."""
    original = _sd(_mlp(1))
    strategy = _strategy(original)
    sent = _instruction(7)
    sent.metadata.__dict__["_message_id"] = "msg-to-node-7"  # as the grid stamps it on send
    strategy._sent = [sent]
    lost = Message(Error(code=4, reason="node unavailable"), reply_to=sent)
    lost.metadata.__dict__["_src_node_id"] = 0  # made by the SuperLink, not by node 7
    assert lost.metadata.reply_to_message_id == "msg-to-node-7"
    good = [_reply(n, _permuted(original, seed=n), 10) for n in (1, 2)]
    with caplog.at_level(logging.INFO):
        strategy.aggregate_train(1, [good[0], lost, good[1]])
    assert list(strategy.last_round.dropped) == [7]
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "node 7" in warnings[0] and "node unavailable" in warnings[0]
