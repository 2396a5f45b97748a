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

Axes that one name cannot describe are written with two small types, which nest once:

* :class:`Concat`: an axis made of consecutive blocks, each with its own permutation (or
  ``None``): the channels after ``torch.cat``, or the packed ``q, k, v`` rows of
  ``nn.MultiheadAttention.in_proj_weight``;
* :class:`Grid`: an axis read as a grid, outer factor first, each factor with its own
  permutation: attention heads ``Grid(("H", "D"), (heads, head_dim))``, where ``H`` moves
  whole heads and ``D`` the dimensions inside every head alike.

A depthwise convolution needs neither: its weight ``(C, 1, k, k)`` carries the one
permutation of its input and output channels on axis 0.

Example, an MLP ``784 -> 512 -> 10``::

    spec = PermutationSpec.from_axes({
        "0.weight": ("P0", None), "0.bias": ("P0",),
        "2.weight": (None, "P0"), "2.bias": (None,),
    })
"""

from __future__ import annotations

import copy
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

# Buffers that follow their channel's permutation but are statistics, not weights: they are
# permuted by ``apply_permutation`` but do not enter the matching objective.
RUNNING_STAT_SUFFIXES: tuple[str, ...] = ("running_mean", "running_var")

StateDict = dict[str, torch.Tensor]


class SpecError(ValueError):
    """A permutation spec is inconsistent, or does not fit a model's state dict."""


@dataclass(frozen=True)
class Grid:
    """An axis read as a grid ``sizes[0] x sizes[1] x ...`` (outer first, row-major), each
    factor permuted by its own permutation or by none.

    ``Grid(("H", "D"), (4, 16))`` on an axis of 64 entries: entry ``16 * h + d`` of the
    permuted axis is entry ``16 * H[h] + D[d]`` of the original.
    """

    perms: tuple[str | None, ...]
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.perms) != len(self.sizes) or not self.sizes:
            raise SpecError(f"Grid needs one size per factor, got {self.perms} and {self.sizes}")
        if any(not isinstance(s, int) or s < 1 for s in self.sizes):
            raise SpecError(f"Grid sizes must be positive integers, got {self.sizes}")
        _check_names(self.perms)

    @property
    def length(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class Concat:
    """An axis made of consecutive blocks: ``((what permutes the block, its length), ...)``.

    What permutes a block is a permutation name (which may move sub-blocks, as on a plain
    axis), a :class:`Grid` or ``None``.
    """

    blocks: tuple[tuple[str | Grid | None, int], ...]

    def __post_init__(self) -> None:
        if not self.blocks:
            raise SpecError("Concat needs at least one block")
        for block in self.blocks:
            if not (isinstance(block, tuple) and len(block) == 2):
                raise SpecError(f"Concat blocks are (permutation, length) pairs, got {block!r}")
            perm, length = block
            if not isinstance(length, int) or length < 1:
                raise SpecError(f"Concat block length must be a positive integer, got {length!r}")
            if isinstance(perm, Grid):
                if perm.length != length:
                    raise SpecError(f"Grid of {perm.length} entries in a block of {length}")
            else:
                _check_names((perm,))

    @property
    def length(self) -> int:
        return sum(length for _, length in self.blocks)


# What acts on one axis: a permutation name, a structured axis, or nothing.
AxisPerm = str | Grid | Concat | None


def _check_names(perms: Sequence[object]) -> None:
    for perm in perms:
        if perm is not None and not isinstance(perm, str):
            raise SpecError(f"a permutation is named by a str or None, got {perm!r}")


def axis_perm_names(entry: AxisPerm) -> list[str]:
    """The permutation names acting on one axis, in order of appearance."""
    if entry is None:
        return []
    if isinstance(entry, str):
        return [entry]
    if isinstance(entry, Grid):
        return [p for p in entry.perms if p is not None]
    return [p for block, _ in entry.blocks for p in axis_perm_names(block)]


@dataclass(frozen=True)
class PermutationSpec:
    """Which axes of which state-dict entries each permutation acts on.

    Parameters
    ----------
    axes_to_perm
        State-dict key -> tuple with one entry per axis of that tensor: the name of the
        permutation acting on the axis, a :class:`Concat` or :class:`Grid` for an axis made of
        parts, or ``None``. Keys without any permutation (for example ``num_batches_tracked``
        or the last layer's bias) may be listed with all-``None`` entries; they are then
        checked but left unchanged.
    """

    axes_to_perm: Mapping[str, tuple[AxisPerm, ...]]
    perm_to_axes: Mapping[str, tuple[tuple[str, int], ...]] = field(init=False)

    def __post_init__(self) -> None:
        perm_to_axes: dict[str, list[tuple[str, int]]] = {}
        for key, axes in self.axes_to_perm.items():
            if not isinstance(axes, tuple):
                raise SpecError(f"spec entry {key!r} must be a tuple, got {type(axes).__name__}")
            for axis, entry in enumerate(axes):
                if not isinstance(entry, (str, Grid, Concat, type(None))):
                    raise SpecError(
                        f"spec entry {key!r}, axis {axis}: expected a permutation name, Grid, "
                        f"Concat or None, got {entry!r}"
                    )
                for perm in dict.fromkeys(axis_perm_names(entry)):
                    perm_to_axes.setdefault(perm, []).append((key, axis))
        object.__setattr__(self, "axes_to_perm", dict(self.axes_to_perm))
        object.__setattr__(
            self, "perm_to_axes", {p: tuple(axes) for p, axes in perm_to_axes.items()}
        )

    @classmethod
    def from_axes(cls, axes_to_perm: Mapping[str, Sequence[AxisPerm]]) -> PermutationSpec:
        """Build a spec from ``key -> per-axis permutation names`` (lists or tuples)."""
        return cls({key: tuple(axes) for key, axes in axes_to_perm.items()})

    @property
    def perm_names(self) -> list[str]:
        """Permutation names, sorted (the matcher's order before seeding)."""
        return sorted(self.perm_to_axes)

    @property
    def is_plain(self) -> bool:
        """Whether every axis carries one name or ``None`` (the paper's plain maps)."""
        return not any(
            isinstance(entry, (Grid, Concat))
            for axes in self.axes_to_perm.values()
            for entry in axes
        )

    def perm_sizes(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Size of every permutation, read off ``state_dict``.

        A permutation's size is the smallest axis (or block, or grid factor) it acts on; every
        other plain axis or block it acts on must be a whole multiple of it (blocks after a
        flatten), and every grid factor exactly that size.
        """
        shapes = {key: tuple(t.shape) for key, t in state_dict.items()}
        if not self.is_plain:
            plain, pieces = self.lower(shapes)
            shapes = {name: shapes[name] for name in plain.axes_to_perm if name in shapes}
            shapes |= {name: piece.shape for name, piece in pieces.items()}
            return plain._sizes(shapes)
        return self._sizes(shapes)

    def _sizes(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for perm, axes in self.perm_to_axes.items():
            lengths = {(key, axis): shapes[key][axis] for key, axis in axes}
            size = min(lengths.values())
            for (key, axis), length in lengths.items():
                if size == 0 or length % size:
                    where = key.split(PIECE_MARK, 1)[0]
                    raise SpecError(
                        f"permutation {perm!r}: axis {axis} of {where!r} has {length} entries, "
                        f"not a multiple of the permutation's size {size}"
                    )
            sizes[perm] = size
        return sizes

    def canonical(self) -> frozenset[frozenset[tuple]]:
        """The spec without its names: the set of axis groups that move together.

        Two specs describe the same symmetry exactly when their canonical forms are equal.
        A plain axis is ``(key, axis)``; a part of a structured one adds where the part starts,
        its length, and (for a grid) the grid's sizes and the factor.
        """
        places: dict[str, set[tuple]] = {}
        for key, axes in self.axes_to_perm.items():
            for axis, entry in enumerate(axes):
                for perm, where in _places(entry):
                    places.setdefault(perm, set()).add((key, axis, *where))
        return frozenset(frozenset(group) for group in places.values())

    def restrict(self, keep: Callable[[str], bool]) -> PermutationSpec:
        """The same spec with only the permutations ``keep`` accepts; the others become the
        identity (``None``), which is always a valid, smaller symmetry."""
        return PermutationSpec(
            {
                key: tuple(_restrict_entry(entry, keep) for entry in axes)
                for key, axes in self.axes_to_perm.items()
            }
        )

    def lower(
        self, shapes: Mapping[str, Sequence[int]]
    ) -> tuple[PermutationSpec, dict[str, Piece]]:
        """The spec as plain maps over *pieces*: entries with a structured axis are cut into
        the blocks of their :class:`Concat` axes and their grids unfolded into axes of their
        own, so that one name (or ``None``) acts on every axis of every piece.

        Returns the plain spec (other keys as they are, pieces under ``key@i,j,..``) and the
        pieces by name. For a plain spec this is the spec itself and no pieces.
        """
        if self.is_plain:
            return self, {}
        axes_out: dict[str, tuple[str | None, ...]] = {}
        pieces: dict[str, Piece] = {}
        for key, axes in self.axes_to_perm.items():
            if not any(isinstance(entry, (Grid, Concat)) for entry in axes):
                axes_out[key] = axes  # type: ignore[assignment]
                continue
            shape = tuple(shapes[key])
            if len(shape) != len(axes):
                raise SpecError(
                    f"spec entry {key!r} lists {len(axes)} axes but the tensor has {len(shape)} "
                    f"(shape {shape})"
                )
            parts = [_segments(key, axis, entry, shape[axis]) for axis, entry in enumerate(axes)]
            for combo in itertools.product(*(enumerate(p) for p in parts)):
                name = f"{key}{PIECE_MARK}{','.join(str(i) for i, _ in combo)}"
                index = tuple(slice(start, start + length) for _, (start, length, _) in combo)
                dims = [dim for _, (_, _, seg_dims) in combo for dim in seg_dims]
                pieces[name] = Piece(key, index, tuple(size for _, size in dims))
                axes_out[name] = tuple(perm for perm, _ in dims)
        return PermutationSpec(axes_out), pieces

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


# Separates a state-dict key from the index of one of its pieces (see PermutationSpec.lower).
PIECE_MARK = "@"


@dataclass(frozen=True)
class Piece:
    """A block of a state-dict entry: ``tensor[index].reshape(shape)``."""

    key: str
    index: tuple[slice, ...]
    shape: tuple[int, ...]


def _segments(
    key: str, axis: int, entry: AxisPerm, length: int
) -> list[tuple[int, int, list[tuple[str | None, int]]]]:
    """One axis as ``(start, length, [(permutation, size) per unfolded dim])`` blocks."""
    blocks = entry.blocks if isinstance(entry, Concat) else ((entry, length),)
    total = sum(n for _, n in blocks)
    if total != length:
        raise SpecError(
            f"spec entry {key!r}, axis {axis}: the blocks cover {total} entries but the axis has "
            f"{length}"
        )
    out, start = [], 0
    for perm, n in blocks:
        if isinstance(perm, Grid):
            if perm.length != n:
                raise SpecError(
                    f"spec entry {key!r}, axis {axis}: a grid of {perm.sizes} "
                    f"({perm.length} entries) on {n} entries"
                )
            dims = list(zip(perm.perms, perm.sizes))
        else:
            dims = [(perm, n)]
        out.append((start, n, dims))
        start += n
    return out


def _places(entry: AxisPerm) -> list[tuple[str, tuple]]:
    """``(permutation, where on the axis)`` for one axis entry (see ``canonical``)."""
    if entry is None:
        return []
    if isinstance(entry, str):
        return [(entry, ())]
    blocks = entry.blocks if isinstance(entry, Concat) else ((entry, entry.length),)
    out, start = [], 0
    for perm, n in blocks:
        if isinstance(perm, Grid):
            out += [(p, (start, n, perm.sizes, i)) for i, p in enumerate(perm.perms) if p]
        elif perm is not None:
            out.append((perm, (start, n)))
        start += n
    return out


def _restrict_entry(entry: AxisPerm, keep: Callable[[str], bool]) -> AxisPerm:
    if entry is None or isinstance(entry, str):
        return entry if entry is not None and keep(entry) else None
    if isinstance(entry, Grid):
        perms = tuple(p if p is not None and keep(p) else None for p in entry.perms)
        return None if all(p is None for p in perms) else Grid(perms, entry.sizes)
    blocks = tuple((_restrict_entry(perm, keep), n) for perm, n in entry.blocks)
    return None if all(perm is None for perm, _ in blocks) else Concat(blocks)


def split_pieces(pieces: Mapping[str, Piece], state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """``state_dict`` with every structured entry replaced by its pieces (views or copies)."""
    cut = {piece.key for piece in pieces.values()}
    out: StateDict = {k: t for k, t in state_dict.items() if k not in cut}
    for name, piece in pieces.items():
        out[name] = state_dict[piece.key][piece.index].reshape(piece.shape)
    return out


def join_pieces(
    pieces: Mapping[str, Piece],
    state_dict: Mapping[str, torch.Tensor],
    original: Mapping[str, torch.Tensor],
) -> StateDict:
    """Inverse of :func:`split_pieces`: reassemble the entries of ``original`` (for keys and
    order) from the pieces in ``state_dict``."""
    joined: StateDict = {}
    for name, piece in pieces.items():
        if piece.key not in joined:
            joined[piece.key] = torch.empty_like(original[piece.key])
        target = joined[piece.key][piece.index]
        target.copy_(state_dict[name].reshape(target.shape))
    return {k: joined[k] if k in joined else state_dict[k] for k in original}


def keep_metadata(out: StateDict, source: Mapping[str, torch.Tensor]) -> StateDict:
    """``out`` with ``source``'s ``_metadata``, if it has one.

    ``nn.Module.state_dict()`` records each module's version in ``_metadata``, and
    ``load_state_dict`` hands it to ``_load_from_state_dict``; a module with a versioned
    loader (torchvision's MNASNet) refuses a state dict without it.
    """
    metadata = getattr(source, "_metadata", None)
    if metadata is None:
        return out
    kept = OrderedDict(out)
    kept._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
    return kept


def is_running_stat(key: str) -> bool:
    """Whether ``key`` is a normalisation running statistic (permuted, never matched)."""
    return key.split(PIECE_MARK, 1)[0].rsplit(".", 1)[-1] in RUNNING_STAT_SUFFIXES


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


def attention(
    name: str,
    p_in: str | None,
    p_out: str | None,
    *,
    embed_dim: int,
    num_heads: int,
    heads: str | None = None,
    qk: str | None = None,
    vo: str | None = None,
    bias: bool = True,
) -> dict:
    """An ``nn.MultiheadAttention`` (packed ``in_proj``, ``kdim == vdim == embed_dim``).

    ``p_in`` acts on the input (residual stream) and ``p_out`` on ``out_proj``'s output.
    ``heads`` moves whole heads (the same in ``q``, ``k``, ``v`` and ``out_proj``'s input);
    ``qk`` the query/key dimensions inside every head, ``vo`` the value dimensions inside every
    head (which are ``out_proj``'s input dimensions).
    """
    head_dim = embed_dim // num_heads
    if head_dim * num_heads != embed_dim:
        raise SpecError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
    q_k = Grid((heads, qk), (num_heads, head_dim))
    v_o = Grid((heads, vo), (num_heads, head_dim))
    packed = Concat(((q_k, embed_dim), (q_k, embed_dim), (v_o, embed_dim)))
    axes: dict[str, tuple[AxisPerm, ...]] = {
        f"{name}.in_proj_weight": (packed, p_in),
        f"{name}.out_proj.weight": (p_out, v_o),
    }
    if bias:
        axes[f"{name}.in_proj_bias"] = (packed,)
        axes[f"{name}.out_proj.bias"] = (p_out,)
    return axes
