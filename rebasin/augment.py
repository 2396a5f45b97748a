"""Data augmentation on batches of image tensors: random crop with zero padding, and flips.

The standard CIFAR-10 augmentation (pad 4 pixels, crop back to the image size at a random
offset, mirror left-right with probability 1/2) done on a whole ``(N, C, H, W)`` batch at
once, on whatever device the batch is on: one gather builds every cropped, flipped image, so
no image goes through PIL. The images are already normalised, so the zero padding is the
dataset's mean colour.

Randomness comes from a CPU :class:`torch.Generator` (offsets and flips are drawn there and
moved to the batch's device), so a seed gives the same augmentations on every device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip(
    images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int
) -> torch.Tensor:
    """Crop every image of a batch at its offset into the zero-padded image, then flip some.

    ``out[n, :, i, j] = padded[n, :, i + offsets[n, 0], j' + offsets[n, 1]]`` with
    ``j' = W - 1 - j`` where ``flips[n]`` and ``j' = j`` otherwise; ``padded`` is ``images``
    with ``padding`` zeros on every side. An offset of ``(padding, padding)`` without a flip
    returns the image unchanged.

    Parameters
    ----------
    images
        ``(N, C, H, W)`` floating-point batch.
    offsets
        int64 ``(N, 2)``: row and column offsets, each in ``[0, 2 * padding]``.
    flips
        bool ``(N,)``: which images to mirror left-right.
    padding
        Pixels of zero padding on each side, >= 0.

    Returns
    -------
    torch.Tensor
        ``(N, C, H, W)``, same dtype and device, in channels_last memory order (the order the
        gather produces; call ``.contiguous()`` for the default order).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    if offsets.shape != (n, 2) or flips.shape != (n,):
        raise ValueError(
            f"need offsets of shape ({n}, 2) and flips of shape ({n},), got "
            f"{tuple(offsets.shape)} and {tuple(flips.shape)}"
        )
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if n and (int(offsets.min()) < 0 or int(offsets.max()) > 2 * padding):
        raise ValueError(f"offsets must lie in [0, {2 * padding}]")
    device = images.device
    offsets, flips = offsets.to(device), flips.to(device)
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    rows = offsets[:, :1] + torch.arange(h, device=device)  # (N, H)
    cols = torch.arange(w, device=device).expand(n, w)
    cols = torch.where(flips[:, None], w - 1 - cols, cols) + offsets[:, 1:]  # (N, W)
    batch = torch.arange(n, device=device)[:, None, None]
    # Advanced indices around a slice put their broadcast shape first: (N, H, W, C).
    gathered = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return gathered.permute(0, 3, 1, 2)


class RandomCropFlip:
    """Seeded batch augmentation: crop with ``padding`` and (optionally) mirror, per image.

    Calling it on a batch draws each image's offset uniformly from ``[0, 2 * padding]^2`` and
    its flip with probability 1/2 from the generator seeded with ``seed``; the same seed and
    batches give the same outputs.
    """

    def __init__(self, seed: int, padding: int = 4, flip: bool = True) -> None:
        if padding < 0:
            raise ValueError(f"crop padding must be >= 0, got {padding}")
        self.padding = padding
        self.flip = flip
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=self.generator)
        if self.flip:
            flips = torch.rand(n, generator=self.generator) < 0.5
        else:
            flips = torch.zeros(n, dtype=torch.bool)
        return crop_flip(images, offsets, flips, self.padding)
