"""Global-model checkpoints: one safetensors file per round, validated when read back.

A checkpoint is ``<dir>/round-<NNNN>.safetensors``: the global model's state dict and string
metadata (``format``, ``round`` and the model's :class:`server.identity.ModelIdentity`). Files are
written atomically (a temporary file renamed into place), so a crash mid-write never leaves a
truncated checkpoint under the final name. Reading never unpickles anything.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rebasin.permute import validate_state_dict
from server.identity import IdentityError, ModelIdentity

logger = logging.getLogger("flwr.rebasin." + __name__)

CHECKPOINT_FORMAT = "rebasin-fl-checkpoint/1"
_ROUND_FILE = re.compile(r"^round-(\d{4,})\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, not ours, or does not fit the model."""


@dataclass(frozen=True)
class Checkpoint:
    """A global model read back from disk.

    Attributes
    ----------
    path
        The file it came from.
    round
        The server round after which it was written (0: the initial model).
    state_dict
        The model's tensors (CPU).
    metadata
        All string metadata stored with it, ``format`` and ``round`` included.
    """

    path: Path
    round: int
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str]


def checkpoint_path(directory: str | Path, server_round: int) -> Path:
    """Where the checkpoint of ``server_round`` lives in ``directory``."""
    return Path(directory) / f"round-{server_round:04d}.safetensors"


def write_safetensors(
    path: str | Path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Write ``state_dict`` and string ``metadata`` to ``path`` as safetensors, atomically.

    The file is written beside ``path`` and renamed into place, so a crash mid-write never
    leaves a truncated file under the final name.
    """
    path = Path(path)
    # safetensors refuses views that share storage; a contiguous CPU copy is always safe.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=dict(metadata))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(
    directory: str | Path,
    server_round: int,
    state_dict: Mapping[str, torch.Tensor],
    identity: ModelIdentity | None = None,
) -> Path:
    """Write ``state_dict`` (of the model ``identity``) as the checkpoint of ``server_round``.

    Returns the checkpoint's path.

    Raises
    ------
    CheckpointError
        If ``server_round`` is negative or a value is not a tensor.
    """
    if server_round < 0:
        raise CheckpointError(f"server round must be >= 0, got {server_round}")
    extra = identity.to_metadata() if identity is not None else {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{key!r} is a {type(value).__name__}, not a tensor")
    path = checkpoint_path(directory, server_round)
    header = {"format": CHECKPOINT_FORMAT, "round": str(server_round), **extra}
    write_safetensors(path, state_dict, header)
    logger.info("checkpoint of round %d written to %s", server_round, path)
    return path


def load_checkpoint(
    path: str | Path,
    reference: Mapping[str, torch.Tensor] | None = None,
    identity: ModelIdentity | None = None,
) -> Checkpoint:
    """Read and check a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path
        The checkpoint file.
    reference
        When given, the checkpoint must have exactly its keys, shapes and dtypes (a model's
        ``state_dict()``); floating-point values must be finite either way.
    identity
        When given, the checkpoint must be of this model (so that a checkpoint of another
        run is refused); widths are compared as numbers.

    Raises
    ------
    CheckpointError
        Naming the file and the problem: missing file, not a safetensors file (corrupt or
        truncated), not a checkpoint of this format, a bad round, a model identity mismatch, or
        tensors that do not fit ``reference`` or are not finite.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a safetensors file: {exc}"
        ) from exc
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {metadata.get('format')!r}, "
            f"expected {CHECKPOINT_FORMAT!r}"
        )
    round_text = metadata.get("round", "")
    # ASCII digits only: str.isdigit() also accepts "²", which int() then refuses.
    if not re.fullmatch(r"[0-9]+", round_text):
        raise CheckpointError(f"checkpoint {path} has a bad round {round_text!r}")
    if identity is not None:
        try:
            field = identity.difference(metadata, f"checkpoint {path}")
        except IdentityError as exc:
            raise CheckpointError(str(exc)) from None
        if field is not None:
            raise CheckpointError(
                f"checkpoint {path} was written for {field}={metadata.get(field)!r}, "
                f"but this run has {field}={identity.to_metadata()[field]!r}"
            )
    try:
        if reference is not None:
            validate_state_dict(state_dict, reference, name=f"checkpoint {path}")
        else:
            for key, tensor in state_dict.items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise ValueError(f"checkpoint {path}: {key!r} has non-finite values")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return Checkpoint(path, int(round_text), state_dict, metadata)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint with the highest round in ``directory``, or ``None`` if there is none."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    rounds = [
        (int(match.group(1)), entry)
        for entry in directory.iterdir()
        if (match := _ROUND_FILE.match(entry.name)) and entry.is_file()
    ]
    return max(rounds)[1] if rounds else None
