"""``rebasin robust``: the attacks are what they claim, the robust rules see aligned models,
the settings are checked at the edge, and a tiny end-to-end run writes consistent files.

The end-to-end run is tiny (20 MNIST training examples per class, one epoch, an MLP of width
0.125, one seed): its accuracies are meaningless; the files, their agreement and the exact
invariants are what is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum
from pydantic import ValidationError
from test_simulate import PNG_SIGNATURE, assert_shown
from typer.testing import CliRunner

from rebasin.models import MLP
from rebasin.permute import apply_permutation, random_perms
from simulations import cli
from simulations.local_grid import FIRST_NODE_ID, server_identity
from simulations.robust import (
    ATTACKS,
    STRATEGIES,
    VARIANTS,
    RobustConfig,
    aggregate,
    attack,
    make_strategy,
    moved_fraction,
    split_honest,
    trim_fraction,
    victim,
)
from strategies import ReBasin

runner = CliRunner()


def _mlp(seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP(in_features=20, hidden=(16, 16), num_classes=4)


def _sd(seed: int) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _mlp(seed).state_dict().items()}


def _tables(markdown: str) -> list[tuple[tuple[str, ...], list[list[str]]]]:
    """Every Markdown table of ``markdown`` in order: (header cells, rows of cells)."""
    tables, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|:"):
            header = tuple(c.strip() for c in lines[i].strip("|").split("|"))
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            tables.append((header, rows))
        else:
            i += 1
    return tables


def _equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------
# attacks


def test_scaled_and_sign_flip_are_exactly_their_definitions() -> None:
    h, g = _sd(1), _sd(2)
    assert _equal(attack("scaled", h, None, scale=10.0), {k: 10.0 * v for k, v in h.items()})
    assert _equal(attack("sign-flip", h), {k: -v for k, v in h.items()})
    assert _equal(attack("scaled", h, g, scale=10.0), {k: g[k] + 10.0 * (h[k] - g[k]) for k in h})
    assert _equal(attack("sign-flip", h, g), {k: g[k] - (h[k] - g[k]) for k in h})
    # relative to the global model: the update is -1x and 10x the honest update
    flipped, scaled = attack("sign-flip", h, g), attack("scaled", h, g, scale=10.0)
    for k in h:
        torch.testing.assert_close(flipped[k] - g[k], -(h[k] - g[k]), rtol=0, atol=1e-6)
        torch.testing.assert_close(scaled[k] - g[k], 10 * (h[k] - g[k]), rtol=0, atol=1e-5)


def test_noise_has_each_tensors_own_std_and_is_seeded() -> None:
    torch.manual_seed(0)
    h = {"w": torch.randn(300, 400) * 0.05, "b": torch.randn(400) * 3.0, "n": torch.tensor(7)}
    a = attack("noise", h, generator=torch.Generator().manual_seed(5))
    b = attack("noise", h, generator=torch.Generator().manual_seed(5))
    c = attack("noise", h, generator=torch.Generator().manual_seed(6))
    assert _equal(a, b) and not torch.equal(a["w"], c["w"])
    assert torch.equal(a["n"], h["n"])  # integer entries are copied
    for key in ("w", "b"):
        noise = a[key] - h[key]
        assert float(noise.std()) == pytest.approx(float(h[key].std(correction=0)), rel=0.08)
        assert abs(float(noise.mean())) < 0.2 * float(h[key].std())


def test_none_and_unknown_attacks_make_no_model() -> None:
    with pytest.raises(ValueError, match="'none' makes no model"):
        attack("none", _sd(0))
    with pytest.raises(ValueError, match="'flip' makes no model"):
        attack("flip", _sd(0))


# ------------------------------------------------------------------------------------------
# strategies


@pytest.mark.parametrize("n", range(2, 41))
def test_trimmed_mean_cuts_exactly_the_hostile_count(n: int) -> None:
    for hostile in range(0, (n + 1) // 2):
        beta = trim_fraction(hostile, n)
        assert int(beta * n) == hostile and beta < 0.5


def test_make_strategy_configures_flowers_own_classes() -> None:
    cfg = RobustConfig(clients_per_region=3, hostile=2)
    model = _mlp(0)
    krum = make_strategy("krum", False, cfg, model, reference="global", seed=0)
    assert type(krum) is Krum and krum.num_malicious_nodes == 2
    trimmed = make_strategy("trimmed-mean", False, cfg, model, reference="global", seed=0)
    assert type(trimmed) is FedTrimmedAvg and int(trimmed.beta * 8) == 2
    aligned = make_strategy("fedmedian", True, cfg, model, reference="largest", seed=3)
    assert isinstance(aligned, ReBasin) and isinstance(aligned, FedMedian)
    assert aligned.options.reference == "largest" and aligned.options.seed == 3
    assert type(make_strategy("fedavg", False, cfg, model, reference="global", seed=0)) is FedAvg
    with pytest.raises(ValueError, match="unknown strategy 'bulyan'"):
        make_strategy("bulyan", False, cfg, model, reference="global", seed=0)


def test_median_of_identical_models_is_that_model() -> None:
    cfg = RobustConfig(clients_per_region=2, hostile=1)
    g = _sd(0)
    replies = [(FIRST_NODE_ID + i, g, 10 + i) for i in range(3)]
    with server_identity(run_id=1):
        for aligned in (False, True):
            strategy = make_strategy("fedmedian", aligned, cfg, _mlp(0), reference="global",
                                     seed=0)  # fmt: skip
            merged, info = aggregate(strategy, 1, g, replies)
            assert _equal(merged, g), aligned
            assert not info["kept_previous"]
            if aligned:
                assert info["moved"] == {str(node): 0.0 for node, _, _ in replies}


@pytest.mark.parametrize("name", ["fedmedian", "krum", "trimmed-mean"])
def test_aligned_robust_rules_see_one_basin(name: str) -> None:
    """Permuted copies of the global model are the same function in other coordinates:
    aligned to the global model, every robust rule returns the global model itself; the same
    rule on the models as sent does not."""
    cfg = RobustConfig(clients_per_region=2, hostile=1)
    g = _sd(0)
    spec = _mlp(0).permutation_spec()
    copies = [
        {k: v.clone() for k, v in apply_permutation(spec, random_perms(spec, g, s), g).items()}
        for s in range(1, 6)
    ]
    replies = [(FIRST_NODE_ID + i, sd, 10) for i, sd in enumerate(copies)]
    with server_identity(run_id=1):
        strategy = make_strategy(name, True, cfg, _mlp(0), reference="global", seed=0)
        merged, info = aggregate(strategy, 1, g, replies)
        for k in g:
            torch.testing.assert_close(merged[k], g[k], rtol=0, atol=1e-6, msg=k)
        assert all(m > 0.5 for m in info["moved"].values())
        plain, plain_info = aggregate(
            make_strategy(name, False, cfg, _mlp(0), reference="global", seed=0), 1, g, replies
        )
    assert plain_info == {"kept_previous": False, "dropped": {}, "moved": {}}
    assert max(float((plain[k] - g[k]).abs().max()) for k in g) > 0.1


def test_moved_fraction_counts_units_off_the_identity() -> None:
    assert moved_fraction({"P0": torch.arange(4), "P1": torch.tensor([1, 0, 2, 3])}) == 0.25


# ------------------------------------------------------------------------------------------
# clients


def test_honest_shards_are_disjoint_regions_and_victims_span_them() -> None:
    labels = torch.arange(10).repeat_interleave(30)
    shards = split_honest(labels, 3, 0.8, seed=0)
    assert len(shards) == 6
    joined = torch.as_tensor(sorted(i for s in shards for i in s.tolist()))
    assert torch.equal(joined, torch.arange(300))  # disjoint and covering
    us = sum(len(s) for s in shards[:3])
    assert us == 5 * 24 + 5 * 6  # region "us": 80 % of 0-4, 20 % of 5-9
    assert [victim(j, 6, 2) for j in range(2)] == [0, 3]  # one "us" and one "eu" client


# ------------------------------------------------------------------------------------------
# settings at the edge


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hostile": 6}, "honest majority"),
        ({"hostile": 0}, "need --hostile >= 1"),
        ({"seeds": (0, 0)}, "distinct"),
        ({"seeds": (-1,)}, ">= 0"),
        ({"scale": 1.0}, "no attack"),
        ({"attacks": ("none", "flip")}, "attacks"),
        ({"strategies": ()}, "at least one"),
        ({"reference": "global"}, "reference"),
    ],
)
def test_config_refuses_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RobustConfig(**kwargs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hostile", "3", "--clients-per-region", "1"], "honest majority"),
        (["--seeds", "0", "0"], "distinct"),
        (["--attacks", "none", "flip"], "--attacks"),
        (["--threads", "0"], "--threads = 0"),
    ],
)
def test_cli_bad_values_exit_2_with_a_message(args: list[str], message: str) -> None:
    result = runner.invoke(cli.app, ["robust", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


# ------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("robust") / "tiny"
    args = ["robust", "--mode", "both", "--seeds", "0", "--width", "0.125", "--epochs", "1",
            "--rounds", "2", "--limit-per-class", "20", "--test-limit-per-class", "10",
            "--attacks", "none", "sign-flip", "--strategies", "fedavg", "krum",
            "--max-iter", "20", "--data-dir", str(data_dir), "--out", str(out)]  # fmt: skip
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def test_robust_run_writes_consistent_json_report_and_plot(tiny_run) -> None:
    out, results, report = tiny_run
    assert (out / "robust.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "](robust.png)" in report
    assert results["format"] == "rebasin-robust/1" and results["seeds"] == [0]
    assert [(r["mode"], r["seed"]) for r in results["runs"]] == [("one-shot", 0), ("rounds", 0)]
    attacks, strategies = ["none", "sign-flip"], ["fedavg", "krum"]
    assert set(attacks) <= set(ATTACKS) and set(strategies) <= set(STRATEGIES)
    for run in results["runs"]:
        # 20 examples per class, 80/20 region split: 100 per region, 3 shards of 33-34
        assert sorted(run["shard_sizes"]) == [33, 33, 33, 33, 34, 34]
        rounds = 1 if run["mode"] == "one-shot" else 2
        assert list(run["cells"]) == attacks
        for kind in attacks:
            assert list(run["cells"][kind]) == strategies
            for name in strategies:
                assert list(run["cells"][kind][name]) == list(VARIANTS)
                for variant, c in run["cells"][kind][name].items():
                    assert 0.0 <= c["accuracy"] <= 1.0
                    assert len(c["moved_honest"]) == rounds
                    assert c["kept_previous"] == [False] * rounds
                    hostile = [None] * rounds if kind == "none" else None
                    if variant == "unaligned":
                        assert c["moved_honest"] == c["moved_hostile"] == [None] * rounds
                    elif hostile is not None:
                        assert c["moved_hostile"] == hostile  # no hostile replies
    # Krum picks one reply: with no hostile client, one-shot Krum is an honest model (aligned:
    # a permuted honest model, the same function up to float rounding).
    oneshot = results["runs"][0]
    honest = [c["accuracy"] for c in oneshot["honest"]]
    assert oneshot["cells"]["none"]["krum"]["unaligned"]["accuracy"] in honest
    aligned_krum = oneshot["cells"]["none"]["krum"]["aligned"]["accuracy"]
    assert min(abs(a - aligned_krum) for a in honest) <= 1 / 100
    # report == JSON: every table cell shows the summary's mean ± std
    tables = _tables(report)
    assert len(tables) == 6  # per mode: accuracy, units moved (honest, hostile)
    for mode, (header, rows) in zip(["one-shot", "rounds"], tables[::3]):
        assert header == ("strategy", *attacks)
        assert [r[0] for r in rows] == ["FedAvg", "FedAvg + re-basin", "Krum", "Krum + re-basin"]
        for row, (name, variant) in zip(rows, [(s, v) for s in strategies for v in VARIANTS]):
            for text, kind in zip(row[1:], attacks):
                entry = results["summary"][mode]["cells"][kind][name][variant]["accuracy"]
                assert entry["n"] == 1
                assert entry["values"] == [
                    next(r for r in results["runs"] if r["mode"] == mode)["cells"][kind][name][
                        variant
                    ]["accuracy"]
                ]
                assert_shown(text, entry, 100, 2)
