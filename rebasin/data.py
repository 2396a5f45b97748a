"""Image classification datasets as in-memory tensors: MNIST and CIFAR-10.

``load_dataset`` returns a :class:`LabeledData` whose ``images`` are float32, NCHW and
normalised with the dataset's usual per-channel mean and standard deviation.

Where the data comes from
-------------------------
The data directory is resolved by :func:`resolve_data_dir`: the explicit argument, else the
environment variable ``REBASIN_DATA_DIR``, else ``./data``.

* MNIST: ``torchvision.datasets.MNIST(root=data_dir)`` (``data_dir/MNIST/raw``).
* CIFAR-10, first match wins:

  1. the torchvision pickle batches ``data_dir/cifar-10-batches-py``;
  2. an ImageFolder directory ``data_dir/cifar10-jpeg/{train,test}/<class>/<image>``;
  3. a tarball ``data_dir/cifar10-jpeg.tar.gz`` of that layout (optionally inside one
     top-level folder), read member by member in memory, never extracted;
  4. a torchvision download into ``data_dir`` when ``download=True``.

  Local copies win over a download, so ``download=True`` never fetches what is already here.
  Images from 2. and 3. are decoded once and cached as a uint8 safetensors file (see
  :func:`resolve_cache_dir`); the cache is keyed by a fingerprint of its source and rebuilt
  when the source changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

from rebasin.image_folder import decode_image_folder
from rebasin.names import DATASET_NAMES, DatasetName

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "REBASIN_DATA_DIR"
CACHE_DIR_ENV = "REBASIN_CACHE_DIR"
DEFAULT_DATA_DIR = Path("data")
# Relative to the working directory, like ``./data``; never the data directory itself, which
# may be read-only and shared.
DEFAULT_CACHE_DIR = Path(".cache") / "rebasin"

# Per-channel statistics of the training sets in [0, 1] pixel units (the values in common use).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_IMAGE_SIZE = (32, 32)
CIFAR10_JPEG_DIRNAME = "cifar10-jpeg"
CIFAR10_TARBALL_NAME = "cifar10-jpeg.tar.gz"
CIFAR10_BATCHES_DIRNAME = "cifar-10-batches-py"
# Cache format version: bump when the cached layout or decoding changes.
_CACHE_VERSION = "1"


@dataclass(frozen=True)
class LabeledData:
    """Images and integer labels of a classification dataset, held in memory.

    Attributes
    ----------
    images
        float32 tensor ``(N, C, H, W)``, normalised per channel.
    labels
        int64 tensor ``(N,)`` with values in ``range(len(classes))``.
    classes
        Class names; ``classes[k]`` names label ``k``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.float32 or self.images.dim() != 4:
            raise ValueError(
                "images must be a float32 tensor of shape (N, C, H, W), got "
                f"{self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                f"labels must be an int64 tensor of shape (N,), got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and (
            int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)
        ):
            raise ValueError(
                f"labels must lie in [0, {len(self.classes)}), got "
                f"[{int(self.labels.min())}, {int(self.labels.max())}]"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> np.ndarray:
        """Number of examples of each class, shape ``(num_classes,)``."""
        return np.bincount(self.labels.numpy(), minlength=self.num_classes)

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> LabeledData:
        """The examples at ``indices`` (a copy), in that order.

        Raises
        ------
        ValueError
            If an index is out of range or the indices are not integers.
        """
        idx = torch.as_tensor(np.asarray(indices))
        if idx.numel() == 0:
            idx = idx.to(torch.int64)
        if idx.dim() != 1 or idx.is_floating_point() or idx.dtype == torch.bool:
            raise ValueError(f"indices must be a 1-D integer sequence, got {idx.dtype} {idx.shape}")
        idx = idx.to(torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise ValueError(
                f"indices must lie in [0, {len(self)}), got [{int(idx.min())}, {int(idx.max())}]"
            )
        return LabeledData(self.images[idx], self.labels[idx], list(self.classes))

    def loader(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
        """A single-process DataLoader of ``(images, labels)`` batches.

        With ``shuffle=True`` the order is drawn from a generator seeded with ``seed``, so the
        same seed gives the same batches.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(
            TensorDataset(self.images, self.labels),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
        )


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$REBASIN_DATA_DIR``, else ``./data``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV, "")
    if from_env:
        return Path(from_env).expanduser()
    return DEFAULT_DATA_DIR


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where decoded images are cached: ``cache_dir`` if given, else ``$REBASIN_CACHE_DIR``,
    else ``./.cache/rebasin``; never the data directory (it may be read-only and shared)."""
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(CACHE_DIR_ENV, "")
    if from_env:
        return Path(from_env).expanduser()
    return DEFAULT_CACHE_DIR


def load_dataset(
    name: DatasetName,
    train: bool,
    data_dir: str | Path | None = None,
    download: bool = False,
    *,
    cache_dir: str | Path | None = None,
    limit_per_class: int | None = None,
) -> LabeledData:
    """Load the train or test split of MNIST or CIFAR-10 into memory.

    Parameters
    ----------
    name
        ``"mnist"`` or ``"cifar10"``.
    train
        The training split if true, else the test split.
    data_dir
        Data directory (see :func:`resolve_data_dir`).
    download
        Let torchvision download the data when no local copy is found.
    cache_dir
        Where CIFAR-10 decoded from JPEGs is cached (see :func:`resolve_cache_dir`).
    limit_per_class
        Keep only the first ``limit_per_class`` examples of each class (in dataset order),
        for quick runs.

    Raises
    ------
    FileNotFoundError
        If the data is not in ``data_dir`` and ``download`` is false; the message names the
        directory and every location that was looked at.
    ValueError
        On an unknown name, a bad ``limit_per_class``, or malformed image files.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASET_NAMES}")
    if limit_per_class is not None and limit_per_class < 1:
        raise ValueError(f"limit_per_class must be >= 1, got {limit_per_class}")
    root = resolve_data_dir(data_dir)
    split = "train" if train else "test"
    if name == "mnist":
        pixels, labels, classes = _load_mnist(root, train, download)
    else:
        pixels, labels, classes = _load_cifar10(root, split, download, cache_dir)
    if limit_per_class is not None:
        keep = _first_per_class(labels, limit_per_class)
        pixels, labels = pixels[keep], labels[keep]
    mean, std = NORMALIZATION[name]
    data = LabeledData(normalize(pixels, mean, std), labels, classes)
    logger.info("loaded %s %s: %d examples from %s", name, split, len(data), root)
    return data


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` pixels -> float32 ``(pixel / 255 - mean) / std`` per channel."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != len(mean):
        raise ValueError(
            f"expected uint8 pixels of shape (N, {len(mean)}, H, W), got {pixels.dtype} "
            f"{tuple(pixels.shape)}"
        )
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    out = pixels.to(torch.float32).div_(255.0)
    return out.sub_(m).div_(s)


def _first_per_class(labels: torch.Tensor, limit: int) -> torch.Tensor:
    """Indices of the first ``limit`` examples of every class, in dataset order."""
    keep = torch.zeros(len(labels), dtype=torch.bool)
    for c in torch.unique(labels).tolist():
        keep[torch.nonzero(labels == c).flatten()[:limit]] = True
    return torch.nonzero(keep).flatten()


# --------------------------------------------------------------------------------------------
# MNIST


def _load_mnist(root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor, list]:
    from torchvision.datasets import MNIST

    raw = root / "MNIST" / "raw"
    # torchvision needs all four files to accept the folder, whichever split is asked for.
    needed = [
        raw / f"{prefix}-{kind}-ubyte"
        for prefix in ("train", "t10k")
        for kind in ("images-idx3", "labels-idx1")
    ]
    missing = [p.name for p in needed if not p.is_file()]
    if missing and not download:
        raise FileNotFoundError(
            f"MNIST not found in data directory {root}: looked for {', '.join(missing)} in "
            f"{raw}. Download it (needs internet: download=True, or "
            f"`rebasin simulate --download`), or point the data directory (argument, "
            f"--data-dir or ${DATA_DIR_ENV}) at a folder that holds MNIST/raw."
        )
    dataset = MNIST(root=str(root), train=train, download=download)
    pixels = dataset.data.unsqueeze(1).contiguous()  # (N, 28, 28) -> (N, 1, 28, 28)
    labels = dataset.targets.to(torch.int64)
    return pixels, labels, list(dataset.classes)


# --------------------------------------------------------------------------------------------
# CIFAR-10


def _load_cifar10(
    root: Path, split: str, download: bool, cache_dir: str | Path | None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    batches = root / CIFAR10_BATCHES_DIRNAME
    folder = root / CIFAR10_JPEG_DIRNAME
    tarball = root / CIFAR10_TARBALL_NAME
    if batches.is_dir():
        return _load_cifar10_torchvision(root, split, download=False)
    if folder.is_dir():
        return _load_cifar10_cached(folder, split, root, cache_dir)
    if tarball.is_file():
        return _load_cifar10_cached(tarball, split, root, cache_dir)
    if download:
        return _load_cifar10_torchvision(root, split, download=True)
    raise FileNotFoundError(
        f"CIFAR-10 not found in data directory {root}: looked for the torchvision batches "
        f"{batches}, an ImageFolder directory {folder}/{{train,test}}/<class>/*.jpg and a "
        f"tarball {tarball}. Download it (needs internet: download=True, or "
        f"`rebasin simulate --download`), or point the data directory (argument, "
        f"--data-dir or ${DATA_DIR_ENV}) at a folder that holds one of them."
    )


def _load_cifar10_torchvision(
    root: Path, split: str, download: bool
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from torchvision.datasets import CIFAR10

    dataset = CIFAR10(root=str(root), train=split == "train", download=download)
    pixels = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return pixels, labels, list(dataset.classes)


def _load_cifar10_cached(
    source: Path, split: str, root: Path, cache_dir: str | Path | None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read the split from the cache, decoding ``source`` (folder or tarball) on a miss."""
    fingerprint = _source_fingerprint(source)
    write_dir = resolve_cache_dir(cache_dir)
    # A cache shipped next to the data is also accepted (read-only data directories).
    for directory in dict.fromkeys([write_dir, root]):
        cached = _read_cache(directory / _cache_name(split), fingerprint)
        if cached is not None:
            logger.debug("CIFAR-10 %s from cache %s", split, directory)
            return cached
    logger.info("decoding CIFAR-10 images from %s (once; cached in %s)", source, write_dir)
    decoded = decode_image_folder(source, CIFAR10_CLASSES, CIFAR10_IMAGE_SIZE)
    write_dir.mkdir(parents=True, exist_ok=True)
    for name, (pixels, labels) in decoded.items():
        _write_cache(write_dir / _cache_name(name), pixels, labels, fingerprint)
    pixels, labels = decoded[split]
    return pixels, labels, list(CIFAR10_CLASSES)


def _cache_name(split: str) -> str:
    return f"cifar10-jpeg-{split}.safetensors"


def _source_fingerprint(source: Path) -> str:
    """A content fingerprint that survives copying (mtimes do not).

    A tarball is hashed whole (tens of MB, well under a second); for a folder the sorted
    relative paths and sizes of its files are hashed, which is cheap for 60,000 files.
    """
    digest = hashlib.sha256()
    if source.is_file():
        with source.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    else:
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            digest.update(
                f"{path.relative_to(source).as_posix()}\0{path.stat().st_size}\n".encode()
            )
    # Decoded pixels may differ between JPEG decoder builds, so the Pillow version is part of it.
    return f"v{_CACHE_VERSION}:pillow-{PIL.__version__}:{digest.hexdigest()}"


def _read_cache(
    path: Path, fingerprint: str
) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("fingerprint") != fingerprint:
            logger.info("cache %s is stale (its source changed); decoding again", path)
            return None
        tensors = load_file(str(path))
        return tensors["pixels"], tensors["labels"], json.loads(metadata["classes"])
    except Exception as err:  # a truncated or foreign file: rebuild rather than fail
        logger.warning("ignoring unreadable cache %s: %s", path, err)
        return None


def _write_cache(path: Path, pixels: torch.Tensor, labels: torch.Tensor, fingerprint: str) -> None:
    """Write atomically, so that concurrent loaders never read a half-written file."""
    metadata = {"fingerprint": fingerprint, "classes": json.dumps(list(CIFAR10_CLASSES))}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file({"pixels": pixels.contiguous(), "labels": labels}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
