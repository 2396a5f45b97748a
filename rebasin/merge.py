"""Merge models after weight matching: to a reference, MergeMany, interpolation, barrier."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rebasin.align import (
    Alignment,
    ManyAlignment,
    align_many,
    align_to_reference,
    check_models_and_weights,
)
from rebasin.permute import is_finite, validate_state_dict
from rebasin.spec import PermutationSpec, StateDict, keep_metadata


class WeightedAverage:
    """Streaming weighted average of state dicts: holds one running sum, never the models.

    Floating-point entries are averaged in float64 and returned in their own dtype;
    integer entries (such as ``num_batches_tracked``) take the value of the heaviest model.
    """

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self._total = 0.0
        self._heaviest = -1.0
        self._template: StateDict = {}

    def add(self, state_dict: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        if not (weight > 0 and np.isfinite(weight)):
            raise ValueError(f"merge weights must be positive and finite, got {weight}")
        if self._template:
            validate_state_dict(state_dict, self._template, name="model to average")
        for key, tensor in state_dict.items():
            if tensor.is_floating_point():
                term = tensor.detach().double() * weight
                self._sum[key] = self._sum[key] + term if key in self._sum else term
            elif weight > self._heaviest:
                self._sum[key] = tensor.detach().clone()
        if weight > self._heaviest:
            self._heaviest = weight
        if not self._template:
            self._template = keep_metadata(
                {k: v.detach() for k, v in state_dict.items()}, state_dict
            )
        self._total += weight
        if not np.isfinite(self._total):
            raise ValueError(
                f"merge weights sum to {self._total}: give them relative to the largest"
            )

    def result(self) -> StateDict:
        """The weighted mean; ``ValueError`` naming the key if any entry is not finite."""
        if not self._template:
            raise ValueError("cannot average an empty list of models")
        mean = {
            key: (value / self._total).to(self._template[key].dtype)
            if self._template[key].is_floating_point()
            else value
            for key, value in self._sum.items()
        }
        for key, value in mean.items():
            if value.is_floating_point() and not is_finite(value):
                raise ValueError(f"the weighted average is not finite in {key!r}")
        return keep_metadata(mean, self._template)


def average(
    models: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> StateDict:
    """Naive (weighted) average of state dicts, as FedAvg does."""
    weights = check_models_and_weights(models, weights)
    acc = WeightedAverage()
    for model, weight in zip(models, weights):
        acc.add(model, weight)
    return acc.result()


def merge_to_reference(
    spec: PermutationSpec,
    models: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    *,
    reference: int | Mapping[str, torch.Tensor] = 0,
    seed: int = 0,
    max_iter: int = 100,
    on_match: Callable[[int, Alignment], None] | None = None,
) -> StateDict:
    """Align every model to a reference, then take the weighted average.

    ``reference`` is an index into ``models`` (that model is not permuted) or an outside
    state dict (such as last round's global model). Model ``i`` is matched with seed
    ``seed + i``. Work grows linearly with ``len(models)`` and only one aligned copy exists
    at a time (:func:`rebasin.align.align_to_reference`). ``on_match(i, alignment)``, if
    given, is called after model ``i`` is matched (progress, per-model statistics).

    Raises
    ------
    MatchingError
        Naming the model (``.model``: its index) whose matching failed.
    ValueError
        If the weights are not positive and finite, or the average is not finite.
    """
    weights = check_models_and_weights(models, weights)
    acc = WeightedAverage()
    for item in align_to_reference(spec, models, reference=reference, seed=seed, max_iter=max_iter):
        acc.add(item.state_dict, weights[item.index])
        matched = not (isinstance(reference, int) and item.index == reference)
        if on_match is not None and matched:
            on_match(item.index, item.alignment)
    return acc.result()


def merge_many(
    spec: PermutationSpec,
    models: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    *,
    seed: int = 0,
    max_rounds: int = 20,
    max_iter: int = 100,
    on_align: Callable[[ManyAlignment], None] | None = None,
) -> StateDict:
    """MergeMany (Ainsworth et al., appendix): no reference model.

    The weighted mean of the models as aligned by :func:`rebasin.align.align_many`;
    ``on_align(alignment)``, if given, sees that alignment (per-model statistics).
    """
    weights = check_models_and_weights(models, weights)
    many = align_many(spec, models, weights, seed=seed, max_rounds=max_rounds, max_iter=max_iter)
    if on_align is not None:
        on_align(many)
    return average(many.aligned, weights)


def interpolate(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], lam: float
) -> StateDict:
    """``(1 - lam) * a + lam * b`` for floating-point entries; integer entries from ``a``."""
    validate_state_dict(b, a, name="second model")
    out = {
        k: torch.lerp(v, b[k], lam) if v.is_floating_point() else v.clone() for k, v in a.items()
    }
    return keep_metadata(out, a)


@dataclass(frozen=True)
class InterpolationCurve:
    """Loss and accuracy along ``(1 - lam) a + lam b``."""

    lambdas: list[float]
    losses: list[float]
    accuracies: list[float]

    @property
    def loss_barrier(self) -> float:
        return barrier(self.losses)

    @property
    def accuracy_barrier(self) -> float:
        """Largest drop of accuracy below the endpoints' mean (positive means worse)."""
        return barrier([-a for a in self.accuracies])


def interpolation_curve(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    evaluate: Callable[[StateDict], tuple[float, float]],
    lambdas: Iterable[float] = tuple(np.linspace(0.0, 1.0, 11)),
) -> InterpolationCurve:
    """Evaluate ``evaluate(state_dict) -> (loss, accuracy)`` along the linear path a -> b.

    ``evaluate`` owns whatever happens per point (for example a BatchNorm reset).
    """
    lams = [float(x) for x in lambdas]
    losses, accs = [], []
    for lam in lams:
        loss, acc = evaluate(interpolate(a, b, lam))
        losses.append(float(loss))
        accs.append(float(acc))
    return InterpolationCurve(lams, losses, accs)


def barrier(values: Sequence[float]) -> float:
    """Loss barrier of a path: ``max_i values[i]`` minus the mean of the two endpoints."""
    if len(values) < 2:
        raise ValueError("a barrier needs at least the two endpoints")
    return float(max(values) - 0.5 * (values[0] + values[-1]))
