"""A ServerApp's strategy with central differential privacy, server-side fixed clipping, as
Flower documents it; re-basin comes in with the marked lines (in front of the clipping, so
that the clipping bound holds for the aligned updates that are averaged)."""

from __future__ import annotations

from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from torch import nn

from strategies import rebasin  # re-basin


def make_strategy(model: nn.Module, num_nodes: int, clipping_norm: float, noise: float):
    """FedAvg over ``num_nodes`` sampled nodes, clipped and noised on the server."""
    fedavg = FedAvg(min_train_nodes=num_nodes, min_available_nodes=num_nodes)
    return rebasin(DifferentialPrivacyServerSideFixedClipping)(  # re-basin: rebasin(...)
        fedavg, noise_multiplier=noise, clipping_norm=clipping_norm,
        num_sampled_clients=num_nodes, model=model,  # re-basin: model= added
    )  # fmt: skip
