"""Split a labelled dataset among regions or clients: region, Dirichlet and pathological splits.

Every partitioner takes the labels (any 1-D integer array) and returns one sorted ``np.ndarray``
of example indices per part. The parts are disjoint, together cover every example, and are a
pure function of the arguments (``seed`` included).

The flwr-datasets partitioners were considered and not used: flwr-datasets does not import
Flower, but it works on Hugging Face ``datasets`` objects and so pulls in ``datasets``, pyarrow
and pandas (about 220 MB installed) to split an integer array; these few lines are cheaper.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

LabelsLike = Sequence[int] | np.ndarray | torch.Tensor


def region_names(num_regions: int) -> list[str]:
    """Display names of the regions: ``["us", "eu"]`` for two, else ``["region-0", ...]``."""
    if num_regions < 1:
        raise ValueError(f"num_regions must be >= 1, got {num_regions}")
    if num_regions == 2:
        return ["us", "eu"]
    return [f"region-{i}" for i in range(num_regions)]


def region_classes(num_classes: int, num_regions: int) -> list[list[int]]:
    """The contiguous class groups the regions own, as even as possible (larger groups first).

    For 10 classes and 2 regions: ``[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]``; for 3 regions:
    ``[[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]``.
    """
    if num_regions < 1:
        raise ValueError(f"num_regions must be >= 1, got {num_regions}")
    if num_regions > num_classes:
        raise ValueError(
            f"num_regions={num_regions} is larger than the number of classes ({num_classes}); "
            "every region must own at least one class"
        )
    return [group.tolist() for group in np.array_split(np.arange(num_classes), num_regions)]


def region_split(
    labels: LabelsLike,
    num_regions: int = 2,
    own_fraction: float = 0.8,
    seed: int = 0,
    *,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """Biased regional split: each region holds most of its own classes and a little of the rest.

    Region ``r`` owns the classes ``region_classes(num_classes, num_regions)[r]``. Of the
    ``n_c`` examples of class ``c``, its owner gets ``round(own_fraction * n_c)`` (halves round
    up); the remaining ``m`` are shared by the other ``K - 1`` regions, ``m // (K - 1)`` each,
    and the first ``m % (K - 1)`` of them (counting from the owner's next region, cyclically)
    get one more. Which examples go where is drawn with ``seed``.

    For MNIST and ``K=2`` this is the 80/20 split of the digits 0-4 ("us") and 5-9 ("eu").

    Parameters
    ----------
    labels
        Integer class labels, shape ``(N,)``.
    num_regions
        ``K``; at least 1 and at most the number of classes. One region needs
        ``own_fraction=1`` (there is nobody to take the rest).
    own_fraction
        Share of its own classes a region keeps, in ``(0, 1]``.
    seed
        Seed of the random assignment.
    num_classes
        Number of classes; defaults to ``max(labels) + 1``.

    Returns
    -------
    list of np.ndarray
        ``K`` sorted int64 index arrays.
    """
    y = _as_labels(labels)
    if not 0.0 < own_fraction <= 1.0:
        raise ValueError(f"own_fraction must be in (0, 1], got {own_fraction}")
    classes_total = _num_classes(y, num_classes)
    groups = region_classes(classes_total, num_regions)
    if num_regions == 1 and own_fraction != 1.0:
        raise ValueError(
            f"one region cannot leave {1 - own_fraction:.0%} of its classes to other regions; "
            "use own_fraction=1.0 or num_regions >= 2"
        )
    owner = np.empty(classes_total, dtype=np.int64)
    for region, group in enumerate(groups):
        owner[group] = region
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_regions)]
    for c in range(classes_total):
        members = rng.permutation(np.flatnonzero(y == c))
        counts = region_counts(len(members), int(owner[c]), num_regions, own_fraction)
        for region, chunk in enumerate(np.split(members, np.cumsum(counts)[:-1])):
            parts[region].append(chunk)
    return [_sorted_concat(chunks) for chunks in parts]


def region_counts(n: int, owner: int, num_regions: int, own_fraction: float) -> np.ndarray:
    """How many of ``n`` examples of a class owned by region ``owner`` each region gets.

    The rule of :func:`region_split`: ``round(own_fraction * n)`` (halves up) to the owner,
    the rest evenly to the others, the remainder one each from the owner's next region on.
    """
    own = min(n, int(np.floor(own_fraction * n + 0.5)))
    counts = np.zeros(num_regions, dtype=np.int64)
    counts[owner] = own
    others = [(owner + k) % num_regions for k in range(1, num_regions)]
    if others:
        share, extra = divmod(n - own, len(others))
        for k, region in enumerate(others):
            counts[region] = share + (1 if k < extra else 0)
    return counts


def dirichlet_split(
    labels: LabelsLike,
    num_clients: int,
    alpha: float,
    seed: int = 0,
    *,
    min_size: int = 10,
    max_draws: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided among clients by Dirichlet(alpha) proportions.

    For every class ``c`` with ``n_c`` examples, proportions ``q ~ Dir(alpha * 1_K)`` are drawn
    and the shuffled examples are cut at ``round(cumsum(q) * n_c)``. Small ``alpha`` gives each
    client few classes, large ``alpha`` approaches an IID split. The whole draw is repeated
    (from the same seeded generator) until every client has at least ``min_size`` examples.

    Raises
    ------
    ValueError
        If ``num_clients < 1``, ``alpha <= 0``, ``min_size < 0``, there are more clients than
        examples, ``num_clients * min_size`` exceeds the number of examples, or no draw in
        ``max_draws`` met ``min_size``.
    """
    y = _as_labels(labels)
    _check_num_clients(num_clients, len(y))
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if num_clients * min_size > len(y):
        raise ValueError(
            f"{num_clients} clients with at least min_size={min_size} examples each need "
            f"{num_clients * min_size} examples, but there are only {len(y)}"
        )
    if max_draws < 1:
        raise ValueError(f"max_draws must be >= 1, got {max_draws}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    class_sizes = np.array([np.count_nonzero(y == c) for c in classes])
    for _ in range(max_draws):
        # Only the counts are drawn per attempt; examples are assigned once a draw is accepted.
        proportions = rng.dirichlet(np.full(num_clients, float(alpha)), size=len(classes))
        cuts = np.rint(np.cumsum(proportions, axis=1) * class_sizes[:, None]).astype(np.int64)
        cuts[:, -1] = class_sizes  # the float cumsum may end a hair below 1
        counts = np.diff(cuts, axis=1, prepend=0)
        if counts.sum(axis=0).min() >= min_size:
            break
    else:
        raise ValueError(
            f"no Dirichlet(alpha={alpha}) draw in {max_draws} gave each of the {num_clients} "
            f"clients at least min_size={min_size} examples; lower min_size or raise alpha"
        )
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, class_counts in zip(classes, counts, strict=True):
        members = rng.permutation(np.flatnonzero(y == c))
        for client, chunk in enumerate(np.split(members, np.cumsum(class_counts)[:-1])):
            parts[client].append(chunk)
    return [_sorted_concat(chunks) for chunks in parts]


def pathological_split(
    labels: LabelsLike, num_clients: int, classes_per_client: int, seed: int = 0
) -> list[np.ndarray]:
    """Each client holds examples of exactly ``classes_per_client`` classes.

    The classes present are put in a seeded random order ``o``; client ``i`` holds the classes
    ``o[(i * k + j) mod C]`` for ``j < k`` (``k = classes_per_client``, ``C`` classes). Every
    class is so held by ``floor`` or ``ceil`` of ``num_clients * k / C`` clients, and its
    shuffled examples are divided among them in sizes that differ by at most one.

    Raises
    ------
    ValueError
        If ``num_clients < 1``, there are more clients than examples, ``classes_per_client``
        is outside ``[1, C]``, ``num_clients * classes_per_client < C`` (some class would be
        left out, so the parts could not cover the data), or a class has fewer examples than
        clients holding it.
    """
    y = _as_labels(labels)
    _check_num_clients(num_clients, len(y))
    classes = np.unique(y)
    if not 1 <= classes_per_client <= len(classes):
        raise ValueError(
            f"classes_per_client must be between 1 and the number of classes ({len(classes)}), "
            f"got {classes_per_client}"
        )
    if num_clients * classes_per_client < len(classes):
        raise ValueError(
            f"{num_clients} clients with {classes_per_client} classes each cannot hold all "
            f"{len(classes)} classes; the split would not cover the data"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        for j in range(classes_per_client):
            holders[int(order[(client * classes_per_client + j) % len(classes)])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in classes:
        members = rng.permutation(np.flatnonzero(y == c))
        clients = holders[int(c)]
        if len(members) < len(clients):
            raise ValueError(
                f"class {int(c)} has {len(members)} examples but {len(clients)} clients hold it; "
                "use fewer clients or fewer classes per client"
            )
        for client, chunk in zip(clients, np.array_split(members, len(clients)), strict=True):
            parts[client].append(chunk)
    return [_sorted_concat(chunks) for chunks in parts]


def class_counts(
    labels: LabelsLike, parts: Sequence[np.ndarray], num_classes: int | None = None
) -> np.ndarray:
    """Examples of each class in each part, shape ``(len(parts), num_classes)``."""
    y = _as_labels(labels)
    total = _num_classes(y, num_classes)
    if not parts:
        return np.zeros((0, total), dtype=np.int64)
    return np.stack([np.bincount(y[p], minlength=total) for p in parts])


def _as_labels(labels: LabelsLike) -> np.ndarray:
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if len(y) == 0:
        raise ValueError("labels are empty; there is nothing to split")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.min() < 0:
        raise ValueError(f"labels must be non-negative, got {int(y.min())}")
    return y.astype(np.int64, copy=False)


def _num_classes(y: np.ndarray, num_classes: int | None) -> int:
    observed = int(y.max()) + 1
    if num_classes is None:
        return observed
    if num_classes < observed:
        raise ValueError(f"num_classes={num_classes} but the labels go up to {observed - 1}")
    return num_classes


def _check_num_clients(num_clients: int, num_examples: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > num_examples:
        raise ValueError(
            f"more clients ({num_clients}) than examples ({num_examples}); every client needs "
            "at least one example"
        )


def _sorted_concat(chunks: list[np.ndarray]) -> np.ndarray:
    if not chunks:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chunks)).astype(np.int64, copy=False)
