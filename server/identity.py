"""Which model a saved state dict is: its model identity, stored as safetensors string metadata.

A state dict only fits the model it came from, so the ServerApp's checkpoints and ``rebasin
merge``'s output record that model in four string metadata entries, ``model``, ``dataset``,
``width`` (``repr`` of the float) and ``norm``. :class:`ModelIdentity` is those four,
validated: names from :mod:`rebasin.names`, a width > 0 compared as a number (a stored
``"0.250"`` is width ``0.25``). :func:`resolve_identity` combines the values a caller was
given with what several files store, as ``rebasin merge`` does with its options.

Imports nothing heavy (the ``rebasin`` CLI imports it when it starts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rebasin.names import DATASET_NAMES, MODEL_NAMES, NORM_KINDS, DatasetName, ModelName, NormKind

if TYPE_CHECKING:
    from torch import nn

IDENTITY_FIELDS: tuple[str, ...] = ("model", "dataset", "width", "norm")
DEFAULT_WIDTH = 1.0
DEFAULT_NORM: NormKind = "batch"
_NAMES: dict[str, tuple[str, ...]] = {
    "model": MODEL_NAMES,
    "dataset": DATASET_NAMES,
    "norm": NORM_KINDS,
}


class IdentityError(ValueError):
    """An identity value is invalid, or files disagree on one; the message names the file."""


def _problem(field: str, value: object) -> str | None:
    """Why ``value`` is not a valid ``field`` of an identity (``None``: it is)."""
    if field == "width":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "is not a number > 0"
        return None if value > 0 and math.isfinite(value) else "is not a number > 0"
    if value not in _NAMES[field]:
        return f"is not one of {', '.join(_NAMES[field])}"
    return None


def parse_field(field: str, text: str, source: str) -> str | float:
    """Metadata ``field`` (one of :data:`IDENTITY_FIELDS`) as stored: a float width, or a name.

    Raises
    ------
    IdentityError
        Naming ``source`` (the file) and ``field``: a width that is not a number > 0, or a
        name that is not one of the known ones.
    """
    value: str | float = text
    if field == "width":
        try:
            value = float(text)
        except ValueError:
            value = math.nan
    problem = _problem(field, value)
    if problem is not None:
        raise IdentityError(f"{source}: metadata {field} {text!r} {problem}")
    return value


def shown(value: str | float) -> str:
    """``value`` for a message: a width as short as it stays exact (``1``, ``0.125``)."""
    if not isinstance(value, float):
        return value
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


@dataclass(frozen=True)
class ModelIdentity:
    """A zoo model: what :func:`rebasin.zoo.build_model` builds from these four settings.

    Equal identities have equal names and numerically equal widths. Whether the model can
    take the data set's images is :func:`rebasin.zoo.build_model`'s check, not this type's.

    Raises
    ------
    IdentityError
        On an unknown model, data set or norm, or a width that is not a number > 0.
    """

    model: ModelName
    dataset: DatasetName
    width: float = DEFAULT_WIDTH
    norm: NormKind = DEFAULT_NORM

    def __post_init__(self) -> None:
        for field in IDENTITY_FIELDS:
            value = getattr(self, field)
            problem = _problem(field, value)
            if problem is not None:
                raise IdentityError(f"{field} {value!r} {problem}")
        object.__setattr__(self, "width", float(self.width))  # an int width, stored as 1.0

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], source: str) -> ModelIdentity:
        """The identity that string ``metadata`` of file ``source`` stores.

        Raises
        ------
        IdentityError
            Naming ``source``: a field missing, or one that :func:`parse_field` refuses.
        """
        missing = [field for field in IDENTITY_FIELDS if field not in metadata]
        if missing:
            raise IdentityError(f"{source}: metadata has no {', '.join(missing)}")
        values = {field: parse_field(field, metadata[field], source) for field in IDENTITY_FIELDS}
        return cls(**values)  # type: ignore[arg-type]

    def to_metadata(self) -> dict[str, str]:
        """The four string metadata entries (what :meth:`from_metadata` reads back)."""
        return {
            "model": self.model,
            "dataset": self.dataset,
            "width": repr(self.width),
            "norm": self.norm,
        }

    def difference(self, metadata: Mapping[str, str], source: str) -> str | None:
        """The first field that ``metadata`` of ``source`` lacks or stores otherwise, if any.

        Raises
        ------
        IdentityError
            Naming ``source``, if a stored value is not valid (see :func:`parse_field`).
        """
        for field in IDENTITY_FIELDS:
            if field not in metadata:
                return field
            if parse_field(field, metadata[field], source) != getattr(self, field):
                return field
        return None

    def describe(self) -> str:
        """One line, e.g. ``mlp on mnist, width 0.125, norm batch``."""
        return f"{self.model} on {self.dataset}, width {self.width:g}, norm {self.norm}"

    def build_model(self, seed: int | None = None) -> nn.Module:
        """The model (see :func:`rebasin.zoo.build_model`, whose ``ValueError`` it raises)."""
        from rebasin.zoo import build_model

        return build_model(self.model, self.dataset, width=self.width, norm=self.norm, seed=seed)


@dataclass(frozen=True)
class ResolvedIdentity:
    """Files' identity: the values given, their metadata for the rest, the defaults after that.

    Attributes
    ----------
    model, dataset
        ``None`` when neither given nor in any file's metadata.
    width, norm
        Given, from metadata, or :data:`DEFAULT_WIDTH` and :data:`DEFAULT_NORM`.
    from_metadata
        The fields (of :data:`IDENTITY_FIELDS`) taken from metadata.
    """

    model: str | None
    dataset: str | None
    width: float
    norm: str
    from_metadata: tuple[str, ...]

    def identity(self) -> ModelIdentity:
        """The identity, once ``model`` and ``dataset`` are known (``IdentityError`` if not)."""
        if self.model is None or self.dataset is None:
            raise IdentityError("the model and the data set are not known")
        return ModelIdentity(self.model, self.dataset, self.width, self.norm)  # type: ignore[arg-type]

    def describe(self) -> str:
        """One line: the identity, and which of it came from the files' metadata."""
        text = self.identity().describe()
        if set(self.from_metadata) == set(IDENTITY_FIELDS):
            return f"architecture from file metadata: {text}"
        return f"architecture: {text} ({', '.join(self.from_metadata)} from file metadata)"


def resolve_identity(
    files: Sequence[Path],
    metadata: Sequence[Mapping[str, str]],
    *,
    model: str | None,
    dataset: str | None,
    width: float | None,
    norm: str | None,
) -> ResolvedIdentity:
    """The identity of ``files``: the values given, and the files' metadata for those left out.

    Parameters
    ----------
    files, metadata
        The files and their string metadata, in the same order.
    model, dataset, width, norm
        The values given (``rebasin merge``'s options, named ``--<field>`` in errors);
        ``None`` for one not given.

    Returns
    -------
    ResolvedIdentity
        A field not given is the value that the files storing it store; with none storing
        it, ``model``/``dataset`` are ``None`` (the caller asks for them) and ``width``/``norm``
        the defaults.

    Raises
    ------
    IdentityError
        Two files storing different values for a field (naming both files and the field), a
        file storing another value than the one given (naming the file, the field and both
        values), or a stored value that is not valid (naming the file and the field). Widths
        are compared as numbers.
    """
    given: dict[str, str | float | None] = {
        "model": model, "dataset": dataset, "width": width, "norm": norm,
    }  # fmt: skip
    resolved: dict[str, str | float | None] = {}
    from_metadata: list[str] = []
    for field in IDENTITY_FIELDS:
        option = given[field]
        first: tuple[str | float, Path] | None = None
        for path, stored in zip(files, metadata):
            if field not in stored:
                continue
            value = parse_field(field, stored[field], str(path))
            if option is not None and value != option:
                raise IdentityError(
                    f"{path}: its metadata has {field} {shown(value)}, "
                    f"but --{field} is {shown(option)}"
                )
            if first is None:
                first = (value, path)
            elif value != first[0]:
                raise IdentityError(
                    f"inputs disagree on {field}: {first[1]} has {shown(first[0])}, "
                    f"{path} has {shown(value)}"
                )
        if option is None and first is not None:
            option = first[0]
            from_metadata.append(field)
        resolved[field] = option
    width_value, norm_value = resolved["width"], resolved["norm"]
    return ResolvedIdentity(
        model=None if resolved["model"] is None else str(resolved["model"]),
        dataset=None if resolved["dataset"] is None else str(resolved["dataset"]),
        width=DEFAULT_WIDTH if width_value is None else float(width_value),
        norm=DEFAULT_NORM if norm_value is None else str(norm_value),
        from_metadata=tuple(from_metadata),
    )
