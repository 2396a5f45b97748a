"""Decode an ImageFolder (``<split>/<class>/<image>``), from a directory or a tarball read
member by member in memory (never extracted), into uint8 tensors; used by
:mod:`rebasin.data` for CIFAR-10 as JPEG files."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

SPLITS: tuple[str, ...] = ("train", "test")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})


def decode_image_folder(
    source: str | Path,
    classes: Sequence[str],
    image_size: tuple[int, int],
    splits: Sequence[str] = SPLITS,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Decode ``<split>/<class>/<image>`` files from a directory or a ``.tar.gz`` into tensors.

    A tarball may hold the split folders at its top or inside one top-level folder. Its members
    are read in memory and never extracted; an absolute or ``..`` member name, or a link or
    device member inside the split folders, raises ``ValueError``. Files other than images
    (``.jpg``, ``.jpeg``, ``.png``) are ignored.

    Parameters
    ----------
    source
        Directory or tarball.
    classes
        The expected class folder names; ``classes[k]`` becomes label ``k``. Every split must
        hold exactly these folders.
    image_size
        Expected ``(width, height)`` of every image.
    splits
        Split folder names to decode.

    Returns
    -------
    dict
        ``split -> (pixels uint8 (N, 3, H, W), labels int64 (N,))``, sorted by class, then by
        file name, so the order does not depend on the archive's member order.
    """
    source = Path(source)
    if source.is_dir():
        items = _iter_directory_images(source, splits)
    elif source.is_file():
        items = _iter_tarball_images(source, splits)
    else:
        raise FileNotFoundError(f"image folder or tarball {source} does not exist")
    found: dict[str, dict[str, list[tuple[str, bytes]]]] = {s: {} for s in splits}
    label_of = {name: k for k, name in enumerate(classes)}
    for split, class_name, file_name, payload in items:
        found[split].setdefault(class_name, []).append((file_name, payload))
    for split in splits:
        if set(found[split]) != set(classes):
            raise ValueError(
                f"{source}: split {split!r} must hold the class folders {sorted(classes)}, found "
                f"{sorted(found[split])}"
            )
    total = sum(len(files) for per_class in found.values() for files in per_class.values())
    result: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with _progress() as progress:
        task = progress.add_task(f"decoding {source.name}", total=total)
        for split in splits:
            pixel_list: list[np.ndarray] = []
            label_list: list[int] = []
            for class_name in classes:
                for file_name, payload in sorted(found[split][class_name]):
                    where = f"{split}/{class_name}/{file_name}"
                    pixel_list.append(_decode_image(payload, image_size, f"{source}: {where}"))
                    label_list.append(label_of[class_name])
                    progress.advance(task)
            pixels = torch.from_numpy(np.stack(pixel_list)).permute(0, 3, 1, 2).contiguous()
            result[split] = (pixels, torch.tensor(label_list, dtype=torch.int64))
    return result


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    )


def _decode_image(payload: bytes, image_size: tuple[int, int], where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(payload)) as image:
            if image.size != tuple(image_size):
                raise ValueError(f"{where}: expected a {image_size} image, got {image.size}")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"{where}: not a readable image ({err})") from err


def _split_member(parts: Sequence[str], splits: Sequence[str]) -> tuple[str, str, str] | None:
    """``(split, class, file)`` for ``split/class/file`` or ``top/split/class/file``."""
    if len(parts) == 4:
        parts = parts[1:]
    if len(parts) == 3 and parts[0] in splits:
        return parts[0], parts[1], parts[2]
    return None


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _iter_directory_images(
    root: Path, splits: Sequence[str]
) -> Iterator[tuple[str, str, str, bytes]]:
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            raise ValueError(f"{root}: missing split folder {split!r}")
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            for path in sorted(class_dir.iterdir()):
                if path.is_file() and _is_image_name(path.name):
                    yield split, class_dir.name, path.name, path.read_bytes()


def _iter_tarball_images(
    tarball: Path, splits: Sequence[str]
) -> Iterable[tuple[str, str, str, bytes]]:
    # Stream mode ("r|*") reads the compressed archive once, front to back, without seeking.
    with tarfile.open(tarball, mode="r|*") as archive:
        for member in archive:
            parts = _safe_member_parts(member.name, tarball)
            located = _split_member(parts, splits)
            if member.isdir() or located is None:
                continue
            split, class_name, file_name = located
            if not member.isfile():
                raise ValueError(
                    f"{tarball}: member {member.name!r} is a link or special file; only regular "
                    "image files are accepted"
                )
            if not _is_image_name(file_name):
                continue
            handle = archive.extractfile(member)
            if handle is None:  # pragma: no cover - isfile() members always have data
                raise ValueError(f"{tarball}: member {member.name!r} has no data")
            yield split, class_name, file_name, handle.read()


def _safe_member_parts(name: str, tarball: Path) -> list[str]:
    """Split a member name into path parts, refusing names that could escape a directory.

    Nothing is written to disk, but a name that would escape on extraction marks a crafted
    archive, so it is refused rather than silently reinterpreted.
    """
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts or (posix.parts and ":" in posix.parts[0]):
        raise ValueError(f"{tarball}: unsafe member name {name!r} (absolute or contains '..')")
    return [p for p in posix.parts if p != "."]
