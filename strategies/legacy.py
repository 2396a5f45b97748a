"""``ReBasinFedAvgLegacy``: the Re-Basin merge for apps on the legacy strategy API.

Older Flower apps run a :class:`flwr.server.strategy.FedAvg` whose ``aggregate_fit`` receives
``Parameters`` (bare arrays, in state-dict order) inside ``FitRes``. This adapter keeps that
interface and does what :class:`~strategies.rebasin_fedavg.ReBasinFedAvg` does, through the
same core (:func:`strategies.aggregate.rebasin_aggregate`)::

    # was: strategy = FedAvg(min_fit_clients=2)
    strategy = ReBasinFedAvgLegacy(model=Net(), min_fit_clients=2)

Unusable results are dropped with one warning each; with fewer than ``min_fit_clients`` valid
results the previous global parameters are kept. When matching finds the identity the result
is exactly the legacy FedAvg's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from torch import nn

from rebasin.permute import Perms
from rebasin.spec import PermutationSpec, StateDict
from strategies.aggregate import rebasin_aggregate
from strategies.core import (
    DEFAULT_MAX_NORM_RATIO,
    ClientUpdate,
    NodeId,
    ReBasinOptions,
    Reference,
    RoundReport,
    check_global_model,
    log_dropped,
    logger,
    resolve_spec,
)


class ReBasinFedAvgLegacy(FedAvg):
    """Legacy-API FedAvg that aligns client models by weight matching before averaging.

    Parameters
    ----------
    model
        The torch model being trained: gives the permutation spec (see
        :class:`~strategies.rebasin_fedavg.ReBasinFedAvg`) and the state-dict key of each
        array in ``Parameters``.
    spec
        An explicit permutation spec, instead of (or to override that of) ``model``.
    state_dict_keys
        The key of each array in ``Parameters``, in order; needed when no ``model`` is given.
    reference, max_iter, seed, device, example_input, max_norm_ratio
        As in :class:`~strategies.rebasin_fedavg.ReBasinFedAvg`.
    **fedavg_kwargs
        Every keyword argument of :class:`flwr.server.strategy.FedAvg`
        (``min_fit_clients``, ``fit_metrics_aggregation_fn``, ``initial_parameters``, ...).

    Attributes
    ----------
    spec, options, warm_starts, last_round
        As in :class:`~strategies.rebasin_fedavg.ReBasinFedAvg`; node ids are client ids.
    keys : list[str]
        The state-dict key of each array in ``Parameters``.
    """

    def __init__(
        self,
        *,
        model: nn.Module | None = None,
        spec: PermutationSpec | None = None,
        state_dict_keys: Sequence[str] | None = None,
        reference: Reference = "global",
        max_iter: int = 100,
        seed: int = 0,
        device: str | None = None,
        example_input: torch.Tensor | None = None,
        max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.options = ReBasinOptions(
            reference=reference,
            max_iter=max_iter,
            seed=seed,
            device=device,
            max_norm_ratio=max_norm_ratio,
        )
        self.spec = resolve_spec(model, spec, example_input)
        if state_dict_keys is not None:
            self.keys = list(state_dict_keys)
        elif model is not None:
            self.keys = list(model.state_dict())
        else:
            raise ValueError(
                "the legacy API sends bare arrays in state-dict order: give model= or "
                "state_dict_keys= so that they can be named"
            )
        if sorted(self.keys) != sorted(self.spec.axes_to_perm):
            raise ValueError(
                "state_dict_keys must list exactly the spec's keys; missing "
                f"{sorted(set(self.spec.axes_to_perm) - set(self.keys))}, unexpected "
                f"{sorted(set(self.keys) - set(self.spec.axes_to_perm))}"
            )
        self.warm_starts: dict[NodeId, Perms] = {}
        self.last_round: RoundReport | None = None
        self._global_parameters: Parameters | None = None
        self._global_model: StateDict | None = None

    def __repr__(self) -> str:
        return (
            f"ReBasinFedAvgLegacy(reference={self.options.reference!r}, "
            f"accept_failures={self.accept_failures})"
        )

    def set_global_parameters(self, parameters: Parameters) -> None:
        """Remember the global model that clients train from (done by ``configure_fit``)."""
        if parameters is self._global_parameters:
            return
        state_dict = self._to_state_dict(parameters)
        check_global_model(self.spec, state_dict)
        self._global_parameters, self._global_model = parameters, state_dict

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """FedAvg's ``configure_fit``, remembering ``parameters`` as this round's global model."""
        self.set_global_parameters(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Drop unusable results, align the rest by weight matching, average them."""
        if self._global_model is None:
            raise RuntimeError(
                "aggregate_fit needs the global model of the round: call configure_fit "
                "(as the legacy server does) or set_global_parameters first"
            )
        for failure in failures:
            if isinstance(failure, BaseException):
                logger.warning("A client failed: %s: %s", type(failure).__name__, failure)
            else:
                proxy, res = failure
                log_dropped(proxy.cid, f"failed with {_status(res)}")
        if failures and not self.accept_failures:
            logger.warning("Keeping the previous global model: failures and accept_failures=False")
            return self._global_parameters, {}
        updates = [self._to_update(proxy, res) for proxy, res in results]
        merged, report = rebasin_aggregate(
            self.spec,
            self._global_model,
            updates,
            options=self.options,
            warm_starts=self.warm_starts,
            min_valid=self.min_fit_clients,
            weight_key="num_examples",
            scale_in_float64=True,
        )
        self.last_round = report
        self.warm_starts.update(report.perms)
        valid = set(report.valid)
        metrics: dict[str, Scalar] = {}
        if self.fit_metrics_aggregation_fn and valid:
            metrics = self.fit_metrics_aggregation_fn(
                [(res.num_examples, res.metrics) for proxy, res in results if proxy.cid in valid]
            )
        if merged is None:
            return self._global_parameters, metrics
        parameters = ndarrays_to_parameters([merged[k].numpy() for k in self.keys])
        self._global_parameters, self._global_model = parameters, merged
        return parameters, metrics

    def _to_update(self, proxy: ClientProxy, res: FitRes) -> ClientUpdate:
        if res.status.code != Code.OK:
            return ClientUpdate(proxy.cid, problem=_status(res))
        return ClientUpdate(
            proxy.cid, weight=res.num_examples, load=lambda: self._to_state_dict(res.parameters)
        )

    def _to_state_dict(self, parameters: Parameters) -> StateDict:
        """Name the arrays of ``parameters`` by their state-dict keys, as CPU tensors."""
        arrays = parameters_to_ndarrays(parameters)
        if len(arrays) != len(self.keys):
            raise ValueError(f"{len(arrays)} arrays sent, the model has {len(self.keys)}")
        return {k: torch.from_numpy(np.asarray(a)) for k, a in zip(self.keys, arrays)}


def _status(res: FitRes) -> str:
    code = getattr(res.status.code, "name", res.status.code)
    return f"status {code}: {res.status.message}"
