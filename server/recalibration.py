"""Federated BatchNorm recalibration: pool the clients' BatchNorm statistics of a merged model.

Averaging (aligned) models averages their BatchNorm running statistics too, which do not
describe the merged network's activations. The server sends the merged model to the nodes
with a ``query.bn_stats`` message; each replies with per-layer moments on its local data;
the pooled moments (weighted by examples, law of total variance) replace the running
statistics. Bad or missing replies are left out with a log line naming the node; with no
usable reply the merged model is kept as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import nn

from rebasin.norm import BatchNormStats, combine_batchnorm_stats, load_batchnorm_stats
from strategies.bn_query import ARRAYS_KEY, CONFIG_KEY, QUERY_MESSAGE_TYPE, stats_from_record

logger = logging.getLogger("flwr.rebasin." + __name__)


def batchnorm_layer_sizes(model: nn.Module) -> dict[str, int]:
    """Name -> channels of every BatchNorm layer of ``model`` that tracks running statistics."""
    return {
        name: module.num_features
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
    }


def recalibrate_batchnorm(
    grid: Grid,
    arrays: ArrayRecord,
    model: nn.Module,
    node_ids: Iterable[int],
    server_round: int,
    timeout: float,
) -> ArrayRecord:
    """The merged ``arrays`` with BatchNorm running statistics pooled from ``node_ids``.

    Parameters
    ----------
    grid
        The ServerApp's grid.
    arrays
        The merged global model.
    model
        A model of the same architecture (its weights are overwritten).
    node_ids
        The nodes to ask (those that trained this round).
    server_round
        Sent along in the query's config record.
    timeout
        Seconds to wait for the replies.
    """
    layer_sizes = batchnorm_layer_sizes(model)
    asked = sorted(set(node_ids))
    if not layer_sizes or not asked:
        return arrays
    record = RecordDict(
        {ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({"server-round": server_round})}
    )
    messages = [
        Message(content=record, message_type=QUERY_MESSAGE_TYPE, dst_node_id=node_id)
        for node_id in asked
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    stats: list[BatchNormStats] = []
    for reply in replies:
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            logger.warning(
                "round %d BatchNorm query: node %d failed: %s",
                server_round,
                node_id,
                reply.error.reason,
            )
            continue
        try:
            stats.append(stats_from_record(reply.content, layer_sizes))
        except ValueError as exc:
            logger.warning(
                "round %d BatchNorm query: dropped the reply of node %d: %s",
                server_round,
                node_id,
                exc,
            )
    replied = {reply.metadata.src_node_id for reply in replies}
    for node_id in asked:
        if node_id not in replied:
            logger.warning(
                "round %d BatchNorm query: no reply from node %d within %.0f s",
                server_round,
                node_id,
                timeout,
            )
    if not stats:
        logger.warning(
            "round %d: no usable BatchNorm statistics; keeping the merged model's", server_round
        )
        return arrays
    model.load_state_dict(arrays.to_torch_state_dict())
    load_batchnorm_stats(model, combine_batchnorm_stats(stats))
    logger.info(
        "round %d: BatchNorm statistics recalibrated from %d nodes (%d examples)",
        server_round,
        len(stats),
        sum(s.count for s in stats),
    )
    return ArrayRecord(model.state_dict())
