"""Weight matching (Git Re-Basin, Ainsworth et al. 2023, section 3.2, Algorithm 1).

Find permutations ``pi`` of model B's hidden units that maximise
``sum_w <A_w, pi(B_w)>`` over every weight touched by a permutation, by coordinate
descent: for one permutation ``P`` at a time, with all others fixed, the objective is linear
in ``P`` and its maximiser is a linear assignment problem on

    S_P = sum over (w, axis) touched by P of  A_w[axis -> rows] @ pi_not_P(B_w)[axis -> rows]^T

Permutations are visited in a seeded random order; the descent stops after a sweep that did
not raise the objective, or after ``max_iter`` sweeps.

The engine computes each weight's n x n contribution to ``S_P`` once and reuses it until a
permutation on one of that weight's *other* axes changes, so late sweeps (where few
permutations move) cost little; only the n x n assignment runs on the CPU.
``reference_weight_matching`` is the textbook loop that rebuilds every permuted weight at every
step: same seed, same order, same arithmetic, hence the same result; it is kept as the
baseline for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from rebasin.permute import (
    Perms,
    apply_permutation,
    identity_perms,
    lower_state_dicts,
    permute_axis,
    validate_state_dict,
)
from rebasin.spec import PermutationSpec, SpecError, is_running_stat

# A step counts as progress only if it raises the objective by more than this (relative to
# its size), so that ties and round-off never make the descent cycle.
_REL_TOL = 1e-12


class MatchingError(ValueError):
    """Weight matching cannot run on these models, for example because a similarity matrix
    or the objective is not finite (weights so large that their products overflow).

    ``model`` is the index of the failing model when several were being matched
    (:func:`rebasin.merge.align_many`), else ``None``.
    """

    def __init__(self, message: str, model: int | None = None) -> None:
        super().__init__(message)
        self.model = model


@dataclass
class MatchResult:
    """Outcome of :func:`weight_matching`.

    Attributes
    ----------
    perms
        Permutation name -> LongTensor ``p`` (on the CPU): unit ``i`` of the aligned B is
        unit ``p[i]`` of B. Apply with :func:`rebasin.permute.apply_permutation`.
    objective
        ``sum_w <A_w, pi(B_w)>`` before the first sweep, then after each sweep.
    sweeps
        Sweeps performed (the last one raised nothing, unless ``max_iter`` was reached).
    products
        Similarity products computed (one per weight and permuted axis whose term had to be
        made): the bulk of the arithmetic, and what the engine saves over the textbook loop.
    solves
        Linear assignment problems solved.
    """

    perms: Perms
    objective: list[float] = field(default_factory=list)
    sweeps: int = 0
    products: int = 0
    solves: int = 0


def weight_matching(
    spec: PermutationSpec,
    reference: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    *,
    seed: int = 0,
    init: Mapping[str, torch.Tensor] | None = None,
    max_iter: int = 100,
    device: torch.device | str | None = None,
    check: bool = True,
) -> MatchResult:
    """Permute ``other``'s hidden units to match ``reference`` (Algorithm 1).

    Parameters
    ----------
    spec
        The models' permutation spec; it must cover ``reference`` exactly.
    reference, other
        State dicts of the same architecture (same keys, shapes and dtypes, finite values).
    seed
        Seeds the order in which permutations are visited; equal seeds give equal results.
    init
        Warm start (for example the permutations found for this client last round);
        identity when ``None``.
    max_iter
        Most sweeps over all permutations.
    device
        Where the similarity matrices are computed; by default the reference's device
        (CUDA when the weights live there).
    check
        Check that the spec fits and both models match it with finite values; ``False``
        for callers that checked their inputs once already (:mod:`rebasin.align`).

    Returns
    -------
    MatchResult
        The permutations and the objective per sweep.

    Raises
    ------
    MatchingError
        If the objective or a similarity matrix is not finite.
    """
    ctx = _MatchContext(spec, reference, other, init, max_iter, device, check)
    return ctx.descend(seed, _CachedSimilarity(ctx))


def matching_objective(
    spec: PermutationSpec,
    reference: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    perms: Mapping[str, torch.Tensor] | None = None,
    *,
    device: torch.device | str | None = None,
    check: bool = True,
) -> float:
    """``sum_w <A_w, pi(B_w)>`` as weight matching computes it (identity if ``perms`` is
    ``None``): the one definition of the objective, for callers that compare starts."""
    ctx = _MatchContext(spec, reference, other, perms, 1, device, check)
    return ctx.objective(ctx.perms)


def reference_weight_matching(
    spec: PermutationSpec,
    reference: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    *,
    seed: int = 0,
    init: Mapping[str, torch.Tensor] | None = None,
    max_iter: int = 100,
    device: torch.device | str | None = None,
    check: bool = True,
) -> MatchResult:
    """The textbook matcher: rebuild every permuted weight at every step (baseline only)."""
    ctx = _MatchContext(spec, reference, other, init, max_iter, device, check)
    return ctx.descend(seed, _RebuiltSimilarity(ctx))


class _CachedSimilarity:
    """Similarity terms kept until a permutation they depend on changes.

    The term of weight ``w`` on axis ``a`` depends only on the permutations of ``w``'s other
    axes; ``S_P`` as a whole depends only on the permutations that share a weight with ``P``.
    If none of those changed since ``P`` was last solved, solving again cannot improve it.
    """

    def __init__(self, ctx: _MatchContext) -> None:
        self.ctx = ctx
        self.versions = dict.fromkeys(ctx.names, 0)
        self.terms: dict[tuple[str, int], tuple[tuple[int, ...], torch.Tensor]] = {}
        self.solved_at: dict[str, tuple[int, ...]] = {}
        self.products = 0
        self.neighbours = {
            p: sorted(
                {
                    q
                    for k, ax in ctx.spec.perm_to_axes[p]
                    if (k, ax) in ctx.a_rows
                    for q in ctx.other_perms[(k, ax)]
                }
                - {p}
            )
            for p in ctx.names
        }

    def unchanged(self, perm: str) -> bool:
        state = tuple(self.versions[q] for q in self.neighbours[perm])
        if self.solved_at.get(perm) == state:
            return True
        self.solved_at[perm] = state
        return False

    def term(self, key: str, axis: int, perms: Perms) -> torch.Tensor:
        state = tuple(self.versions[p] for p in self.ctx.other_perms[(key, axis)])
        hit = self.terms.get((key, axis))
        if hit is not None and hit[0] == state:
            return hit[1]
        value = self.ctx.a_rows[(key, axis)] @ self.ctx.b_rows(key, axis, perms).T
        self.terms[(key, axis)] = (state, value)
        self.products += 1
        return value

    def updated(self, perm: str) -> None:
        self.versions[perm] += 1


class _RebuiltSimilarity:
    """The textbook way: a fresh permuted copy of B (all permutations but ``P``) per step."""

    def __init__(self, ctx: _MatchContext) -> None:
        self.ctx = ctx
        self.model: dict[str, torch.Tensor] = {}
        self.step: str | None = None
        self.products = 0

    def unchanged(self, perm: str) -> bool:
        self.step = None  # a new step: rebuild
        return False

    def term(self, key: str, axis: int, perms: Perms) -> torch.Tensor:
        p = self.ctx.current_perm
        if self.step != p:
            self.step = p
            self.model = apply_permutation(self.ctx.spec, perms, self.ctx.b, except_perm=p)
        n = perms[p].numel()
        self.products += 1
        return (
            self.ctx.a_rows[(key, axis)] @ torch.movedim(self.model[key], axis, 0).reshape(n, -1).T
        )

    def updated(self, perm: str) -> None:
        pass


class _MatchContext:
    """Validated inputs and the coordinate-descent loop shared by both matchers."""

    def __init__(
        self,
        spec: PermutationSpec,
        reference: Mapping[str, torch.Tensor],
        other: Mapping[str, torch.Tensor],
        init: Mapping[str, torch.Tensor] | None,
        max_iter: int,
        device: torch.device | str | None,
        check: bool = True,
    ) -> None:
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        if check:
            spec.check(reference)
            validate_state_dict(other, reference, name="model to align")
            validate_state_dict(reference, reference, name="reference model")
        # Concat and Grid axes: match over their pieces, each a plain tensor (rebasin.spec).
        spec, (reference, other) = lower_state_dicts(spec, reference, other)
        self.spec = spec
        self.max_iter = max_iter
        self.device = torch.device(device) if device is not None else _device_of(reference)
        # Only weights enter the objective; running statistics merely follow along.
        self.keys = [
            k
            for k, axes in spec.axes_to_perm.items()
            if any(p is not None for p in axes) and not is_running_stat(k)
        ]
        self.a = {k: _as_float(reference[k], self.device) for k in self.keys}
        self.b = {k: _as_float(other[k], self.device) for k in self.keys}
        self.dtype = (
            torch.float64
            if any(t.dtype == torch.float64 for t in self.a.values())
            else torch.float32
        )
        self.sizes = spec.perm_sizes(reference)
        # Permutations that touch at least one weight (not only running statistics).
        self.names = [
            p for p in spec.perm_names if any(k in self.a for k, _ in spec.perm_to_axes[p])
        ]
        self.a_rows = {
            (k, ax): torch.movedim(self.a[k], ax, 0).reshape(self.sizes[p], -1)
            for p in self.names
            for k, ax in spec.perm_to_axes[p]
            if k in self.a
        }
        self.b_moved: dict[tuple[str, int], torch.Tensor] = {}
        self.other_perms = {
            (k, ax): tuple(
                p for i, p in enumerate(spec.axes_to_perm[k]) if p is not None and i != ax
            )
            for (k, ax) in self.a_rows
        }
        if init is None:
            self.perms = {p: t.to(self.device) for p, t in identity_perms(spec, reference).items()}
        else:
            self.perms = _check_init(init, self.sizes, self.device)
        # Permutations that are not (or no longer) the identity; the others need no gather.
        self.moved = {
            p
            for p, perm in self.perms.items()
            if not torch.equal(perm, torch.arange(perm.numel(), device=perm.device))
        }
        self.current_perm = ""

    def b_rows(self, key: str, axis: int, perms: Perms) -> torch.Tensor:
        """B's weight ``key`` with every permutation but the one on ``axis`` applied, as rows.

        B is kept with ``axis`` moved first (contiguous), so the gathers below are the only
        copy and the final reshape is a view. Identity permutations are not gathered: the
        result is the same tensor, bit for bit.
        """
        tensor = self.b_moved.get((key, axis))
        if tensor is None:
            tensor = self.b_moved[(key, axis)] = torch.movedim(self.b[key], axis, 0).contiguous()
        for i, p in enumerate(self.spec.axes_to_perm[key]):
            if p is not None and i != axis and p in self.moved:
                tensor = permute_axis(tensor, i + 1 if i < axis else i, perms[p])
        return tensor.reshape(self.a_rows[(key, axis)].shape[0], -1)

    def objective(self, perms: Perms) -> float:
        """``sum_w <A_w, pi(B_w)>``, from float32 dot products summed in float64."""
        total = 0.0
        for key in self.keys:
            b = self.b[key]
            for axis, p in enumerate(self.spec.axes_to_perm[key]):
                if p is not None and p in self.moved:
                    b = permute_axis(b, axis, perms[p])
            total += float(torch.dot(self.a[key].flatten(), b.flatten()))
        return total

    def descend(self, seed: int, similarity: _CachedSimilarity | _RebuiltSimilarity) -> MatchResult:
        """Algorithm 1: sweep the permutations in a seeded random order until none improves."""
        perms = dict(self.perms)
        rng = np.random.default_rng(seed)
        result = MatchResult(perms=perms, objective=[self.objective(perms)])
        total = result.objective[0]
        if not np.isfinite(total):
            raise MatchingError(
                f"the matching objective is {total} (weights too large for {self.dtype} products)"
            )
        for _ in range(self.max_iter):
            result.sweeps += 1
            progress = False
            for idx in rng.permutation(len(self.names)):
                p = self.current_perm = self.names[idx]
                if similarity.unchanged(p):
                    continue  # same S_P as when last solved: no gain possible
                sim = None
                for key, axis in self.spec.perm_to_axes[p]:
                    if (key, axis) in self.a_rows:
                        term = similarity.term(key, axis, perms)
                        # 0 + t == t exactly, so starting from the first term saves a zero fill.
                        sim = term.clone() if sim is None else sim.add_(term)
                sim_cpu = sim.cpu().double().numpy()
                if not np.isfinite(sim_cpu).all():
                    # linear_sum_assignment would fail on it, or worse, return garbage.
                    raise MatchingError(
                        f"the similarity matrix of permutation {p!r} has "
                        f"{int((~np.isfinite(sim_cpu)).sum())} non-finite entries (weights "
                        f"too large for {self.dtype} products)"
                    )
                rows, cols = linear_sum_assignment(sim_cpu, maximize=True)
                result.solves += 1
                old = float(sim_cpu[rows, perms[p].cpu().numpy()].sum())
                new = float(sim_cpu[rows, cols].sum())
                if new - old > _REL_TOL * max(1.0, abs(old)):
                    perms[p] = torch.as_tensor(cols, device=self.device)
                    self.moved.add(p)
                    similarity.updated(p)
                    total += new - old
                    progress = True
            result.objective.append(total)
            if not progress:
                break
        result.perms = {p: t.cpu() for p, t in perms.items()}
        result.products = similarity.products
        return result


def _device_of(state_dict: Mapping[str, torch.Tensor]) -> torch.device:
    for tensor in state_dict.values():
        return tensor.device
    raise SpecError("empty state dict")


def _as_float(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return tensor.detach().to(device=device, dtype=dtype)


def _check_init(init: Mapping[str, torch.Tensor], sizes: dict[str, int], device) -> Perms:
    missing = sorted(set(sizes) - set(init))
    if missing:
        raise SpecError(f"warm start lacks permutations {missing}")
    perms: Perms = {}
    for p, n in sizes.items():
        perm = torch.as_tensor(init[p], device=device).long()
        if perm.shape != (n,) or not torch.equal(
            torch.sort(perm).values, torch.arange(n, device=device)
        ):
            raise SpecError(f"warm start for {p!r} is not a permutation of {n} units")
        perms[p] = perm
    return perms
