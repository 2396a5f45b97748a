"""The aggregation pipeline without Flower: the engine's alignment path
(:mod:`rebasin.align`) and the strategies' round step (:class:`RoundAlignment`,
:func:`rebasin_aggregate`) on plain :class:`ClientUpdate` values."""

from __future__ import annotations

import pytest
import torch
from strategy_messages import SPEC, _mlp, _permuted, _sd

from rebasin.align import ReferenceAligner, align_to_reference, identity_alignment
from rebasin.matching import MatchingError, matching_objective, weight_matching
from rebasin.merge import merge_to_reference
from rebasin.permute import apply_permutation, invert
from strategies.aggregate import rebasin_aggregate
from strategies.align_step import RoundAlignment
from strategies.core import ClientUpdate, ReBasinOptions

OPTIONS = ReBasinOptions(device="cpu")


class _Counted:
    """A ``load`` that counts its calls."""

    def __init__(self, state_dict: dict) -> None:
        self.state_dict, self.calls = state_dict, 0

    def __call__(self) -> dict:
        self.calls += 1
        return {k: v.clone() for k, v in self.state_dict.items()}


def _update(node: int, state_dict: dict, weight: object = 10) -> ClientUpdate:
    return ClientUpdate(node, weight=weight, load=_Counted(state_dict))


# --- the engine's alignment path ---------------------------------------------------------


def test_reference_aligner_undoes_a_permutation_and_reports_it() -> None:
    reference = _sd(_mlp(1))
    permuted = _permuted(reference, seed=3)
    aligned, alignment = ReferenceAligner(SPEC, reference).align(permuted, seed=0)
    assert all(torch.equal(aligned[k], reference[k]) for k in reference)
    assert alignment.objective_gain == pytest.approx(
        matching_objective(SPEC, reference, reference)
        - matching_objective(SPEC, reference, permuted),
        rel=1e-6,
    )
    assert apply_permutation(SPEC, alignment.perms, permuted)["head.weight"].equal(
        reference["head.weight"]
    )
    assert not alignment.warm_start


def test_a_warm_start_is_used_only_where_it_beats_the_identity() -> None:
    reference = _sd(_mlp(1))
    permuted = _permuted(reference, seed=3)
    aligner = ReferenceAligner(SPEC, reference)
    _, first = aligner.align(permuted)
    _, warm = aligner.align(permuted, init=first.perms)
    assert warm.warm_start and warm.sweeps == 1
    # For a model already in the reference's basin the old permutations are worse: ignored.
    _, cold = aligner.align(reference, init=first.perms)
    assert not cold.warm_start
    assert all(torch.equal(p, torch.arange(p.numel())) for p in cold.perms.values())
    # Permutations of other sizes (a changed model) are ignored, not an error.
    _, other = aligner.align(permuted, init={p: torch.arange(2) for p in first.perms})
    assert not other.warm_start


def test_align_to_reference_streams_what_merge_to_reference_averages() -> None:
    models = [_sd(_mlp(s)) for s in (1, 2, 3)]
    stream = list(align_to_reference(SPEC, models, reference=1, seed=4))
    assert [item.index for item in stream] == [0, 1, 2]
    identity = identity_alignment(SPEC, models[1])
    assert stream[1].alignment.sweeps == 0 and stream[1].alignment.objective_gain == 0.0
    assert all(
        torch.equal(stream[1].alignment.perms[p], identity.perms[p]) for p in SPEC.perm_names
    )
    for item in (stream[0], stream[2]):
        own = weight_matching(SPEC, models[1], models[item.index], seed=4 + item.index)
        expected = apply_permutation(SPEC, own.perms, models[item.index])
        assert all(torch.equal(item.state_dict[k], expected[k]) for k in expected)
    merged = merge_to_reference(SPEC, models, [1, 2, 3], reference=1, seed=4)
    manual = {
        k: sum(w * it.state_dict[k].double() for w, it in zip([1 / 3, 2 / 3, 1], stream))
        / (1 / 3 + 2 / 3 + 1)
        for k in merged
    }
    for k in merged:
        torch.testing.assert_close(merged[k], manual[k].float(), atol=1e-7, rtol=0)


def test_a_failed_matching_in_the_stream_names_the_model() -> None:
    models = [_sd(_mlp(1)), {k: torch.full_like(v, 1.5e19) for k, v in _sd(_mlp(2)).items()}]
    models.append({k: v.clone() for k, v in models[1].items()})
    with pytest.raises(MatchingError) as info:
        list(align_to_reference(SPEC, models, reference=1))
    assert info.value.model == 0 or info.value.model == 2
    assert str(info.value).startswith(f"model {info.value.model}: ")


# --- the round step -----------------------------------------------------------------------


def test_round_alignment_screens_everything_first_and_reads_each_model_twice() -> None:
    global_sd = _sd(_mlp(1))
    updates = [_update(n, _permuted(global_sd, n), 10 * n) for n in (1, 2, 3)]
    updates.insert(1, ClientUpdate(9, weight=5, load=lambda: (_ for _ in ()).throw(OSError("x"))))
    round_ = RoundAlignment(SPEC, global_sd, updates, options=OPTIONS, warm_starts={}, min_valid=2)
    # Screened before any alignment: the bad one is named, the total weight is known.
    assert round_.report.dropped == {9: "its arrays cannot be read: x"}
    assert [c.node_id for c in round_.candidates] == [1, 2, 3]
    assert round_.total_weight == 60.0
    assert all(u.load.calls == 1 for u in updates if u.node_id != 9)
    aligned = list(round_)
    assert [a.node_id for a in aligned] == [1, 2, 3]
    assert all(u.load.calls == 2 for u in updates if u.node_id != 9)
    for a in aligned:
        assert all(torch.equal(a.state_dict[k], global_sd[k]) for k in global_sd)
        assert a.alignment.perms.keys() == set(SPEC.perm_names)
    assert round_.report.valid == [1, 2, 3]
    # The permutations found undo the ones applied.
    perms = round_.report.alignments[2].perms
    applied = {p: invert(perms[p]) for p in perms}
    assert torch.equal(apply_permutation(SPEC, applied, global_sd)["layers.0.weight"],
                       _permuted(global_sd, 2)["layers.0.weight"])  # fmt: skip


def test_reference_largest_takes_the_first_heaviest_and_leaves_it_unpermuted() -> None:
    global_sd = _sd(_mlp(1))
    models = {n: _permuted(_sd(_mlp(2)), n) for n in (1, 2, 3)}
    updates = [_update(1, models[1], 10), _update(2, models[2], 30), _update(3, models[3], 30)]
    options = ReBasinOptions(device="cpu", reference="largest")
    aligned = {
        a.node_id: a
        for a in RoundAlignment(
            SPEC, global_sd, updates, options=options, warm_starts={}, min_valid=1
        )  # fmt: skip
    }
    assert aligned[2].alignment.sweeps == 0
    assert all(torch.equal(aligned[2].state_dict[k], models[2][k]) for k in models[2])
    for node in (1, 3):
        assert all(torch.equal(aligned[node].state_dict[k], models[2][k]) for k in models[2])


def test_rebasin_aggregate_keeps_the_previous_model_below_min_valid() -> None:
    global_sd = _sd(_mlp(1))
    updates = [_update(1, global_sd), _update(2, global_sd, weight=0)]
    merged, report = rebasin_aggregate(
        SPEC, global_sd, updates, options=OPTIONS, warm_starts={}, min_valid=2
    )
    assert merged is None and report.kept_previous
    assert report.dropped == {2: "'num-examples' must be positive and finite, got 0"}
    assert report.reason == "1 valid replies of 2, fewer than the 2 needed to merge"
    assert updates[0].load.calls == 1  # checked, never aligned


def test_merge_many_round_drops_a_failing_model_and_realigns_the_rest() -> None:
    global_sd = _sd(_mlp(1))
    huge = {k: torch.full_like(v, 1.5e19) for k, v in global_sd.items()}
    updates = [_update(1, _permuted(global_sd, 1)), _update(7, huge), _update(8, huge),
               _update(2, _permuted(global_sd, 2))]  # fmt: skip
    options = ReBasinOptions(device="cpu", reference="merge-many", max_norm_ratio=1e30)
    round_ = RoundAlignment(SPEC, global_sd, updates, options=options, warm_starts={},
                            min_valid=2)  # fmt: skip
    aligned = list(round_)
    assert len(round_.report.dropped) == 1
    assert [a.node_id for a in aligned] == [
        u for u in (1, 7, 8, 2) if u not in round_.report.dropped
    ]
