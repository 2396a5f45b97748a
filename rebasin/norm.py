"""Repair a merged model's activation statistics.

Averaging two aligned models shrinks the variance of hidden units ("variance collapse",
Jordan et al. 2022, REPAIR, arXiv 2211.08403). Two fixes:

* :func:`reset_batchnorm_stats` — recompute every BatchNorm layer's running statistics on
  data (RESET); :func:`batchnorm_stats` and :func:`combine_batchnorm_stats` do the same
  across clients that keep their data, by combining per-client moments;
* :func:`repair` — REPAIR for models without BatchNorm: rescale each hidden unit of the
  merged model so that its mean and standard deviation are the interpolation of the
  endpoints' ones, folded into the layer's weight and bias.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

_BN = nn.modules.batchnorm._BatchNorm


def _batches(loader: Iterable, num_batches: int | None, device: torch.device):
    for i, batch in enumerate(loader):
        if num_batches is not None and i >= num_batches:
            break
        yield (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer that tracks running statistics."""
    return any(isinstance(m, _BN) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def reset_batchnorm_stats(
    model: nn.Module, loader: Iterable, num_batches: int | None = None
) -> nn.Module:
    """Recompute every BatchNorm's running mean and variance on ``loader`` (in place).

    Statistics are exact averages over the batches seen (momentum ``None``), not a moving
    average. The model is left in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return model.eval()
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    seen = 0
    for x in _batches(loader, num_batches, _device(model)):
        model(x)
        seen += 1
    if seen == 0:
        raise ValueError("reset_batchnorm_stats got no data")
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    return model.eval()


@dataclass(frozen=True)
class BatchNormStats:
    """One client's per-layer BatchNorm moments: layer name -> (mean, var); ``count`` examples."""

    moments: dict[str, tuple[torch.Tensor, torch.Tensor]]
    count: int


@torch.no_grad()
def batchnorm_stats(
    model: nn.Module, loader: Iterable, num_batches: int | None = None
) -> BatchNormStats:
    """Per-layer BatchNorm statistics of ``model`` on local data (the model is not changed)."""
    work = copy.deepcopy(model)
    reset_batchnorm_stats(work, loader, num_batches)
    count = sum(len(x) for x in _batches(loader, num_batches, torch.device("cpu")))
    moments = {
        name: (m.running_mean.clone().cpu(), m.running_var.clone().cpu())
        for name, m in work.named_modules()
        if isinstance(m, _BN) and m.track_running_stats
    }
    return BatchNormStats(moments, count)


def combine_batchnorm_stats(
    stats: Sequence[BatchNormStats],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pool per-client moments, weighted by examples (law of total variance)."""
    if not stats:
        raise ValueError("no BatchNorm statistics to combine")
    names = set(stats[0].moments)
    for s in stats[1:]:
        if set(s.moments) != names:
            raise ValueError("clients report BatchNorm statistics for different layers")
    total = sum(s.count for s in stats)
    if total <= 0:
        raise ValueError("BatchNorm statistics cover no examples")
    pooled = {}
    for name in sorted(names):
        mean = sum(s.count * s.moments[name][0].double() for s in stats) / total
        var = (
            sum(
                s.count * (s.moments[name][1].double() + (s.moments[name][0].double() - mean) ** 2)
                for s in stats
            )
            / total
        )
        dtype = stats[0].moments[name][0].dtype
        pooled[name] = (mean.to(dtype), var.to(dtype))
    return pooled


def load_batchnorm_stats(
    model: nn.Module, moments: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> nn.Module:
    """Set the running mean and variance of each named BatchNorm layer (in place)."""
    layers = dict(model.named_modules())
    for name, (mean, var) in moments.items():
        bn = layers.get(name)
        if not isinstance(bn, _BN):
            raise ValueError(f"{name!r} is not a BatchNorm layer of the model")
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    return model


@torch.no_grad()
def channel_moments(
    model: nn.Module, layer_name: str, loader: Iterable, num_batches: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per output channel of one Linear/Conv layer over the data."""
    return layer_moments(model, [layer_name], loader, num_batches)[layer_name]


@torch.no_grad()
def layer_moments(
    model: nn.Module, layer_names: Sequence[str], loader: Iterable, num_batches: int | None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and std per output channel of each named layer, all from one pass over the data."""
    modules = dict(model.named_modules())
    missing = [name for name in layer_names if name not in modules]
    if missing:
        raise ValueError(f"the model has no layer(s) {', '.join(map(repr, missing))}")
    # Running (sum, sum of squares, count) per layer, in float64.
    sums: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_module, _inputs, output):
            y = output.transpose(0, 1).reshape(output.shape[1], -1).double()
            batch = torch.stack([y.sum(1), (y * y).sum(1), torch.full_like(y[:, 0], y.shape[1])])
            sums[name] = sums[name] + batch if name in sums else batch

        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in layer_names]
    try:
        model.eval()
        for x in _batches(loader, num_batches, _device(model)):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    moments = {}
    for name in layer_names:
        if name not in sums:
            raise ValueError(f"layer {name!r} gave no output over the data (no batch, or unused)")
        s, s2, n = sums[name]
        mean = s / n
        moments[name] = (mean, (s2 / n - mean**2).clamp_min(0).sqrt())
    return moments


@torch.no_grad()
def repair(
    merged: nn.Module,
    endpoints: Sequence[nn.Module],
    loader: Iterable,
    weights: Sequence[float] | None = None,
    num_batches: int | None = None,
    eps: float = 1e-5,
) -> nn.Module:
    """REPAIR (in place): give each hidden unit of ``merged`` the interpolated statistics.

    For every Linear/Conv layer with a bias except the last, and every GroupNorm (the
    models' LayerNorm) with an affine weight and bias, the target mean and standard
    deviation of each output unit are the ``weights``-average of the (aligned) endpoints'
    ones; the correction ``y -> (y - mu_merged) * std_target / std_merged + mu_target`` is
    folded into the weight and bias. Layers are repaired in forward order, each measured
    after the ones before it were fixed; each endpoint is measured once, every layer in one
    pass (so with a shuffling ``loader`` cut at ``num_batches``, all of one endpoint's targets
    come from one sample of batches). (Convolutions followed by a LayerNorm have no bias:
    the norm's affine parameters are the place to fold the correction.)
    """
    if not endpoints:
        raise ValueError("repair needs at least one endpoint model")
    weights = list(weights) if weights is not None else [1.0] * len(endpoints)
    total = float(sum(weights))
    layers = [
        name
        for name, m in merged.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.GroupNorm)) and m.bias is not None
    ][:-1]
    # The endpoints never change: one pass each measures every layer's target. The merged
    # model is measured layer by layer, after the layers before it were corrected.
    measured = [layer_moments(m, layers, loader, num_batches) for m in endpoints]
    for name in layers:
        targets = [m[name] for m in measured]
        mu_t = sum(w * t[0] for w, t in zip(weights, targets)) / total
        std_t = sum(w * t[1] for w, t in zip(weights, targets)) / total
        mu_m, std_m = channel_moments(merged, name, loader, num_batches)
        scale = std_t / (std_m + eps)
        layer = dict(merged.named_modules())[name]
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight.mul_(scale.view(shape).to(layer.weight.dtype))
        layer.bias.copy_(((layer.bias.double() - mu_m) * scale + mu_t).to(layer.bias.dtype))
    return merged
