"""The pieces of a results file: seed statistics, strict JSON, class groups, settings diffs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simulations.results import (
    class_homes,
    differing_settings,
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
