"""Partitioners: disjoint, covering, exact proportions, seeded, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rebasin.partition import (
    class_counts,
    dirichlet_split,
    pathological_split,
    region_classes,
    region_counts,
    region_names,
    region_split,
)

# Examples per digit in the MNIST training set.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def mnist_like_labels(seed: int = 0) -> np.ndarray:
    """Labels with MNIST's training class counts, in a shuffled order."""
    labels = np.repeat(np.arange(10), MNIST_TRAIN_COUNTS)
    return np.random.default_rng(seed).permutation(labels)


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each part must be sorted without repeats"
    joined = np.concatenate(parts)
    assert len(joined) == n, "parts must not overlap"
    assert np.array_equal(np.sort(joined), np.arange(n)), "parts must cover every example"


def assert_same_parts(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


def parts_differ(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------------------
# region split


def test_region_names() -> None:
    assert region_names(2) == ["us", "eu"]
    assert region_names(1) == ["region-0"]
    assert region_names(3) == ["region-0", "region-1", "region-2"]
    with pytest.raises(ValueError, match="num_regions must be >= 1"):
        region_names(0)


def test_region_classes_are_contiguous_and_even() -> None:
    assert region_classes(10, 2) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert region_classes(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert region_classes(10, 10) == [[c] for c in range(10)]


def test_us_eu_split_of_mnist_is_exactly_80_20() -> None:
    labels = mnist_like_labels()
    us, eu = region_split(labels, num_regions=2, own_fraction=0.8, seed=0)
    assert_disjoint_cover([us, eu], len(labels))
    counts = class_counts(labels, [us, eu])
    # round(0.8 * n) with halves up to the owner, the rest to the other region.
    expected_us = [4738, 5394, 4766, 4905, 4674, 1084, 1184, 1253, 1170, 1190]
    expected_eu = [1185, 1348, 1192, 1226, 1168, 4337, 4734, 5012, 4681, 4759]
    assert counts[0].tolist() == expected_us
    assert counts[1].tolist() == expected_eu
    assert (counts.sum(axis=0) == MNIST_TRAIN_COUNTS).all()


def test_region_split_remainder_goes_to_the_owners_next_regions() -> None:
    # Three regions own classes [0, 1], [2], [3]; 102 examples per class, own_fraction 0.7:
    # owner round(71.4) = 71, the other 31 as 16 (next region) + 15 (the one after).
    labels = np.repeat(np.arange(4), 102)
    parts = region_split(labels, num_regions=3, own_fraction=0.7, seed=1)
    assert_disjoint_cover(parts, len(labels))
    counts = class_counts(labels, parts)
    assert counts.tolist() == [
        [71, 71, 15, 16],
        [16, 16, 71, 15],
        [15, 15, 16, 71],
    ]


def test_region_counts_round_half_up() -> None:
    assert region_counts(5, owner=0, num_regions=2, own_fraction=0.5).tolist() == [3, 2]
    assert region_counts(7, owner=1, num_regions=3, own_fraction=0.5).tolist() == [1, 4, 2]
    assert region_counts(0, owner=0, num_regions=2, own_fraction=0.8).tolist() == [0, 0]


def test_region_split_full_ownership_keeps_classes_apart() -> None:
    labels = mnist_like_labels()
    parts = region_split(labels, num_regions=2, own_fraction=1.0, seed=0)
    counts = class_counts(labels, parts)
    assert counts[0].tolist() == MNIST_TRAIN_COUNTS[:5] + [0] * 5
    assert counts[1].tolist() == [0] * 5 + MNIST_TRAIN_COUNTS[5:]


def test_single_region_with_full_ownership_gets_everything() -> None:
    labels = mnist_like_labels()[:1000]
    (only,) = region_split(labels, num_regions=1, own_fraction=1.0)
    assert np.array_equal(only, np.arange(1000))


def test_region_split_is_seeded() -> None:
    labels = mnist_like_labels()
    a = region_split(labels, seed=3)
    assert_same_parts(a, region_split(labels, seed=3))
    b = region_split(labels, seed=4)
    assert parts_differ(a, b)
    # A different seed changes which examples go where, never how many.
    assert np.array_equal(class_counts(labels, a), class_counts(labels, b))


def test_region_split_accepts_torch_labels_and_num_classes() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    parts = region_split(labels, num_regions=2, own_fraction=1.0, num_classes=6)
    # With 6 classes, region 0 owns 0-2 and region 1 owns 3-5.
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3, 4, 5], [6, 7]]


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.01, 2.0, float("nan")])
def test_region_split_rejects_fraction_outside_unit_interval(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"own_fraction must be in \(0, 1\]"):
        region_split(mnist_like_labels(), own_fraction=fraction)


def test_region_split_rejects_more_regions_than_classes() -> None:
    with pytest.raises(ValueError, match=r"num_regions=11 is larger than the number of classes"):
        region_split(mnist_like_labels(), num_regions=11)


def test_region_split_rejects_bad_region_counts() -> None:
    with pytest.raises(ValueError, match="num_regions must be >= 1"):
        region_split(mnist_like_labels(), num_regions=0)
    with pytest.raises(ValueError, match="one region cannot leave 20%"):
        region_split(mnist_like_labels(), num_regions=1, own_fraction=0.8)


def test_region_split_rejects_num_classes_below_labels() -> None:
    with pytest.raises(ValueError, match="num_classes=5 but the labels go up to 9"):
        region_split(mnist_like_labels(), num_classes=5)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.zeros((3, 2), dtype=np.int64), "labels must be 1-D"),
        (np.zeros(0, dtype=np.int64), "labels are empty"),
        (np.array([0.0, 1.0]), "labels must be integers"),
        (np.array([0, -1]), "labels must be non-negative"),
    ],
)
def test_partitioners_reject_bad_labels(labels: np.ndarray, message: str) -> None:
    for split in (
        lambda y: region_split(y),
        lambda y: dirichlet_split(y, 2, 0.5, min_size=0),
        lambda y: pathological_split(y, 2, 1),
    ):
        with pytest.raises(ValueError, match=message):
            split(labels)


# ------------------------------------------------------------------------------------------
# Dirichlet split


def test_dirichlet_split_is_disjoint_covering_and_seeded() -> None:
    labels = mnist_like_labels()
    a = dirichlet_split(labels, num_clients=5, alpha=0.5, seed=0)
    assert len(a) == 5
    assert_disjoint_cover(a, len(labels))
    assert_same_parts(a, dirichlet_split(labels, num_clients=5, alpha=0.5, seed=0))
    assert parts_differ(a, dirichlet_split(labels, num_clients=5, alpha=0.5, seed=1))


def test_dirichlet_alpha_controls_label_skew() -> None:
    labels = mnist_like_labels()

    def mean_top_class_share(alpha: float) -> float:
        counts = class_counts(labels, dirichlet_split(labels, 5, alpha, seed=0))
        return float(np.mean(counts.max(axis=1) / counts.sum(axis=1)))

    # IID would give each client about 1/10 of every class (top share ~0.11).
    assert mean_top_class_share(1000.0) < 0.13
    assert mean_top_class_share(0.05) > 0.5


def test_dirichlet_min_size_is_met() -> None:
    labels = mnist_like_labels()[:300]
    parts = dirichlet_split(labels, num_clients=10, alpha=1.0, seed=0, min_size=20)
    assert_disjoint_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 20


def test_dirichlet_single_client_gets_everything() -> None:
    labels = mnist_like_labels()[:500]
    (only,) = dirichlet_split(labels, num_clients=1, alpha=1.0)
    assert np.array_equal(only, np.arange(500))


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("inf"), float("nan")])
def test_dirichlet_rejects_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha must be a positive finite number"):
        dirichlet_split(mnist_like_labels(), num_clients=5, alpha=alpha)


def test_dirichlet_rejects_bad_client_counts() -> None:
    labels = np.arange(10) % 3
    with pytest.raises(ValueError, match="num_clients must be >= 1, got 0"):
        dirichlet_split(labels, num_clients=0, alpha=1.0)
    with pytest.raises(ValueError, match=r"more clients \(11\) than examples \(10\)"):
        dirichlet_split(labels, num_clients=11, alpha=1.0, min_size=0)
    with pytest.raises(ValueError, match="need 12 examples, but there are only 10"):
        dirichlet_split(labels, num_clients=4, alpha=1.0, min_size=3)
    with pytest.raises(ValueError, match="min_size must be >= 0"):
        dirichlet_split(labels, num_clients=2, alpha=1.0, min_size=-1)


def test_dirichlet_reports_unmet_min_size() -> None:
    # Two classes of 50, ten clients, alpha tiny: a class goes almost whole to one client,
    # so ten clients with 10 examples each (all 100) is (practically) never drawn.
    labels = np.repeat([0, 1], 50)
    with pytest.raises(ValueError, match="no Dirichlet\\(alpha=0.001\\) draw in 20 gave each"):
        dirichlet_split(labels, num_clients=10, alpha=0.001, min_size=10, max_draws=20)


# ------------------------------------------------------------------------------------------
# pathological split


def test_pathological_split_gives_each_client_k_classes_evenly() -> None:
    labels = mnist_like_labels()
    parts = pathological_split(labels, num_clients=5, classes_per_client=2, seed=0)
    assert_disjoint_cover(parts, len(labels))
    counts = class_counts(labels, parts)
    assert ((counts > 0).sum(axis=1) == 2).all()
    # 5 clients x 2 classes = 10 slots for 10 classes: each class sits with one client whole.
    assert sorted(counts.max(axis=0).tolist()) == sorted(MNIST_TRAIN_COUNTS)


def test_pathological_split_shares_classes_equally() -> None:
    labels = np.repeat(np.arange(10), 101)
    parts = pathological_split(labels, num_clients=7, classes_per_client=3, seed=2)
    assert_disjoint_cover(parts, len(labels))
    counts = class_counts(labels, parts)
    assert ((counts > 0).sum(axis=1) == 3).all()
    holders = (counts > 0).sum(axis=0)
    # 21 slots over 10 classes: every class is held by 2 or 3 clients.
    assert sorted(holders.tolist()) == [2] * 9 + [3]
    for c in range(10):
        shares = counts[:, c][counts[:, c] > 0]
        assert shares.sum() == 101
        assert shares.max() - shares.min() <= 1


def test_pathological_split_is_seeded() -> None:
    labels = mnist_like_labels()
    a = pathological_split(labels, 4, 3, seed=0)
    assert_same_parts(a, pathological_split(labels, 4, 3, seed=0))
    assert parts_differ(a, pathological_split(labels, 4, 3, seed=1))


@pytest.mark.parametrize("k", [0, 11, -1])
def test_pathological_rejects_classes_per_client_out_of_range(k: int) -> None:
    with pytest.raises(ValueError, match=r"classes_per_client must be between 1 and .*\(10\)"):
        pathological_split(mnist_like_labels(), num_clients=5, classes_per_client=k)


def test_pathological_rejects_bad_client_counts() -> None:
    labels = np.repeat(np.arange(4), 3)
    with pytest.raises(ValueError, match="num_clients must be >= 1"):
        pathological_split(labels, num_clients=0, classes_per_client=1)
    with pytest.raises(ValueError, match=r"more clients \(13\) than examples \(12\)"):
        pathological_split(labels, num_clients=13, classes_per_client=1)
    with pytest.raises(ValueError, match="cannot hold all 4 classes"):
        pathological_split(labels, num_clients=3, classes_per_client=1)
    with pytest.raises(ValueError, match="has 3 examples but 4 clients hold it"):
        pathological_split(labels, num_clients=8, classes_per_client=2)


def test_class_counts_shape() -> None:
    labels = np.array([0, 1, 1, 3])
    assert class_counts(labels, [np.array([0, 1]), np.array([2, 3])]).tolist() == [
        [1, 1, 0, 0],
        [0, 1, 0, 1],
    ]
