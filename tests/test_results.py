"""The pieces of a results file: seed statistics, strict JSON, class groups, settings diffs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from simulations.report import code_line
from simulations.results import (
    class_homes,
    code_version,
    differing_settings,
    environment,
    group_accuracy,
    sanitize,
    series_stat,
    stat,
)


def test_stat_is_mean_and_sample_std_skipping_undefined() -> None:
    assert stat([1.0, 2.0, 4.0]) == {
        "mean": 7 / 3,
        "std": pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1)),
        "n": 3,
        "values": [1.0, 2.0, 4.0],
    }
    assert stat([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1, "values": [0.5]}
    assert stat([float("nan"), 3.0, None]) == {
        "mean": 3.0,
        "std": 0.0,
        "n": 1,
        "values": [None, 3.0, None],
    }
    assert stat([None]) == {"mean": None, "std": None, "n": 0, "values": [None]}
    assert series_stat([[1.0, 2.0], [3.0, 2.0]]) == {"mean": [2.0, 2.0], "std": [np.sqrt(2), 0.0]}
    with pytest.raises(ValueError, match=r"one length, got lengths \[1, 2\]"):
        series_stat([[1.0], [1.0, 2.0]])


def test_sanitize_makes_strict_json() -> None:
    data = {"a": float("nan"), "b": [np.float32(0.5), np.int64(3), float("inf")], 1: np.array([1])}
    clean = sanitize(data)
    assert clean == {"a": None, "b": [0.5, 3, None], "1": [1]}
    json.dumps(clean, allow_nan=False)


def test_class_homes_and_group_accuracy() -> None:
    counts = [[24, 24, 6, 6], [6, 6, 24, 24]]
    assert class_homes(counts) == [0, 0, 1, 1]
    assert class_homes([[5, 1], [5, 2]]) == [0, 1]  # ties go to the lower client
    assert group_accuracy([1.0, 0.5, 0.25, None], [0, 0, 1, 1], 0) == 0.75
    assert group_accuracy([1.0, 0.5, 0.25, None], [0, 0, 1, 1], 1) == 0.25
    assert group_accuracy([1.0], [0], 1) is None


def test_differing_settings_names_every_leaf_that_differs() -> None:
    a = {"seeds": [0], "experiment": {"epochs": 5, "lr": 0.1, "width": 1.0}, "mode": "one-shot"}
    b = {"seeds": [0], "experiment": {"epochs": 6, "lr": 0.1}, "mode": "both", "extra": None}
    assert differing_settings(a, b) == ["experiment.epochs", "experiment.width", "mode"]
    assert differing_settings(a, a) == []
    assert differing_settings({"x": [1, 2]}, {"x": [1, 3]}) == ["x"]


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def test_code_version_names_the_checkouts_commit_and_local_changes(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "a.py").write_text("x = 1\n")
    (repo / "docs").mkdir()
    (repo / "docs" / "results.json").write_text("{}\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "one")
    head = _git(repo, "rev-parse", "HEAD")
    assert code_version(repo) == {"commit": head, "dirty": False}
    (repo / "notes.txt").write_text("untracked files are not code changes\n")
    assert code_version(repo) == {"commit": head, "dirty": False}
    (repo / "docs" / "results.json").write_text('{"seeds": [0]}\n')  # results, not code
    assert code_version(repo) == {"commit": head, "dirty": False}
    (repo / "pkg" / "a.py").write_text("x = 2\n")
    assert code_version(repo) == {"commit": head, "dirty": True}
    # A folder inside someone else's repository (a venv in another project) is not a
    # checkout of this code: its commit would be the wrong one.
    assert code_version(repo / "pkg") is None
    assert code_version(tmp_path) is None  # not a repository at all


def test_this_checkout_records_its_commit_in_the_environment() -> None:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    env = environment()
    assert env["code"]["commit"] == _git(root, "rev-parse", "HEAD")
    assert code_line(env["code"]).startswith(f"commit {env['code']['commit'][:12]}")


def test_code_line_names_the_commit_or_says_it_is_not_recorded() -> None:
    assert code_line({"commit": "0123456789abcdef", "dirty": True}) == (
        "commit 0123456789ab with local changes"
    )
    assert code_line({"commit": "0123456789abcdef", "dirty": False}) == "commit 0123456789ab"
    assert code_line(None) == "not recorded (not a git checkout, or an older results file)"
