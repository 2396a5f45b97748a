"""Weight matching (Git Re-Basin, Ainsworth et al. 2023, section 3.2, Algorithm 1).

Find permutations ``pi`` of model B's hidden units that maximise
``sum_w <A_w, pi(B_w)>`` over every weight touched by a permutation, by coordinate
descent: for one permutation ``P`` at a time, with all others fixed, the objective is linear
in ``P`` and its maximiser is a linear assignment problem on

    S_P = sum over (w, axis) that P touches of  A_w[axis -> rows] @ pi_without_P(B_w)[axis -> rows]^T

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

from rebasin.permute import Perms, apply_permutation, identity_perms, permute_axis
from rebasin.permute import validate_state_dict
from rebasin.spec import PermutationSpec, SpecError, is_running_stat

# A step counts as progress only if it raises the objective by more than this (relative to
# its size), so that ties and round-off never make the descent cycle.
_REL_TOL = 1e-12


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
    """

    perms: Perms
    objective: list[float] = field(default_factory=list)
    sweeps: int = 0


def weight_matching(
    spec: PermutationSpec,
    reference: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    *,
    seed: int = 0,
    init: Mapping[str, torch.Tensor] | None = None,
    max_iter: int = 100,
    device: torch.device | str | None = None,
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

    Returns
    -------
    MatchResult
        The permutations and the objective per sweep.
    """
    ctx = _MatchContext(spec, reference, other, init, max_iter, device)
    cache: dict[tuple[str, int], tuple[tuple[int, ...], torch.Tensor]] = {}
    versions = dict.fromkeys(ctx.names, 0)

    def contribution(key: str, axis: int, perms: Perms) -> torch.Tensor:
        # Valid while the permutations on this weight's other axes are unchanged.
        others = tuple(versions[p] for p in ctx.other_perms[(key, axis)])
        hit = cache.get((key, axis))
        if hit is not None and hit[0] == others:
            return hit[1]
        value = ctx.a_rows[(key, axis)] @ ctx.b_rows(key, axis, perms).T
        cache[(key, axis)] = (others, value)
        return value

    def on_update(perm: str) -> None:
        versions[perm] += 1

    return ctx.descend(seed, contribution, on_update)


def reference_weight_matching(
    spec: PermutationSpec,
    reference: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    *,
    seed: int = 0,
    init: Mapping[str, torch.Tensor] | None = None,
    max_iter: int = 100,
    device: torch.device | str | None = None,
) -> MatchResult:
    """The textbook matcher: rebuild every permuted weight at every step (baseline only)."""
    ctx = _MatchContext(spec, reference, other, init, max_iter, device)
    state: dict[str, object] = {}

    def contribution(key: str, axis: int, perms: Perms) -> torch.Tensor:
        step = (id(perms), ctx.current_perm)
        if state.get("step") != step:
            # A fresh permuted copy of the whole model, all permutations but the current one.
            state["step"] = step
            state["model"] = apply_permutation(ctx.spec, perms, ctx.b, except_perm=ctx.current_perm)
        b = state["model"][key]  # type: ignore[index]
        n = perms[ctx.current_perm].numel()
        return ctx.a_rows[(key, axis)] @ torch.movedim(b, axis, 0).reshape(n, -1).T

    return ctx.descend(seed, contribution, lambda perm: state.clear())


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
    ) -> None:
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        spec.check(reference)
        validate_state_dict(other, reference, name="model to align")
        validate_state_dict(reference, reference, name="reference model")
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
        self.sizes = spec.perm_sizes(reference)
        self.names = spec.perm_names
        self.a_rows = {
            (k, ax): torch.movedim(self.a[k], ax, 0).reshape(self.sizes[p], -1)
            for p in self.names
            for k, ax in spec.perm_to_axes[p]
            if k in self.a
        }
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
        self.current_perm = ""

    def b_rows(self, key: str, axis: int, perms: Perms) -> torch.Tensor:
        """B's weight ``key`` with every permutation but the one on ``axis`` applied, as rows."""
        tensor = self.b[key]
        for i, p in enumerate(self.spec.axes_to_perm[key]):
            if p is not None and i != axis:
                tensor = permute_axis(tensor, i, perms[p])
        return torch.movedim(tensor, axis, 0).reshape(self.a_rows[(key, axis)].shape[0], -1)

    def objective(self, perms: Perms) -> float:
        permuted = apply_permutation(self.spec, perms, self.b)
        return float(
            sum(torch.vdot(self.a[k].double().flatten(), permuted[k].double().flatten()) for k in self.keys)
        )

    def descend(self, seed: int, contribution, on_update) -> MatchResult:
        perms = dict(self.perms)
        rng = np.random.default_rng(seed)
        result = MatchResult(perms=perms, objective=[self.objective(perms)])
        total = result.objective[0]
        usable = [p for p in self.names if any((k, ax) in self.a_rows for k, ax in self.spec.perm_to_axes[p])]
        for _ in range(self.max_iter):
            result.sweeps += 1
            progress = False
            for idx in rng.permutation(len(usable)):
                p = usable[idx]
                self.current_perm = p
                n = self.sizes[p]
                sim = torch.zeros((n, n), dtype=torch.float64, device=self.device)
                for key, axis in self.spec.perm_to_axes[p]:
                    if (key, axis) in self.a_rows:
                        sim += contribution(key, axis, perms)
                sim_cpu = sim.cpu().numpy()
                rows, cols = linear_sum_assignment(sim_cpu, maximize=True)
                old = float(sim_cpu[rows, perms[p].cpu().numpy()].sum())
                new = float(sim_cpu[rows, cols].sum())
                if new - old > _REL_TOL * max(1.0, abs(old)):
                    perms[p] = torch.as_tensor(cols, device=self.device)
                    on_update(p)
                    total += new - old
                    progress = True
            result.objective.append(total)
            if not progress:
                break
        result.perms = {p: t.cpu() for p, t in perms.items()}
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
        if perm.shape != (n,) or not torch.equal(torch.sort(perm).values, torch.arange(n, device=device)):
            raise SpecError(f"warm start for {p!r} is not a permutation of {n} units")
        perms[p] = perm
    return perms
