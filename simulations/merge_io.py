"""``rebasin merge``'s files: reading and checking the inputs, writing the merged model.

Inputs are safetensors state dicts, read without unpickling (safetensors stores raw tensors
and a JSON header only) and checked against the model's own ``state_dict()``; the merged
model is written atomically with string metadata (its :class:`server.identity.ModelIdentity`
and how it was made).

Imported when the CLI starts: safetensors and the engine are imported inside the functions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from server.identity import ModelIdentity

MERGED_FORMAT = "rebasin-fl-merged/1"


class MergeInputError(ValueError):
    """An input file is unreadable or does not fit the model; the message names the file."""


def _unreadable(path: Path, exc: Exception) -> MergeInputError:
    """The error for a file that safetensors cannot open or read, naming ``path``."""
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return MergeInputError(
        f"{path}: not a readable safetensors file (corrupt or another format): {detail}"
    )


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of safetensors file ``path`` (empty if it has none); no tensors.

    Raises
    ------
    MergeInputError
        Naming ``path``, as :func:`read_state_dict` does, if it is not a safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None


def read_state_dict(path: Path, reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of safetensors file ``path``, checked against ``reference``.

    Never unpickles: safetensors stores raw tensors and a JSON header only.

    Raises
    ------
    MergeInputError
        Naming ``path``: not a safetensors file (corrupt, truncated, another format), or
        keys, shapes or dtypes that differ from ``reference``'s, or NaN/Inf values (naming
        the key).
    """
    from safetensors import SafetensorError, safe_open

    from rebasin.permute import validate_state_dict

    try:
        with safe_open(str(path), framework="pt") as handle:
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None
    try:
        validate_state_dict(state_dict, reference, name=str(path))
    except ValueError as exc:
        raise MergeInputError(str(exc)) from None
    return state_dict


def merged_metadata(
    *,
    method: str,
    identity: ModelIdentity,
    files: Sequence[Path],
    weights: Sequence[float],
    reference: int | None,
    seed: int,
    max_iter: int,
    max_rounds: int | None,
    batchnorm: str,
    command: str,
) -> dict[str, str]:
    """The string metadata stored with a merged model (safetensors keeps strings only).

    ``identity`` is written as the ServerApp's checkpoints write it
    (:meth:`server.identity.ModelIdentity.to_metadata`), lists as JSON.
    """
    return {
        "format": MERGED_FORMAT,
        "method": method,
        **identity.to_metadata(),
        "inputs": json.dumps([str(f) for f in files]),
        "weights": json.dumps([float(w) for w in weights]),
        "reference": "" if reference is None else str(reference),
        "seed": str(seed),
        "max_iter": str(max_iter),
        "max_rounds": "" if max_rounds is None else str(max_rounds),
        "batchnorm": batchnorm,
        "command": command,
    }


def check_magnitudes(
    files: Sequence[Path], models: Sequence[Mapping[str, torch.Tensor]], max_norm_ratio: float
) -> None:
    """Refuse, naming the file, an input too large to merge (see
    :func:`rebasin.permute.magnitude_problem`), its norm measured against the inputs' median.

    Raises
    ------
    MergeInputError
        Naming the first such input and why.
    """
    import statistics

    from rebasin.permute import magnitude_problem, model_norm

    median = statistics.median(model_norm(m) for m in models)
    for i, (path, model) in enumerate(zip(files, models)):
        problem = magnitude_problem(model, median, max_norm_ratio, "the inputs' median")
        if problem is not None:
            raise MergeInputError(f"input {i} ({path}): {problem}")


def write_merged(
    path: Path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Write ``state_dict`` and ``metadata`` to ``path`` atomically (temporary file, rename)."""
    from server.checkpoint import write_safetensors

    write_safetensors(path, state_dict, metadata)
