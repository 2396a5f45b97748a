"""FedAvg's weighted mean of the aligned models, streamed: the aggregation of
:class:`~strategies.rebasin_fedavg.ReBasinFedAvg` and its legacy-API form.

:func:`rebasin_aggregate` runs the round's align step (:class:`strategies.align_step
.RoundAlignment`: screen every reply, align the valid ones) and adds each aligned model to a
running sum as it comes, so that (except for MergeMany) one client model is held at a time.
It keeps the previous global model when fewer than ``min_valid`` replies are valid, or when
the merged model is not finite.

The average to a reference uses FedAvg's own floating-point arithmetic
(``sum_i x_i * (w_i / W)``, accumulated in the parameters' dtype, in reply order), so that
when matching finds the identity the result is bit for bit what Flower's FedAvg returns;
MergeMany's average is :func:`rebasin.merge.average` (accumulated in float64), bit for bit
:func:`rebasin.merge.merge_many`'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from rebasin.merge import average
from rebasin.permute import Perms, is_finite
from rebasin.spec import PermutationSpec, StateDict
from strategies.align_step import RoundAlignment
from strategies.core import ClientUpdate, NodeId, ReBasinOptions, RoundReport, logger


def rebasin_aggregate(
    spec: PermutationSpec,
    global_model: Mapping[str, torch.Tensor],
    updates: Sequence[ClientUpdate],
    *,
    options: ReBasinOptions,
    warm_starts: Mapping[NodeId, Perms],
    min_valid: int,
    weight_key: str = "num-examples",
    scale_in_float64: bool = False,
) -> tuple[StateDict | None, RoundReport]:
    """Screen ``updates``, align the valid ones to the reference, and average them.

    Parameters
    ----------
    spec, global_model, updates, options, warm_starts, min_valid, weight_key
        As in :class:`strategies.align_step.RoundAlignment`.
    scale_in_float64
        Multiply each model by its weight factor in float64 before rounding to the model's
        dtype (the legacy FedAvg's arithmetic); otherwise multiply in the model's dtype (the
        Message API FedAvg's arithmetic).

    Returns
    -------
    tuple[StateDict | None, RoundReport]
        The merged model (CPU tensors, the global model's key order and dtypes), or ``None``
        when the previous global model should be kept; and what happened to every update.
    """
    round_ = RoundAlignment(
        spec,
        global_model,
        updates,
        options=options,
        warm_starts=warm_starts,
        min_valid=min_valid,
        weight_key=weight_key,
    )
    report = round_.report
    if len(round_.candidates) < max(min_valid, 1):
        report.too_few(len(round_.candidates), min_valid)
        return None, report
    if options.reference == "merge-many":
        aligned = list(round_)
        merged = average([u.state_dict for u in aligned], [u.weight for u in aligned])
    else:
        acc = _FedAvgSum(round_.total_weight, scale_in_float64)
        for update in round_:
            acc.add(update.state_dict, update.weight)
        merged = None if acc.empty else acc.result()
    if merged is None or len(report.valid) < max(min_valid, 1):
        report.too_few(len(report.valid), min_valid)
        return None, report
    for key, tensor in merged.items():
        if tensor.is_floating_point() and not is_finite(tensor):
            report.keep_previous(f"the merged model is not finite in {key!r}")
            return None, report
    logger.info(
        "Re-Basin merge: %d valid replies of %d (reference: %s)",
        len(report.valid),
        report.received,
        options.reference,
    )
    return {key: merged[key] for key in global_model}, report


class _FedAvgSum:
    """``sum_i x_i * (w_i / W)`` with FedAvg's floating-point arithmetic, one model at a time.

    ``W`` must be known before the first model arrives; if some models are dropped later, the
    sum is rescaled to the weights actually added. Integer entries (such as
    ``num_batches_tracked``) cannot be averaged without changing their dtype: they take the
    value of the heaviest model.
    """

    def __init__(self, expected_total: float, scale_in_float64: bool) -> None:
        if not expected_total > 0:
            raise ValueError(f"total weight must be positive, got {expected_total}")
        self._expected_total = expected_total
        self._scale_in_float64 = scale_in_float64
        self._sum: dict[str, torch.Tensor] = {}
        self._heaviest = -math.inf
        self._added = 0.0

    @property
    def empty(self) -> bool:
        return not self._sum

    def add(self, state_dict: Mapping[str, torch.Tensor], weight: float) -> None:
        factor = weight / self._expected_total
        heaviest = weight > self._heaviest
        for key, tensor in state_dict.items():
            tensor = tensor.detach().cpu()
            if tensor.is_floating_point():
                if self._scale_in_float64:
                    term = (tensor.double() * factor).to(tensor.dtype)
                else:
                    term = tensor * factor
                if key in self._sum:
                    self._sum[key].add_(term)
                else:
                    self._sum[key] = term
            elif heaviest:
                self._sum[key] = tensor.clone()
        if heaviest:
            self._heaviest = weight
        self._added += weight

    def result(self) -> StateDict:
        if self._added == self._expected_total:
            return dict(self._sum)
        rescale = self._expected_total / self._added
        return {k: v * rescale if v.is_floating_point() else v for k, v in self._sum.items()}
