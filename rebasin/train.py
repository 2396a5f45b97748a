"""Plain supervised training and evaluation loops (shared by clients and simulations)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from rich.progress import Progress
from torch import nn

from rebasin.augment import RandomCropFlip
from rebasin.names import OptimizerName
from rebasin.recipe import TrainRecipe, make_scheduler, resolve


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy loss, accuracy in [0, 1], and the number of examples."""

    loss: float
    accuracy: float
    num_examples: int


def make_optimizer(
    model: nn.Module,
    name: OptimizerName,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """SGD with momentum (optionally Nesterov's) or Adam over all of ``model``'s parameters."""
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning rate must be finite and > 0, got {lr}")
    if name == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
        )
    if nesterov:
        raise ValueError(f"nesterov needs optimizer 'sgd', got {name!r}")
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


def train(
    model: nn.Module,
    loader: Iterable,
    epochs: int,
    lr: float,
    optimizer: OptimizerName = "sgd",
    weight_decay: float = 0.0,
    progress: Progress | None = None,
    description: str = "train",
    *,
    recipe: TrainRecipe | None = None,
    seed: int = 0,
) -> float:
    """Train ``model`` in place with cross-entropy; return the last epoch's mean loss.

    ``recipe`` (default: :class:`~rebasin.recipe.TrainRecipe`, the original loop: one cosine
    learning-rate cycle over all steps with SGD, constant with Adam) adds augmentation,
    label smoothing (the returned loss is then the smoothed one), the one-cycle schedule,
    Nesterov momentum, channels_last and bf16 autocast; :func:`rebasin.recipe.resolve` says
    what it uses on the model's device. ``seed`` seeds the augmentation.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    recipe = recipe or TrainRecipe()
    device = next(model.parameters()).device
    used = resolve(recipe, device, optimizer, lr)
    layout = torch.channels_last if recipe.channels_last else torch.contiguous_format
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
    opt = make_optimizer(model, optimizer, lr, weight_decay=weight_decay, nesterov=recipe.nesterov)
    steps = epochs * len(loader)  # type: ignore[arg-type]
    sched = make_scheduler(opt, used.schedule, steps, used.peak_lr, recipe.warmup)
    augment = RandomCropFlip(seed, recipe.crop_padding) if recipe.augment else None
    task = progress.add_task(description, total=steps) if progress is not None else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    model.train()
    last = float("nan")
    for _ in range(epochs):
        # Summed on the device in float64 (the same sums as Python floats, without a sync
        # per step on a GPU).
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if augment is not None:
                x = augment(x)
            if x.dim() == 4 and (augment is not None or recipe.channels_last):
                x = x.contiguous(memory_format=layout)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=used.bf16):
                loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.detach().double() * len(y)
            count += len(y)
            if task is not None:
                progress.advance(task)  # type: ignore[union-attr]
        last = float(total) / max(count, 1)
    if recipe.channels_last:
        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-arg]
    model.eval()
    return last


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> EvalResult:
    """Mean cross-entropy loss and accuracy of ``model`` on ``loader`` (eval mode)."""
    device = next(model.parameters()).device
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    if count == 0:
        raise ValueError("evaluate got no data")
    return EvalResult(loss_sum / count, correct / count, count)


@torch.no_grad()
def predict_logits(model: nn.Module, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and labels of ``loader`` (for ensembles and per-class accuracy)."""
    device = next(model.parameters()).device
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        logits.append(model(x.to(device)).cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def logit_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """``{"loss", "accuracy", "per_class_accuracy"}`` of ``logits`` against ``labels``.

    Mean cross-entropy, accuracy in [0, 1], and per class the accuracy on that class's
    examples (NaN for a class with no example).
    """
    loss = float(nn.functional.cross_entropy(logits, labels))
    hit = logits.argmax(1) == labels
    per_class = [
        float(hit[labels == c].float().mean()) if bool((labels == c).any()) else float("nan")
        for c in range(num_classes)
    ]
    return {"loss": loss, "accuracy": float(hit.float().mean()), "per_class_accuracy": per_class}
