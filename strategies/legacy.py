"""Re-basin for apps on the legacy strategy API (``flwr.server.strategy``).

Older Flower apps run a strategy whose ``aggregate_fit`` receives ``Parameters`` (bare arrays,
in state-dict order) inside ``FitRes``. :class:`ReBasinLegacy` is the legacy form of
:class:`strategies.wrapper.ReBasin`: mixed in front of a legacy strategy, its
``aggregate_fit`` screens and aligns the results (:class:`strategies.align_step
.RoundAlignment`), writes the aligned parameters back into them, and hands the valid ones to
the strategy's own ``aggregate_fit``::

    strategy = rebasin_legacy(FedMedian)(model=Net(), min_fit_clients=2)   # was: FedMedian(...)

:class:`ReBasinFedAvgLegacy` is the short form for FedAvg, streaming the aligned models into
FedAvg's weighted sum (bit for bit the legacy FedAvg's when matching finds the identity).
With Flower's legacy DP wrappers, re-basin goes in front of them, as with the Message API.
Unusable results are dropped with one warning each; with fewer than ``min_fit_clients``
valid results the previous global parameters are kept.
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
from flwr.server.strategy import FedAvg, Strategy
from torch import nn

from rebasin.permute import Perms, is_finite
from rebasin.spec import PermutationSpec, StateDict
from strategies.aggregate import rebasin_aggregate
from strategies.align_step import RoundAlignment
from strategies.core import (
    DEFAULT_MAX_NORM_RATIO,
    ClientUpdate,
    NodeId,
    ReBasinOptions,
    Reference,
    RoundReport,
    check_global_model,
    find_setting,
    in_front,
    log_dropped,
    logger,
    resolve_spec,
)

FitResults = list[tuple[ClientProxy, FitRes]]
Failures = list[tuple[ClientProxy, FitRes] | BaseException]


class ReBasinLegacy:
    """Mixin: re-basin alignment in front of a legacy strategy's ``aggregate_fit``.

    Parameters
    ----------
    *args, **kwargs
        The strategy's own arguments.
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

    Attributes
    ----------
    spec, options, warm_starts, last_round
        As in :class:`~strategies.rebasin_fedavg.ReBasinFedAvg`; node ids are client ids.
    keys : list[str]
        The state-dict key of each array in ``Parameters``.
    """

    def __init__(
        self,
        *args: Any,
        model: nn.Module | None = None,
        spec: PermutationSpec | None = None,
        state_dict_keys: Sequence[str] | None = None,
        reference: Reference = "global",
        max_iter: int = 100,
        seed: int = 0,
        device: str | None = None,
        example_input: torch.Tensor | None = None,
        max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
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
        """The strategy's ``configure_fit``, remembering ``parameters`` as the global model."""
        self.set_global_parameters(parameters)
        return super().configure_fit(server_round, parameters, client_manager)  # type: ignore[misc]

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Drop unusable results, align the rest, and aggregate them with the strategy's own
        ``aggregate_fit``; ``(None, {})`` (keep the model) when too few are valid."""
        global_model = self._round_global_model()
        if not self._accept(failures):
            return None, {}
        min_valid = int(self._setting("min_fit_clients", 1))
        round_ = RoundAlignment(
            self.spec,
            global_model,
            [self._to_update(proxy, res) for proxy, res in results],
            options=self.options,
            warm_starts=self.warm_starts,
            min_valid=min_valid,
            weight_key="num_examples",
        )
        report = self.last_round = round_.report
        if len(round_.candidates) < max(min_valid, 1):
            report.too_few(len(round_.candidates), min_valid)
            return None, {}
        aligned = {update.node_id: update for update in round_}
        if len(report.valid) < max(min_valid, 1):
            report.too_few(len(report.valid), min_valid)
            return None, {}
        self.warm_starts.update(report.perms)
        valid: FitResults = []
        for proxy, res in results:
            update = aligned.pop(proxy.cid, None)  # the client's first result only
            if update is not None:
                res.parameters = self._to_parameters(update.state_dict)
                valid.append((proxy, res))
        parameters, metrics = super().aggregate_fit(server_round, valid, [])  # type: ignore[misc]
        if parameters is not None:
            for key, array in zip(self.keys, parameters_to_ndarrays(parameters)):
                tensor = torch.from_numpy(np.asarray(array))
                if tensor.is_floating_point() and not is_finite(tensor):
                    report.keep_previous(f"the aggregated model is not finite in {key!r}")
                    return None, metrics
        return parameters, metrics

    # --- Flower objects -> the core's ClientUpdate -------------------------------------

    def _round_global_model(self) -> StateDict:
        if self._global_model is None:
            raise RuntimeError(
                "aggregate_fit needs the global model of the round: call configure_fit "
                "(as the legacy server does) or set_global_parameters first"
            )
        return self._global_model

    def _setting(self, name: str, default: Any) -> Any:
        return find_setting(self, name, default)

    def _accept(self, failures: Failures) -> bool:
        """Log every failure; whether the round may go on (``accept_failures``)."""
        for failure in failures:
            if isinstance(failure, BaseException):
                logger.warning("A client failed: %s: %s", type(failure).__name__, failure)
            else:
                proxy, res = failure
                log_dropped(proxy.cid, f"failed with {_status(res)}")
        if failures and not self._setting("accept_failures", True):
            logger.warning("Keeping the previous global model: failures and accept_failures=False")
            return False
        return True

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

    def _to_parameters(self, state_dict: StateDict) -> Parameters:
        return ndarrays_to_parameters([state_dict[k].numpy() for k in self.keys])


class ReBasinFedAvgLegacy(ReBasinLegacy, FedAvg):
    """Legacy-API FedAvg that aligns client models by weight matching before averaging.

    :class:`ReBasinLegacy` in front of :class:`flwr.server.strategy.FedAvg` (every keyword
    argument of both), with the aligned models streamed into FedAvg's weighted sum.
    """

    def __repr__(self) -> str:
        return (
            f"ReBasinFedAvgLegacy(reference={self.options.reference!r}, "
            f"accept_failures={self.accept_failures})"
        )

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Drop unusable results, align the rest by weight matching, average them."""
        global_model = self._round_global_model()
        if not self._accept(failures):
            return self._global_parameters, {}
        merged, report = rebasin_aggregate(
            self.spec,
            global_model,
            [self._to_update(proxy, res) for proxy, res in results],
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
        parameters = self._to_parameters(merged)
        self._global_parameters, self._global_model = parameters, merged
        return parameters, metrics


def rebasin_legacy(strategy_class: type[Strategy]) -> type[Strategy]:
    """``strategy_class`` (a legacy ``flwr.server.strategy.Strategy``) with
    :class:`ReBasinLegacy` in front; made once per class."""
    name = f"ReBasin{strategy_class.__name__}Legacy" if isinstance(strategy_class, type) else ""
    return in_front(ReBasinLegacy, strategy_class, Strategy, name)


def _status(res: FitRes) -> str:
    code = getattr(res.status.code, "name", res.status.code)
    return f"status {code}: {res.status.message}"
