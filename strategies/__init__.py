"""Flower strategies that merge client models by Git Re-Basin weight matching.

* :class:`ReBasin`, :func:`rebasin`, :func:`with_rebasin` -- re-basin in front of any
  Message-API strategy (FedAdam, FedMedian, Krum, DP wrappers, a user's FedAvg subclass).
* :class:`ReBasinFedAvg` -- the short form for FedAvg (``flwr.serverapp.strategy.FedAvg``).
* :class:`ReBasinLegacy`, :func:`rebasin_legacy`, :class:`ReBasinFedAvgLegacy` -- the same
  for the legacy API (``flwr.server.strategy``).

All of them run :class:`strategies.align_step.RoundAlignment`. The classes are imported on
first use: every ClientApp process imports this package (for the shared run-config) and
should not pay for SciPy and the strategies it never runs.
"""

from importlib import import_module

__all__ = [
    "ReBasin",
    "ReBasinFedAvg",
    "ReBasinFedAvgLegacy",
    "ReBasinLegacy",
    "ReBasinOptions",
    "RoundReport",
    "rebasin",
    "rebasin_legacy",
    "with_rebasin",
]

_WHERE = {
    "ReBasin": "strategies.wrapper",
    "rebasin": "strategies.wrapper",
    "with_rebasin": "strategies.wrapper",
    "ReBasinFedAvg": "strategies.rebasin_fedavg",
    "ReBasinLegacy": "strategies.legacy",
    "rebasin_legacy": "strategies.legacy",
    "ReBasinFedAvgLegacy": "strategies.legacy",
    "ReBasinOptions": "strategies.core",
    "RoundReport": "strategies.core",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'strategies' has no attribute {name!r}")
