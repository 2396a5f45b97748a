"""What the Re-Basin strategies share, independent of Flower: options, client updates, the
round's report, and the permutation spec a strategy works with.

The front ends (:class:`~strategies.rebasin_fedavg.ReBasinFedAvg`,
:class:`~strategies.wrapper.ReBasin` in front of any strategy, and their legacy-API forms)
turn their Flower objects into :class:`ClientUpdate` values; :mod:`strategies.align_step`
screens and aligns them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from rebasin.align import Alignment
from rebasin.names import ReferenceName
from rebasin.permute import Perms, validate_state_dict
from rebasin.spec import PermutationSpec, SpecError

# A child of Flower's logger, so that these lines reach Flower's console handler (and
# `flwr log`) in the same format as FedAvg's own; records still propagate to the root logger.
logger = logging.getLogger("flwr.rebasin")

# The reference names are declared once, in the engine.
Reference = ReferenceName
NodeId = Hashable

# More examples than any client holds: a larger count is a bug or an attack, and counts up
# to it sum exactly in float64 over any realistic number of clients.
MAX_NUM_EXAMPLES = 10**12
DEFAULT_MAX_NORM_RATIO = 1e3


class ReBasinOptions(BaseModel):
    """How the strategies match and merge; validated once, shared by both front ends.

    Attributes
    ----------
    reference
        What client models are aligned to: ``"global"`` the global model sent this round,
        ``"largest"`` the valid reply with the most examples, ``"merge-many"`` no reference
        (MergeMany, Ainsworth et al., appendix).
    max_iter
        Most weight-matching sweeps per client.
    seed
        Seeds the order in which permutations are visited. Every client of a round gets the
        same seed, so identical client models are permuted identically.
    device
        Where matching runs: ``"cuda"`` when available, else ``"cpu"`` by default.
    max_norm_ratio
        A reply whose L2 norm (over all floating-point entries) exceeds this many times
        ``max(||global model||, 1)`` is dropped before it is matched or averaged (see
        :func:`magnitude_problem`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    reference: Reference = "global"
    max_iter: int = Field(default=100, ge=1)
    seed: int = 0
    device: str | None = None
    max_norm_ratio: float = Field(default=DEFAULT_MAX_NORM_RATIO, gt=0)

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            device = torch.device(value)
        except RuntimeError as exc:
            raise ValueError(f"unknown torch device {value!r}: {exc}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {value!r} asked for, but CUDA is not available")
        return value

    @property
    def torch_device(self) -> torch.device:
        """The matching device, with the default filled in."""
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply, as the Flower-independent core sees it.

    Attributes
    ----------
    node_id
        Who sent it (a Message API node id, or a legacy client id).
    weight
        The reported number of examples, unchecked (checked by the align step).
    load
        Converts the reply's arrays to a state dict of CPU tensors; called at most twice (to
        check the reply, then to align it), returning equal tensors each time. May raise on
        malformed arrays: the reply is then dropped with the error's message.
    problem
        Set when the front end already found the reply unusable (for example an error reply);
        the reply is then dropped with this reason.
    """

    node_id: NodeId
    weight: object = None
    load: Callable[[], Mapping[str, torch.Tensor]] | None = None
    problem: str | None = None


@dataclass
class RoundReport:
    """What happened to the replies of one round (exposed on the strategies for metrics).

    Attributes
    ----------
    reference
        The reference choice used.
    received
        Replies received (valid or not).
    valid
        Node ids whose models were merged, in reply order.
    dropped
        Node id -> why its reply was not used.
    alignments
        Node id -> how its model was aligned (see :class:`rebasin.align.Alignment`; with
        the ``"merge-many"`` reference a client is matched several times, against the mean
        of the others, and the fields sum over those matchings).
    kept_previous
        True when the previous global model was kept; ``reason`` says why.
    """

    reference: str
    received: int
    valid: list[NodeId] = field(default_factory=list)
    dropped: dict[NodeId, str] = field(default_factory=dict)
    alignments: dict[NodeId, Alignment] = field(default_factory=dict)
    kept_previous: bool = False
    reason: str = ""

    @property
    def perms(self) -> dict[NodeId, Perms]:
        """Node id -> the permutations applied to its model."""
        return {node: a.perms for node, a in self.alignments.items()}

    @property
    def objective_gains(self) -> dict[NodeId, float]:
        """Node id -> objective gain of matching (see :class:`rebasin.align.Alignment`)."""
        return {node: a.objective_gain for node, a in self.alignments.items()}

    def drop(self, node_id: NodeId, problem: str) -> None:
        """Record and log that ``node_id``'s reply is not used."""
        self.dropped[node_id] = problem
        log_dropped(node_id, problem)

    def keep_previous(self, reason: str) -> None:
        """Record and log that the previous global model is kept, and why."""
        self.kept_previous = True
        self.valid = []
        self.alignments = {}
        self.reason = reason
        logger.warning("Keeping the previous global model: %s", reason)

    def too_few(self, valid: int, min_valid: int) -> None:
        """Keep the previous global model: fewer than ``min_valid`` valid replies."""
        self.keep_previous(
            f"{valid} valid replies of {self.received}, fewer than the {max(min_valid, 1)} "
            "needed to merge"
        )


def resolve_spec(
    model: nn.Module | None,
    spec: PermutationSpec | None,
    example_input: torch.Tensor | None = None,
) -> PermutationSpec:
    """The permutation spec a strategy works with, from an explicit spec or a model.

    A model's own ``permutation_spec()`` is preferred; otherwise the model is traced with
    :func:`rebasin.trace.spec_from_module`. When both are given, ``spec`` is used and must fit
    the model's state dict.

    Raises
    ------
    ValueError
        If neither is given.
    SpecError
        If the spec does not fit the model.
    """
    if spec is None and model is None:
        raise ValueError("give model= (its permutation spec is derived) or spec=")
    if spec is None:
        own = getattr(model, "permutation_spec", None)
        if callable(own):
            spec = own()
        else:
            from rebasin.trace import spec_from_module  # tracing needs torch.fx: load lazily

            spec = spec_from_module(model, example_input)
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    if model is not None:
        spec.check(model.state_dict())
    return spec


def check_global_model(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise unless the global model fits ``spec`` and holds only finite values."""
    try:
        spec.check(state_dict)
    except SpecError as exc:
        raise SpecError(f"the global model does not fit the permutation spec: {exc}") from exc
    validate_state_dict(state_dict, state_dict, name="global model")


def weight_problem(value: object, key: str) -> str | None:
    """Why ``value`` cannot weight a client's model, or ``None`` if it can.

    A weight is a count of examples: a whole number in ``[1, MAX_NUM_EXAMPLES]`` (an int, or a
    float with an integral value).
    """
    if value is None:
        return f"no {key!r} in its metrics"
    if isinstance(value, bool) or not isinstance(value, Real):
        return f"{key!r} must be a single number, got {type(value).__name__} {value!r}"
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        return f"{key!r} must be positive and finite, got {value!r}"
    if not number.is_integer():
        return f"{key!r} must be a whole number of examples, got {value!r}"
    if number > MAX_NUM_EXAMPLES:
        return f"{key!r} = {value!r} is more than the {MAX_NUM_EXAMPLES:.0e} examples allowed"
    return None


def log_dropped(node_id: NodeId, problem: str) -> None:
    """The one warning line written for every reply that is not used."""
    logger.warning("Dropping the reply from node %s: %s", node_id, problem)


def find_setting(strategy: object, name: str, default: Any) -> Any:
    """``strategy``'s setting ``name``, or that of the strategy it wraps (Flower's DP wrappers
    keep the inner strategy in ``.strategy``), else ``default``."""
    while strategy is not None:
        if name in vars(strategy):
            return vars(strategy)[name]
        strategy = vars(strategy).get("strategy")
    return default


_IN_FRONT: dict[tuple[type, type], type] = {}


def in_front(mixin: type, strategy_class: type, base: type, name: str) -> type:
    """The class ``mixin`` + ``strategy_class`` (a subclass of ``base``), made once."""
    if not (isinstance(strategy_class, type) and issubclass(strategy_class, base)):
        raise TypeError(f"takes a {base.__module__}.{base.__name__} class, got {strategy_class!r}")
    if issubclass(strategy_class, mixin):
        return strategy_class
    key = (mixin, strategy_class)
    if key not in _IN_FRONT:
        _IN_FRONT[key] = type(
            name,
            (mixin, strategy_class),
            {
                "__module__": mixin.__module__,
                "__doc__": f"{strategy_class.__name__} after re-basin.",
            },
        )
    return _IN_FRONT[key]
