"""The BatchNorm-statistics query between the ServerApp and its ClientApps, as Flower records.

After a merge the server may recompute the merged model's BatchNorm running statistics from
the clients' data without seeing the data: it sends the model in a ``query.bn_stats``
message, each client answers with per-layer moments computed on its local data
(:func:`rebasin.norm.batchnorm_stats`) and its number of examples, and the server pools them
(:func:`rebasin.norm.combine_batchnorm_stats`).

Reply layout: an ArrayRecord under :data:`STATS_KEY` with ``<layer>.running_mean`` and
``<layer>.running_var`` per BatchNorm layer (the names the model's state dict uses) and a
MetricRecord under :data:`METRICS_KEY` with ``num-examples``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, MessageType, MetricRecord, RecordDict

from rebasin.norm import BatchNormStats

QUERY_ACTION = "bn_stats"
QUERY_MESSAGE_TYPE = f"{MessageType.QUERY}.{QUERY_ACTION}"
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
STATS_KEY = "bn-stats"
METRICS_KEY = "metrics"
NUM_EXAMPLES_KEY = "num-examples"
_MEAN, _VAR = ".running_mean", ".running_var"


def stats_to_record(stats: BatchNormStats) -> RecordDict:
    """A client's reply content for its BatchNorm statistics."""
    arrays: dict[str, torch.Tensor] = {}
    for layer, (mean, var) in stats.moments.items():
        arrays[layer + _MEAN] = mean.detach().cpu().contiguous()
        arrays[layer + _VAR] = var.detach().cpu().contiguous()
    return RecordDict(
        {
            STATS_KEY: ArrayRecord(arrays),
            METRICS_KEY: MetricRecord({NUM_EXAMPLES_KEY: int(stats.count)}),
        }
    )


def stats_from_record(content: RecordDict, layer_sizes: Mapping[str, int]) -> BatchNormStats:
    """Read a client's reply back, checked against the model's BatchNorm layers.

    Parameters
    ----------
    content
        The reply's RecordDict.
    layer_sizes
        BatchNorm layer name -> number of channels, of the model the server sent.

    Raises
    ------
    ValueError
        Naming the problem: a missing record, a missing or extra layer, a wrong shape, a
        non-finite value, a negative variance or a bad ``num-examples``.
    """
    if STATS_KEY not in content.array_records:
        raise ValueError(f"reply has no ArrayRecord {STATS_KEY!r}")
    if METRICS_KEY not in content.metric_records:
        raise ValueError(f"reply has no MetricRecord {METRICS_KEY!r}")
    count = content.metric_records[METRICS_KEY].get(NUM_EXAMPLES_KEY)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{NUM_EXAMPLES_KEY!r} must be a positive integer, got {count!r}")
    arrays = content.array_records[STATS_KEY].to_torch_state_dict()
    expected = {layer + suffix for layer in layer_sizes for suffix in (_MEAN, _VAR)}
    missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
    if missing or extra:
        raise ValueError(f"BatchNorm statistics: missing {missing}, unexpected {extra}")
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer, size in layer_sizes.items():
        mean, var = arrays[layer + _MEAN], arrays[layer + _VAR]
        for name, tensor in ((_MEAN, mean), (_VAR, var)):
            if tuple(tensor.shape) != (size,) or not tensor.is_floating_point():
                raise ValueError(
                    f"{layer + name!r} must be a float tensor of shape ({size},), got "
                    f"{tensor.dtype} {tuple(tensor.shape)}"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{layer + name!r} has non-finite values")
        if bool((var < 0).any()):
            raise ValueError(f"{layer + _VAR!r} has negative variances")
        moments[layer] = (mean, var)
    return BatchNormStats(moments, count)
