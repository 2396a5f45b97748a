"""Flower strategies that merge client models by Git Re-Basin weight matching.

* :class:`ReBasinFedAvg` -- Message API (``flwr.serverapp.strategy.FedAvg``, Flower 1.42).
* :class:`ReBasinFedAvgLegacy` -- legacy API (``flwr.server.strategy.FedAvg``).

Both share :func:`strategies.aggregate.rebasin_aggregate`.
"""

from strategies.aggregate import ReBasinOptions, RoundReport
from strategies.legacy import ReBasinFedAvgLegacy
from strategies.rebasin_fedavg import ReBasinFedAvg

__all__ = ["ReBasinFedAvg", "ReBasinFedAvgLegacy", "ReBasinOptions", "RoundReport"]
