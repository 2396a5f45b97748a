"""Permutation specs: which state-dict axes each hidden-unit permutation acts on.

A spec is the paper's pair of plain maps, in PyTorch layouts (Linear weight ``(out, in)``,
Conv weight ``(out, in, *kernel)``):

* ``axes_to_perm``: state-dict key -> one entry per axis, the permutation name acting on that
  axis or ``None``;
* ``perm_to_axes``: permutation name -> list of ``(key, axis)`` it acts on (derived).

An axis may be a whole multiple ``n * b`` of its permutation's size ``n``: the permutation
then moves contiguous blocks of ``b`` entries. This is how a Linear layer after
``flatten`` of a ``(C, H, W)`` feature map is described: its input axis has ``C * H * W``
entries and the channel permutation moves blocks of ``H * W``.

Example, an MLP ``784 -> 512 -> 10``::

    spec = PermutationSpec.from_axes({
        "0.weight": ("P0", None), "0.bias": ("P0",),
        "2.weight": (None, "P0"), "2.bias": (None,),
    })
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

# Buffers that follow their channel's permutation but are statistics, not weights: they are
# permuted by ``apply_permutation`` but do not enter the matching objective.
RUNNING_STAT_SUFFIXES: tuple[str, ...] = ("running_mean", "running_var")

StateDict = dict[str, torch.Tensor]


class SpecError(ValueError):
    """A permutation spec is inconsistent, or does not fit a model's state dict."""


@dataclass(frozen=True)
class PermutationSpec:
    """Which axes of which state-dict entries each permutation acts on.

    Parameters
    ----------
    axes_to_perm
        State-dict key -> tuple with one entry per axis of that tensor: the name of the
        permutation acting on the axis, or ``None``. Keys without any permutation (for example
        ``num_batches_tracked`` or the last layer's bias) may be listed with all-``None``
        entries; they are then checked but left unchanged.
    """

    axes_to_perm: Mapping[str, tuple[str | None, ...]]
    perm_to_axes: Mapping[str, tuple[tuple[str, int], ...]] = field(init=False)

    def __post_init__(self) -> None:
        perm_to_axes: dict[str, list[tuple[str, int]]] = {}
        for key, axes in self.axes_to_perm.items():
            if not isinstance(axes, tuple):
                raise SpecError(f"spec entry {key!r} must be a tuple, got {type(axes).__name__}")
            for axis, perm in enumerate(axes):
                if perm is not None:
                    perm_to_axes.setdefault(perm, []).append((key, axis))
        object.__setattr__(self, "axes_to_perm", dict(self.axes_to_perm))
        object.__setattr__(
            self, "perm_to_axes", {p: tuple(axes) for p, axes in perm_to_axes.items()}
        )

    @classmethod
    def from_axes(cls, axes_to_perm: Mapping[str, Sequence[str | None]]) -> PermutationSpec:
        """Build a spec from ``key -> per-axis permutation names`` (lists or tuples)."""
        return cls({key: tuple(axes) for key, axes in axes_to_perm.items()})

    @property
    def perm_names(self) -> list[str]:
        """Permutation names, sorted (the matcher's order before seeding)."""
        return sorted(self.perm_to_axes)

    def perm_sizes(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Size of every permutation, read off ``state_dict``.

        A permutation's size is the smallest axis it acts on; every other axis it acts on must
        be a whole multiple of it (blocks after a flatten).
        """
        sizes: dict[str, int] = {}
        for perm, axes in self.perm_to_axes.items():
            lengths = {(key, axis): state_dict[key].shape[axis] for key, axis in axes}
            size = min(lengths.values())
            for (key, axis), length in lengths.items():
                if size == 0 or length % size:
                    raise SpecError(
                        f"permutation {perm!r}: axis {axis} of {key!r} has {length} entries, "
                        f"not a multiple of the permutation's size {size}"
                    )
            sizes[perm] = size
        return sizes

    def canonical(self) -> frozenset[frozenset[tuple[str, int]]]:
        """The spec without its names: the set of axis groups that move together.

        Two specs describe the same symmetry exactly when their canonical forms are equal.
        """
        return frozenset(frozenset(axes) for axes in self.perm_to_axes.values())

    def check(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Raise :class:`SpecError` unless the spec fits ``state_dict`` exactly.

        Every state-dict key must be covered, no spec key may be missing from the state dict,
        and every entry must list one permutation (or ``None``) per axis.
        """
        missing = sorted(set(self.axes_to_perm) - set(state_dict))
        if missing:
            raise SpecError(f"spec names keys the state dict lacks: {missing}")
        uncovered = sorted(set(state_dict) - set(self.axes_to_perm))
        if uncovered:
            raise SpecError(
                f"spec does not cover these state-dict keys: {uncovered}; list them with "
                "None axes if no permutation acts on them"
            )
        for key, axes in self.axes_to_perm.items():
            ndim = state_dict[key].dim()
            if len(axes) != ndim:
                raise SpecError(
                    f"spec entry {key!r} lists {len(axes)} axes but the tensor has {ndim} "
                    f"(shape {tuple(state_dict[key].shape)})"
                )
        self.perm_sizes(state_dict)


def is_running_stat(key: str) -> bool:
    """Whether ``key`` is a normalisation running statistic (permuted, never matched)."""
    return key.rsplit(".", 1)[-1] in RUNNING_STAT_SUFFIXES


# --- Builders for hand-written specs: each returns a partial ``axes_to_perm`` dict. ---


def linear(name: str, p_in: str | None, p_out: str | None, bias: bool = True) -> dict:
    """A Linear layer ``name`` with weight ``(out, in)``."""
    return _layer(name, p_in, p_out, bias, ndim=2)


def conv(name: str, p_in: str | None, p_out: str | None, bias: bool = True, ndim: int = 4) -> dict:
    """A Conv layer with weight ``(out, in, *kernel)``; ``ndim`` 3 for Conv1d, 4 for Conv2d."""
    return _layer(name, p_in, p_out, bias, ndim=ndim)


def _layer(name: str, p_in: str | None, p_out: str | None, bias: bool, ndim: int) -> dict:
    axes: dict[str, tuple[str | None, ...]] = {
        f"{name}.weight": (p_out, p_in) + (None,) * (ndim - 2)
    }
    if bias:
        axes[f"{name}.bias"] = (p_out,)
    return axes


def norm(name: str, p: str | None, running_stats: bool = False, affine: bool = True) -> dict:
    """A per-channel normalisation layer: BatchNorm (``running_stats=True``), LayerNorm over
    the permuted last dimension, or GroupNorm with one group."""
    axes: dict[str, tuple[str | None, ...]] = {}
    if affine:
        axes |= {f"{name}.weight": (p,), f"{name}.bias": (p,)}
    if running_stats:
        axes |= {
            f"{name}.running_mean": (p,),
            f"{name}.running_var": (p,),
            f"{name}.num_batches_tracked": (),
        }
    return axes
