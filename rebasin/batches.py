"""Batches of tensors held on one device (a GPU): no DataLoader, no copies per step.

:class:`DeviceBatches` is what :func:`rebasin.train.train` and the evaluation loops take
instead of a ``DataLoader`` when the whole dataset fits in device memory: every epoch it
slices a shuffled index into ``(images, labels)`` batches on the device. The shuffle is
drawn from a CPU generator seeded with ``seed``, so the order does not depend on the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch


class DeviceBatches:
    """Shuffled (or ordered) batches of ``images`` and ``labels`` on their device.

    Parameters
    ----------
    images, labels
        ``(N, ...)`` and ``(N,)`` tensors on the same device.
    batch_size
        Examples per batch, >= 1.
    shuffle
        A new random order every epoch (from the generator seeded with ``seed``).
    drop_last
        Leave out the last, smaller batch (keeps a BatchNorm batch from being tiny).
    on_epoch_end
        Called as ``(epoch, seconds)`` after each epoch's last batch was consumed, with the
        wall time since the epoch's first batch (the device is synchronised first).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        on_epoch_end: Callable[[int, float], None] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if images.device != labels.device:
            raise ValueError(f"images on {images.device} but labels on {labels.device}")
        if drop_last and len(images) < batch_size:
            raise ValueError(f"drop_last with {len(images)} examples < batch_size {batch_size}")
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.generator = torch.Generator().manual_seed(seed)
        self.on_epoch_end = on_epoch_end
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.images)
        start = time.perf_counter()
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.images.device)
        for k in range(len(self)):
            lo, hi = k * self.batch_size, min(n, (k + 1) * self.batch_size)
            if self.shuffle:
                idx = order[lo:hi]
                yield self.images[idx], self.labels[idx]
            else:
                yield self.images[lo:hi], self.labels[lo:hi]
        if self.on_epoch_end is not None:
            if self.images.is_cuda:
                torch.cuda.synchronize(self.images.device)
            self.on_epoch_end(self.epoch, time.perf_counter() - start)
        self.epoch += 1
