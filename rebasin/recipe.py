"""How a model is trained, beyond epochs and learning rate: a :class:`TrainRecipe`.

The recipe holds the CIFAR-10 training options of :func:`rebasin.train.train`: batch
augmentation (:mod:`rebasin.augment`), label smoothing, the learning-rate schedule (cosine,
one-cycle or constant), Nesterov momentum, channels_last memory order and bf16 autocast.
``TrainRecipe()`` is the project's original loop: no augmentation, fp32, contiguous tensors,
SGD with momentum 0.9 and one cosine cycle (Adam: a constant rate).
:meth:`TrainRecipe.for_dataset` gives the defaults per dataset: CIFAR-10 turns on
augmentation, channels_last for convolutional models and bf16 where the hardware has it;
MNIST keeps the original loop.

bf16 support (:func:`bf16_supported`)
------------------------------------
* CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and newer).
* CPU: only a CPU with bf16 matrix or vector instructions runs bf16 faster than fp32; others
  emulate it, slower. On Linux the CPU flags in ``/proc/cpuinfo`` are read: ``amx_bf16`` or
  ``avx512_bf16`` (x86), ``bf16`` (ARM). Elsewhere the answer is no. (torch's
  ``_is_mkldnn_bf16_supported()`` is not used: it also says yes for plain AVX-512, which has
  no bf16 arithmetic.)
"""

from __future__ import annotations

import functools
import math
import platform
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from rebasin.names import BF16_MODES, SCHEDULE_NAMES, Bf16Mode, ScheduleName

CPU_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})
CPUINFO = Path("/proc/cpuinfo")
# One-cycle shape (Smith & Topin 2017): start at max_lr / 25, end at max_lr / 25 / 1e4.
ONECYCLE_DIV = 25.0
ONECYCLE_FINAL_DIV = 1e4


@dataclass(frozen=True)
class TrainRecipe:
    """Training options; the defaults are the project's original loop.

    Attributes
    ----------
    augment
        Random crop with ``crop_padding`` zero pixels and a left-right flip, per image of each
        batch (:class:`rebasin.augment.RandomCropFlip`, seeded by ``train``'s ``seed``).
    crop_padding
        Padding of the random crop, in pixels.
    label_smoothing
        In ``[0, 1)``: the target puts ``1 - eps`` on the label and ``eps`` spread evenly over
        all classes (``torch.nn.CrossEntropyLoss(label_smoothing=eps)``).
    schedule
        ``"cosine"`` (one cosine cycle from the learning rate to 0 over all steps),
        ``"onecycle"`` (linear warm-up from ``max_lr / 25`` to ``max_lr`` over the first
        ``warmup`` of the steps, then linear decay to ``max_lr / 2.5e5``) or ``"constant"``.
        ``None``: cosine with SGD, constant with Adam (the original behaviour).
    max_lr
        Peak learning rate of the one-cycle schedule (default: the learning rate).
    warmup
        Share of the steps the one-cycle schedule spends warming up, in ``(0, 1)``.
    nesterov
        Nesterov momentum (SGD only).
    channels_last
        Train in channels_last memory order (4-D weights and inputs); the model is returned
        in the default order, so its state dict is contiguous.
    bf16
        bf16 autocast: ``"auto"`` where :func:`bf16_supported`, ``"on"`` always (an error on
        a CUDA device without bf16), ``"off"`` never.
    """

    augment: bool = False
    crop_padding: int = 4
    label_smoothing: float = 0.0
    schedule: ScheduleName | None = None
    max_lr: float | None = None
    warmup: float = 0.25
    nesterov: bool = False
    channels_last: bool = False
    bf16: Bf16Mode = "off"

    def __post_init__(self) -> None:
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int):
            raise ValueError(f"crop_padding must be an integer, got {self.crop_padding!r}")
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if not (math.isfinite(self.label_smoothing) and 0.0 <= self.label_smoothing < 1.0):
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.schedule is not None and self.schedule not in SCHEDULE_NAMES:
            raise ValueError(f"schedule must be one of {SCHEDULE_NAMES}, got {self.schedule!r}")
        if self.max_lr is not None and not (math.isfinite(self.max_lr) and self.max_lr > 0):
            raise ValueError(f"max_lr must be finite and > 0, got {self.max_lr}")
        if not (math.isfinite(self.warmup) and 0.0 < self.warmup < 1.0):
            raise ValueError(f"warmup must lie in (0, 1), got {self.warmup}")
        if self.bf16 not in BF16_MODES:
            raise ValueError(f"bf16 must be one of {BF16_MODES}, got {self.bf16!r}")

    @classmethod
    def for_dataset(cls, dataset: str, model: str = "mlp", **overrides: object) -> TrainRecipe:
        """The defaults for ``dataset``, with ``overrides`` (``None`` values are ignored).

        CIFAR-10: augmentation on, bf16 ``"auto"``, channels_last for the convolutional
        models. MNIST (and anything else): the original loop.
        """
        base = cls()
        if dataset == "cifar10":
            base = replace(base, augment=True, bf16="auto", channels_last=model != "mlp")
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(base, **given)  # type: ignore[arg-type]

    def as_dict(self) -> dict:
        """The recipe as plain JSON data."""
        return asdict(self)


@dataclass(frozen=True)
class ResolvedRecipe:
    """What a training run actually used, on its device (recorded in results)."""

    device: str
    optimizer: str
    schedule: str
    peak_lr: float
    augment: bool
    crop_padding: int
    label_smoothing: float
    nesterov: bool
    channels_last: bool
    bf16: bool
    bf16_requested: str
    bf16_supported: bool

    def as_dict(self) -> dict:
        return asdict(self)


# Fields of a resolved recipe that describe the machine, not the training it gave.
MACHINE_FIELDS = ("bf16_supported",)


def training_identity(resolved: dict) -> dict:
    """What trained, from a resolved recipe's dict: without :data:`MACHINE_FIELDS`, so that
    two runs compare equal where they trained alike on machines that differ (``bf16 = "off"``
    is fp32 on a CPU with bf16 units and on one without)."""
    return {k: v for k, v in resolved.items() if k not in MACHINE_FIELDS}


def resolve(recipe: TrainRecipe, device: torch.device | str, optimizer: str, lr: float):
    """The settings ``recipe`` gives on ``device`` with ``optimizer`` and learning rate ``lr``.

    Raises
    ------
    ValueError
        Nesterov with Adam; bf16 ``"on"`` on a CUDA device without bf16.
    """
    device = torch.device(device)
    if recipe.nesterov and optimizer != "sgd":
        raise ValueError(f"nesterov needs optimizer 'sgd', got {optimizer!r}")
    supported = bf16_supported(device)
    if recipe.bf16 == "on" and device.type == "cuda" and not supported:
        raise ValueError(f"bf16 = 'on', but CUDA device {device} has no bf16 support")
    use_bf16 = recipe.bf16 == "on" or (recipe.bf16 == "auto" and supported)
    schedule = recipe.schedule or ("cosine" if optimizer == "sgd" else "constant")
    peak = recipe.max_lr if schedule == "onecycle" and recipe.max_lr is not None else lr
    return ResolvedRecipe(
        device=str(device),
        optimizer=optimizer,
        schedule=schedule,
        peak_lr=float(peak),
        augment=recipe.augment,
        crop_padding=recipe.crop_padding,
        label_smoothing=recipe.label_smoothing,
        nesterov=recipe.nesterov,
        channels_last=recipe.channels_last,
        bf16=use_bf16,
        bf16_requested=recipe.bf16,
        bf16_supported=supported,
    )


def make_scheduler(
    opt: torch.optim.Optimizer, schedule: str, steps: int, peak_lr: float, warmup: float
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-step learning-rate scheduler of ``schedule`` over ``steps`` optimizer steps."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=peak_lr,
            total_steps=steps,
            pct_start=warmup,
            anneal_strategy="linear",
            cycle_momentum=False,  # keep the optimizer's momentum (and Nesterov) fixed
            div_factor=ONECYCLE_DIV,
            final_div_factor=ONECYCLE_FINAL_DIV,
        )
    if schedule == "constant":
        return None
    raise ValueError(f"schedule must be one of {SCHEDULE_NAMES}, got {schedule!r}")


def bf16_supported(device: torch.device | str) -> bool:
    """Whether ``device`` computes in bf16 natively (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_has_bf16()
    return False


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU lists a bf16 instruction-set flag (Linux ``/proc/cpuinfo``)."""
    return bool(cpu_flags() & CPU_BF16_FLAGS)


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The CPU feature flags in ``cpuinfo`` (``flags`` on x86, ``Features`` on ARM)."""
    if platform.system() != "Linux" or not cpuinfo.is_file():
        return frozenset()
    flags: set[str] = set()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)
