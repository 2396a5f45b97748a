"""Where the tests find data (as the CLI does), and small CIFAR-10-shaped data sets of their own.

The data directory is resolved like the CLI's: ``$REBASIN_DATA_DIR``, else ``./data``, else
the checkout's ``data/`` (pytest run from elsewhere). A fresh machine has only what README's
first command leaves there: MNIST. Tests that need CIFAR-10 use :func:`synthetic_cifar10`;
tests of the real CIFAR-10 copy call :func:`require` first, which skips where the copy is
absent, and fails under ``CI=true`` (CI always has it).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from rebasin.data import CIFAR10_CLASSES, CIFAR10_TARBALL_NAME, DATA_DIR_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def find_data_dir() -> Path:
    """The data directory the tests use, as an absolute path (subprocesses inherit it)."""
    from_env = os.environ.get(DATA_DIR_ENV, "")
    if from_env:
        return Path(from_env).expanduser().resolve()
    for candidate in (Path("data"), REPO_ROOT / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return (REPO_ROOT / "data").resolve()


def has_mnist(data_dir: Path) -> bool:
    return all((data_dir / "MNIST" / "raw" / name).is_file() for name in MNIST_FILES)


def has_cifar10(data_dir: Path) -> bool:
    return (data_dir / CIFAR10_TARBALL_NAME).is_file() or (data_dir / "cifar10-jpeg").is_dir()


def require(dataset: str, data_dir: Path) -> None:
    """Skip the calling test unless ``dataset`` is in ``data_dir``; under ``CI=true``, fail."""
    present = has_mnist(data_dir) if dataset == "mnist" else has_cifar10(data_dir)
    if present:
        return
    message = (
        f"{dataset} not found in the data directory {data_dir} (set ${DATA_DIR_ENV}, or "
        "fetch it: `rebasin simulate --download ...`)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; CI must have it", pytrace=False)
    pytest.skip(message)


# ------------------------------------------------------------------------------------------
# synthetic CIFAR-10 (lossless PNGs of solid colours, so pixels and labels check exactly)


def color_of(split: str, label: int, index: int) -> tuple[int, int, int]:
    """A distinct solid colour per image, so that order and labels can be checked exactly."""
    return (10 * label + index % 10, 100 + (split == "test") * 50 + index // 10, 200 - label)


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")  # lossless: exact pixels
    return buffer.getvalue()


def add_bytes(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


def synthetic_members(per_class: dict[str, int], prefix: str = "") -> dict[str, bytes]:
    """ImageFolder members ``{prefix}{split}/{class}/{index:04d}.png``, in reverse order
    (the loader must sort by file name), plus files that are not images."""
    members = {}
    for split, count in per_class.items():
        for label, name in enumerate(CIFAR10_CLASSES):
            for index in reversed(range(count)):
                members[f"{prefix}{split}/{name}/{index:04d}.png"] = png_bytes(
                    color_of(split, label, index)
                )
    members[f"{prefix}README.txt"] = b"not an image"
    members[f"{prefix}train/cat/notes.txt"] = b"ignored"
    return members


def write_tarball(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in members.items():
            add_bytes(archive, name, payload)
    return path


def synthetic_cifar10(root: Path, per_class: dict[str, int], layout: str = "folder") -> Path:
    """A CIFAR-10-shaped data directory at ``root``: ``layout`` ``"folder"``
    (``cifar10-jpeg/{train,test}/<class>/``) or ``"tarball"`` (``cifar10-jpeg.tar.gz``)."""
    root.mkdir(parents=True, exist_ok=True)
    if layout == "tarball":
        write_tarball(root / CIFAR10_TARBALL_NAME, synthetic_members(per_class))
        return root
    if layout != "folder":
        raise ValueError(f"unknown layout {layout!r}")
    for name, payload in synthetic_members(per_class, "cifar10-jpeg/").items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    return root
