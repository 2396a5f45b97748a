"""The tiny ``rebasin simulate`` run the simulate tests share (numbers meaningless; files and
their agreement are what is checked): 30 MNIST training examples per class, one epoch, an MLP
of width 0.125."""

from __future__ import annotations

TINY = [
    "simulate",
    "--scenario", "us-eu",
    "--dataset", "mnist",
    "--model", "mlp",
    "--width", "0.125",
    "--epochs", "1",
    "--batch-size", "32",
    "--limit-per-class", "30",
    "--test-limit-per-class", "30",
    "--lambdas", "3",
    "--max-iter", "20",
]  # fmt: skip
