"""The project's Docker Compose files, read as Docker Compose reads them (tests only).

:func:`load_compose` merges override files the way Compose does for the keys these files use
(:func:`merge_compose`), :func:`interpolate` fills in ``${VAR:-default}``, and
:func:`dockerfile_stages` reads docker/Dockerfile's build targets. What the processes make of
the files is tests/compose_processes.py.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
BASE = REPO_ROOT / "docker-compose.yml"
TLS = REPO_ROOT / "docker-compose.tls.yml"
CONNECTIONS = REPO_ROOT / "docker" / "config.toml"
PLACEHOLDER = "/ABSOLUTE/PATH/TO/REPO"
REGIONS = ("us", "eu")
# Keys whose value an override replaces as a whole (Compose merges other mappings key by key
# and other sequences entry by entry).
REPLACED_KEYS = {"command", "entrypoint", "test"}
VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


class ComposeError(ValueError):
    """A compose file uses something these tests cannot translate, or is inconsistent."""


def load_compose(*files: Path) -> dict[str, Any]:
    """The compose files, each merged over the previous (``docker compose -f a -f b``)."""
    merged: dict[str, Any] = {}
    for path in files:
        document = yaml.safe_load(path.read_text())
        if not isinstance(document, dict):
            raise ComposeError(f"{path} is not a YAML mapping")
        merged = merge_compose(merged, document)
    return merged


def _entry_key(entry: Any) -> Any:
    """What identifies a sequence entry when merging: a mount's or secret's target."""
    if isinstance(entry, dict):
        return entry.get("target", json.dumps(entry, sort_keys=True))
    if isinstance(entry, str) and ":" in entry:
        return VARIABLE.sub("_", entry).split(":")[1]  # "source:target[:mode]"
    return entry


def merge_compose(base: Any, override: Any, key: str | None = None) -> Any:
    """``override`` merged into ``base`` by Compose's rules for the keys these files use.

    Mappings merge key by key; ``command``, ``entrypoint`` and a health check's ``test`` are
    replaced; other sequences (``volumes``, ``secrets``, ``ports``) keep the base entries
    whose target the override does not name and add the override's.
    """
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for name, value in override.items():
            merged[name] = merge_compose(base[name], value, name) if name in base else value
        return copy.deepcopy(merged)
    if isinstance(base, list) and isinstance(override, list) and key not in REPLACED_KEYS:
        replaced = {_entry_key(entry) for entry in override}
        kept = [entry for entry in base if _entry_key(entry) not in replaced]
        return copy.deepcopy(kept + override)
    return copy.deepcopy(override)


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """``${NAME}`` and ``${NAME:-default}`` replaced from ``variables`` (Compose's syntax)."""

    def value(match: re.Match[str]) -> str:
        name, default = match["name"], match["default"]
        if name in variables and variables[name] != "":
            return variables[name]
        if default is None:
            raise ComposeError(f"variable {name} is not set and has no default in {text!r}")
        return default

    return VARIABLE.sub(value, text)


def dockerfile_stages(path: Path = DOCKERFILE) -> dict[str, dict[str, str]]:
    """Each build target of the Dockerfile: its base image (``from``) and ``entrypoint``."""
    stages: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in path.read_text().splitlines():
        if match := re.match(r"^FROM\s+(\S+)\s+AS\s+(\S+)\s*$", line, re.IGNORECASE):
            current = stages.setdefault(match[2], {"from": match[1]})
        elif (match := re.match(r"^ENTRYPOINT\s+(\[.*\])\s*$", line)) and current is not None:
            program = json.loads(match[1])
            if len(program) != 1:
                raise ComposeError(f"{path}: entrypoint {program} is not one program")
            current["entrypoint"] = program[0]
    return stages


def _command_option(command: list[str], option: str) -> str | None:
    """The value after ``option`` in ``command`` (``None`` if absent)."""
    if option not in command:
        return None
    index = command.index(option)
    if index + 1 >= len(command):
        raise ComposeError(f"{option} has no value in {command}")
    return command[index + 1]


def clientapp_executor_of(services: Mapping[str, Any], supernode: str) -> str:
    """The service whose ``--runtime-api-address`` is ``supernode``'s (runs its ClientApps)."""
    found = [
        name
        for name, service in services.items()
        if (address := _command_option(list(service.get("command", [])), "--runtime-api-address"))
        and address.split(":")[0] == supernode
    ]
    if len(found) != 1:
        raise ComposeError(f"{supernode} needs exactly one ClientApp executor, found {found}")
    return found[0]
