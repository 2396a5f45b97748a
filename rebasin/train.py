"""Plain supervised training and evaluation loops (shared by clients and simulations)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from rich.progress import Progress
from torch import nn

OptimizerName = Literal["sgd", "adam"]


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
) -> torch.optim.Optimizer:
    """SGD with momentum or Adam over all of ``model``'s parameters."""
    if lr <= 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    if name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
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
) -> float:
    """Train ``model`` in place with cross-entropy; return the last epoch's mean loss.

    With a learning rate schedule of one cosine cycle over all steps when ``optimizer`` is
    SGD (stable for the wide models used here), constant for Adam.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    device = next(model.parameters()).device
    opt = make_optimizer(model, optimizer, lr, weight_decay=weight_decay)
    steps = epochs * len(loader)  # type: ignore[arg-type]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if optimizer == "sgd" else None
    task = progress.add_task(description, total=steps) if progress is not None else None
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    last = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.item() * len(y)
            count += len(y)
            if task is not None:
                progress.advance(task)  # type: ignore[union-attr]
        last = total / max(count, 1)
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
