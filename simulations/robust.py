"""Robust aggregation with hostile clients, with and without re-basin in front.

Robust rules (FedMedian's coordinate-wise median, Krum's distance scores, the trimmed mean)
assume that coordinate ``i`` is the same unit in every client's model. Models trained from
different initialisations do not share units: their coordinate-wise median mixes unrelated
neurons. Re-basin alignment (:func:`strategies.rebasin`) permutes every model into one basin
first, which is what these rules take for granted. This module holds the pieces of the
``rebasin robust`` experiment (:mod:`simulations.robust_run` runs it):

* the setting (:class:`RobustConfig`): honest clients split by region (US/EU), plus ``H``
  hostile clients;
* the attacks (:func:`attack`), each defined relative to a *base* ``b`` -- the global model
  the client was sent (rounds), or zero in the one-shot setting, where clients start from
  their own initialisations and an "update" is the whole model. With ``h`` the honest
  model the attacker copies:

  - ``scaled``: ``b + scale * (h - b)`` (one-shot: ``scale * h``);
  - ``sign-flip``: ``b - (h - b)`` (one-shot: ``-h``);
  - ``noise``: ``h + e``, ``e`` Gaussian with, per tensor, the standard deviation of that
    tensor of ``h`` (noise as large as the weights);
  - ``none``: no hostile replies at all (the clean baseline; the server's settings stay
    those for ``H`` hostile clients);

* the strategies: Flower's own FedAvg, FedMedian, Krum (``num_malicious_nodes = H``) and
  FedTrimmedAvg (trimming ``H`` replies from each end), each as it is ("unaligned") and with
  re-basin in front ("aligned", :func:`strategies.rebasin`), fed Flower Messages built in
  memory (:func:`aggregate`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rebasin.spec import StateDict
from simulations.settings import check_seeds

Mode = Literal["one-shot", "rounds", "both"]
AttackName = Literal["none", "scaled", "sign-flip", "noise"]
ATTACKS: tuple[str, ...] = get_args(AttackName)
StrategyName = Literal["fedavg", "fedmedian", "krum", "trimmed-mean"]
STRATEGIES: tuple[str, ...] = get_args(StrategyName)
STRATEGY_LABELS: dict[str, str] = {
    "fedavg": "FedAvg",
    "fedmedian": "FedMedian",
    "krum": "Krum",
    "trimmed-mean": "FedTrimmedAvg",
}
VARIANTS: tuple[str, ...] = ("unaligned", "aligned")
OneShotReference = Literal["largest", "merge-many"]
FORMAT = "rebasin-robust/1"


class RobustConfig(BaseModel):
    """Everything that defines a ``rebasin robust`` run (every field lands in the JSON).

    Attributes
    ----------
    mode
        ``one-shot`` (every honest client trains from its own initialisation, one
        aggregation), ``rounds`` (``rounds`` rounds from one shared initial model, honest
        clients training ``local_epochs`` from the current global model) or ``both``.
    seeds
        Distinct, non-negative.
    width
        MLP width multiplier (3 hidden layers of ``512 * width``).
    clients_per_region
        Honest clients in each of the two regions ("us": 80 % of digits 0-4 and 20 % of
        5-9 at ``own_fraction`` 0.8, "eu": the rest), each region's data cut into this many
        disjoint shards.
    hostile
        Hostile clients ``H``; fewer than the honest ones.
    attacks, strategies
        Which to run, in order.
    scale
        Factor of the ``scaled`` attack.
    epochs
        One-shot training epochs.
    rounds, local_epochs
        Rounds and local epochs per round of the ``rounds`` mode.
    reference
        The aligned strategies' reference in the one-shot mode (``largest`` or
        ``merge-many``); the rounds mode aligns to the global model sent.
    limit_per_class, test_limit_per_class
        First ``N`` training / test examples of each class (``None``: all).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = "both"
    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1)
    width: float = Field(0.5, gt=0)
    clients_per_region: int = Field(3, ge=1)
    own_fraction: float = Field(0.8, gt=0.5, le=1)
    hostile: int = Field(2, ge=0)
    attacks: tuple[AttackName, ...] = ATTACKS  # type: ignore[assignment]
    strategies: tuple[StrategyName, ...] = STRATEGIES  # type: ignore[assignment]
    scale: float = Field(10.0, allow_inf_nan=False)
    epochs: int = Field(3, ge=1)
    rounds: int = Field(3, ge=1)
    local_epochs: int = Field(1, ge=1)
    lr: float = Field(0.05, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(128, ge=1)
    limit_per_class: int | None = Field(None, ge=1)
    test_limit_per_class: int | None = Field(None, ge=1)
    reference: OneShotReference = "largest"
    max_iter: int = Field(100, ge=1)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        return check_seeds(value)

    @field_validator("attacks", "strategies")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("give at least one")
        if len(set(value)) != len(value):
            raise ValueError(f"must be distinct, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RobustConfig:
        honest = self.num_honest
        if self.hostile >= honest:
            raise ValueError(
                f"--hostile = {self.hostile}: robust rules need an honest majority, and there "
                f"are {honest} honest clients (2 regions x --clients-per-region "
                f"{self.clients_per_region}); use fewer hostile or more honest clients"
            )
        attacking = [a for a in self.attacks if a != "none"]
        if attacking and self.hostile == 0:
            raise ValueError(f"attacks {attacking} need --hostile >= 1")
        if self.scale in (0.0, 1.0):
            raise ValueError(f"--scale = {self.scale}: a scale of 0 or 1 is no attack")
        return self

    @property
    def num_honest(self) -> int:
        return 2 * self.clients_per_region

    @property
    def num_clients(self) -> int:
        """Replies the server expects when attacked: honest plus hostile."""
        return self.num_honest + self.hostile

    @property
    def modes(self) -> tuple[str, ...]:
        return ("one-shot", "rounds") if self.mode == "both" else (self.mode,)


# ------------------------------------------------------------------------------------------
# clients


def honest_names(clients_per_region: int) -> list[str]:
    """``["us-0", ..., "eu-0", ...]``: the honest clients, region by region."""
    from rebasin.partition import region_names

    return [f"{r}-{i}" for r in region_names(2) for i in range(clients_per_region)]


def victim(j: int, num_honest: int, hostile: int) -> int:
    """The honest client hostile client ``j`` copies: spread evenly over the honest list,
    so that with two hostile clients one copies a "us" client and one an "eu" client."""
    return (j * num_honest) // hostile


def split_honest(
    labels: torch.Tensor, clients_per_region: int, own_fraction: float, seed: int
) -> list[np.ndarray]:
    """Disjoint index arrays, region by region: the US/EU region split, each region's part
    cut into ``clients_per_region`` random shards of equal size (within one)."""
    from rebasin.partition import region_split

    rng = np.random.default_rng(seed)
    shards: list[np.ndarray] = []
    for region in region_split(labels, 2, own_fraction, seed):
        for part in np.array_split(rng.permutation(region), clients_per_region):
            shards.append(np.sort(part))
    return shards


# ------------------------------------------------------------------------------------------
# attacks


def attack(
    kind: str,
    honest: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor] | None = None,
    *,
    scale: float = 10.0,
    generator: torch.Generator | None = None,
) -> StateDict:
    """The hostile model of attack ``kind`` built from the honest model ``honest``.

    ``base`` is the global model the client was sent (``None``: zero, the one-shot case).
    See the module docstring for the definitions. Integer entries are copied unchanged.

    Raises
    ------
    ValueError
        On ``none`` (it makes no model) or an unknown attack.
    """
    if kind not in ATTACKS or kind == "none":
        raise ValueError(f"attack {kind!r} makes no model; expected one of {ATTACKS[1:]}")
    out: StateDict = {}
    for key, h in honest.items():
        h = h.detach()
        if not h.is_floating_point():
            out[key] = h.clone()
            continue
        b = None if base is None else base[key].detach().to(h.dtype)
        if kind == "scaled":
            out[key] = scale * h if b is None else b + scale * (h - b)
        elif kind == "sign-flip":
            out[key] = -h if b is None else b - (h - b)
        else:
            std = float(h.std(correction=0))
            noise = torch.randn(h.shape, generator=generator, dtype=h.dtype)
            out[key] = h + std * noise
    return out


# ------------------------------------------------------------------------------------------
# strategies and Flower messages


def trim_fraction(hostile: int, num_clients: int) -> float:
    """FedTrimmedAvg's ``beta`` that trims exactly ``hostile`` of ``num_clients`` replies
    from each end (Flower cuts ``int(beta * n)``; ``hostile / n`` can round just below)."""
    beta = hostile / num_clients
    while int(beta * num_clients) < hostile:
        beta = math.nextafter(beta, 1.0)
    return beta


def make_strategy(
    name: str,
    aligned: bool,
    cfg: RobustConfig,
    model: torch.nn.Module,
    *,
    reference: str,
    seed: int,
):
    """Flower's strategy ``name`` for ``cfg``'s clients, with re-basin in front if ``aligned``.

    Every strategy accepts one valid reply (``min_train_nodes=1``): what is dropped, and why,
    is in the aligned strategy's round report.
    """
    from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum

    from strategies import rebasin

    classes = {
        "fedavg": FedAvg,
        "fedmedian": FedMedian,
        "krum": Krum,
        "trimmed-mean": FedTrimmedAvg,
    }
    if set(classes) != set(STRATEGIES):
        raise AssertionError("STRATEGIES and the strategy classes disagree")
    if name not in classes:
        raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGIES}")
    kwargs: dict = {"min_train_nodes": 1, "min_available_nodes": 1, "min_evaluate_nodes": 1}
    if name == "krum":
        kwargs["num_malicious_nodes"] = cfg.hostile
    if name == "trimmed-mean":
        kwargs["beta"] = trim_fraction(cfg.hostile, cfg.num_clients)
    if not aligned:
        return classes[name](**kwargs)
    return rebasin(classes[name])(
        **kwargs,
        model=model,
        reference=reference,
        max_iter=cfg.max_iter,
        seed=seed,
        device="cpu",
    )


def reply(node_id: int, state_dict: Mapping[str, torch.Tensor], num_examples: int):
    """A train reply from ``node_id`` as a ClientApp sends it: ``arrays`` and ``metrics``.

    Must run under a ServerApp identity (:func:`simulations.local_grid.server_identity`).
    """
    from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    instruction = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: v.detach().cpu() for k, v in state_dict.items()}),
            "metrics": MetricRecord({"num-examples": int(num_examples)}),
        }
    )
    return Message(content, reply_to=instruction)


def aggregate(
    strategy,
    server_round: int,
    global_model: Mapping[str, torch.Tensor],
    models: Sequence[tuple[int, Mapping[str, torch.Tensor], int]],
) -> tuple[StateDict, dict]:
    """Hand ``(node_id, model, num_examples)`` replies to ``strategy.aggregate_train``.

    Fresh messages every call (Flower's robust strategies pop the arrays they read). An
    aligned strategy is told the global model first, as ``configure_train`` does.

    Returns
    -------
    tuple[StateDict, dict]
        The new global model (``global_model`` itself when the strategy keeps it), and
        ``{"kept_previous", "dropped", "moved"}``: for aligned strategies the dropped nodes
        with reasons and, per node, the fraction of hidden units its permutations moved.
    """
    from flwr.app import ArrayRecord

    from strategies import ReBasin

    aligned = isinstance(strategy, ReBasin)
    if aligned:
        strategy.set_global_arrays(ArrayRecord({k: v.cpu() for k, v in global_model.items()}))
    messages = [reply(node, sd, n) for node, sd, n in models]
    arrays, _ = strategy.aggregate_train(server_round, messages)
    info: dict = {"kept_previous": arrays is None, "dropped": {}, "moved": {}}
    if aligned and strategy.last_round is not None:
        report = strategy.last_round
        info["dropped"] = {str(k): v for k, v in report.dropped.items()}
        info["moved"] = {str(k): moved_fraction(p) for k, p in report.perms.items()}
    if arrays is None:
        return dict(global_model), info
    merged = arrays.to_torch_state_dict()
    return {k: merged[k] for k in global_model}, info


def moved_fraction(perms: Mapping[str, torch.Tensor]) -> float:
    """Share of the hidden units that a model's permutations move (0: the identity)."""
    moved = sum(int((p != torch.arange(p.numel())).sum()) for p in perms.values())
    total = sum(p.numel() for p in perms.values())
    return moved / total if total else 0.0
