"""Apply permutations to state dicts, and check state dicts before they are merged."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from rebasin.spec import (
    PermutationSpec,
    SpecError,
    StateDict,
    join_pieces,
    keep_metadata,
    split_pieces,
)

Perms = dict[str, torch.Tensor]


def permute_axis(tensor: torch.Tensor, axis: int, perm: torch.Tensor) -> torch.Tensor:
    """Reorder ``tensor`` along ``axis`` so that new entry ``i`` is old entry ``perm[i]``.

    If the axis is ``b`` times longer than ``perm``, contiguous blocks of ``b`` entries move
    together (a channel permutation seen through ``flatten``).
    """
    n = perm.numel()
    length = tensor.shape[axis]
    perm = perm.to(tensor.device)
    if length != n:
        block = length // n
        perm = (perm[:, None] * block + torch.arange(block, device=tensor.device)).reshape(-1)
    return tensor.index_select(axis, perm)


def apply_permutation(
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
    except_perm: str | None = None,
) -> StateDict:
    """Return a copy of ``state_dict`` with every permutation of ``perms`` applied.

    Keys the spec does not name are copied unchanged, and so is the state dict's
    ``_metadata`` (module versions). ``except_perm`` leaves the axes of that one permutation
    as they are (the textbook matcher uses it).
    """
    missing = sorted(set(spec.perm_to_axes) - set(perms))
    if missing:
        raise SpecError(f"no permutation given for {missing}")
    if not spec.is_plain:
        return keep_metadata(_apply_structured(spec, perms, state_dict, except_perm), state_dict)
    out: StateDict = {}
    for key, tensor in state_dict.items():
        for axis, perm in enumerate(spec.axes_to_perm.get(key, ())):
            if perm is not None and perm != except_perm:
                tensor = permute_axis(tensor, axis, perms[perm])
        out[key] = tensor
    return keep_metadata(out, state_dict)


def lower_state_dicts(
    spec: PermutationSpec, *state_dicts: Mapping[str, torch.Tensor]
) -> tuple[PermutationSpec, list[StateDict]]:
    """The plain spec over pieces (:meth:`PermutationSpec.lower`) and each state dict cut into
    those pieces; a plain spec and the state dicts themselves when nothing is structured."""
    if spec.is_plain:
        return spec, [dict(sd) for sd in state_dicts]
    present = {k: v for k, v in spec.axes_to_perm.items() if k in state_dicts[0]}
    plain, pieces = PermutationSpec(present).lower(
        {k: tuple(t.shape) for k, t in state_dicts[0].items()}
    )
    return plain, [split_pieces(pieces, sd) for sd in state_dicts]


def _apply_structured(
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
    except_perm: str | None,
) -> StateDict:
    """Apply a spec with Concat/Grid axes: permute its pieces as plain axes, then rejoin."""
    present = {k: v for k, v in spec.axes_to_perm.items() if k in state_dict}
    plain, pieces = PermutationSpec(present).lower(
        {k: tuple(t.shape) for k, t in state_dict.items()}
    )
    permuted = apply_permutation(
        plain, perms, split_pieces(pieces, state_dict), except_perm=except_perm
    )
    return join_pieces(pieces, permuted, state_dict)


def identity_perms(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor]) -> Perms:
    """The identity permutation for every permutation of ``spec``, on the weights' device."""
    device = next(iter(state_dict.values())).device
    return {p: torch.arange(n, device=device) for p, n in spec.perm_sizes(state_dict).items()}


def random_perms(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor], seed: int) -> Perms:
    """A uniformly random permutation for every permutation of ``spec`` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        p: torch.randperm(n, generator=gen) for p, n in sorted(spec.perm_sizes(state_dict).items())
    }


def invert(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: ``invert(p)[p] == arange(n)``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite: one reduction instead of a mask.

    NaN and Inf propagate through the sum; only a sum that overflowed (huge finite values)
    needs the exact elementwise check. The sum stays in the tensor's dtype, which is the
    fastest reduction; overflow only costs the fallback.
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def validate_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    name: str = "state dict",
) -> None:
    """Raise ``ValueError`` naming the problem unless ``state_dict`` matches ``reference``.

    Checked: the same keys, and per key the same shape and dtype, and only finite values
    in floating-point tensors.
    """
    missing = sorted(set(reference) - set(state_dict))
    extra = sorted(set(state_dict) - set(reference))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if extra:
            parts.append(f"unexpected keys {extra}")
        raise ValueError(f"{name}: {'; '.join(parts)}")
    for key, ref in reference.items():
        tensor = state_dict[key]
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name}: {key!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.shape != ref.shape:
            raise ValueError(
                f"{name}: {key!r} has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}"
            )
        if tensor.dtype != ref.dtype:
            raise ValueError(f"{name}: {key!r} has dtype {tensor.dtype}, expected {ref.dtype}")
        if tensor.is_floating_point() and not is_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{name}: {key!r} has {bad} non-finite values (NaN or Inf)")


def model_norm(state_dict: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over every floating-point entry, accumulated in float64 (never overflows)."""
    squares = 0.0
    for tensor in state_dict.values():
        if tensor.is_floating_point():
            squares += float(torch.linalg.vector_norm(tensor.detach(), dtype=torch.float64)) ** 2
    return math.sqrt(squares)


def magnitude_problem(
    state_dict: Mapping[str, torch.Tensor],
    reference_norm: float,
    max_norm_ratio: float,
    reference: str = "the global model",
) -> str | None:
    """Why a finite model is too large to be matched or averaged, or ``None``.

    Two bounds, either one refuses it:

    * an entry whose square overflows the matching dtype (float32, float64 for float64
      models): similarity products of such weights are Inf;
    * a model norm above ``max_norm_ratio * max(reference_norm, 1)``: a model that large
      would dominate the average (a federated round's reply would poison the next round's
      global model); the floor of 1 keeps an all-zero reference from refusing everything.

    ``reference`` names what ``reference_norm`` is the norm of, for the message.
    """
    for key, tensor in state_dict.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        peak = float(tensor.detach().abs().max())
        if peak > math.sqrt(torch.finfo(dtype).max):
            return f"{key!r} holds a value of magnitude {peak:.3g}, whose square overflows {dtype}"
    norm = model_norm(state_dict)
    bound = max_norm_ratio * max(reference_norm, 1.0)
    if norm > bound:
        return (
            f"its norm {norm:.3g} is more than max_norm_ratio = {max_norm_ratio:g} times "
            f"{reference}'s norm {reference_norm:.3g} (at least 1 is used)"
        )
    return None
