"""Flower strategies that merge client models by Git Re-Basin weight matching.

* :class:`ReBasinFedAvg` -- Message API (``flwr.serverapp.strategy.FedAvg``, Flower 1.42).
* :class:`ReBasinFedAvgLegacy` -- legacy API (``flwr.server.strategy.FedAvg``).

Both share :func:`strategies.aggregate.rebasin_aggregate`. The classes are imported on first
use: every ClientApp process imports this package (for the shared run-config) and should not
pay for SciPy and the strategies it never runs.
"""

from importlib import import_module

__all__ = ["ReBasinFedAvg", "ReBasinFedAvgLegacy", "ReBasinOptions", "RoundReport"]

_WHERE = {
    "ReBasinFedAvg": "strategies.rebasin_fedavg",
    "ReBasinFedAvgLegacy": "strategies.legacy",
    "ReBasinOptions": "strategies.core",
    "RoundReport": "strategies.core",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'strategies' has no attribute {name!r}")
