"""Run the services of the Docker Compose files as local processes on 127.0.0.1 (tests only).

The compose files (read by tests/compose_files.py) are the one description of the
deployment; the tests run exactly their commands, without Docker. :func:`plan_services`
turns each service into a :class:`ServiceProcess`:

* the program is the entrypoint that docker/Dockerfile gives the service's build target;
* in addresses, a service name, ``0.0.0.0`` and ``127.0.0.1`` become ``127.0.0.1`` and
  ``localhost`` stays (both name this machine); every container port gets a free local port,
  so a SuperLink's published port and the address other services dial are the same port;
* every container path lies under a per-service folder that stands for the container's
  file system, in which each mount is a symlink to its host side: a bind mount's source
  (``${VAR:-default}`` read from ``variables``), a named volume's folder, a secret's file.
  A path in a command that is under no mount and not under the working directory is an
  error: the container would not have it either;
* ``--node-config`` paths are read by the ClientApp, which runs in the SuperNode's ClientApp
  executor, so they are translated in that executor's file system;
* ``flwr-healthcheck`` in a health check is docker/healthcheck.py run by this Python.

tests/compose_running.py starts them.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from compose_files import (
    DOCKERFILE,
    REPO_ROOT,
    ComposeError,
    clientapp_executor_of,
    dockerfile_stages,
    interpolate,
)
from flower_processes import free_port
from flwr.common.config import parse_config_args

HEALTHCHECK_SCRIPT = REPO_ROOT / "docker" / "healthcheck.py"
LOCAL_HOSTS = {"0.0.0.0", "127.0.0.1", "localhost"}
ADDRESS = re.compile(
    r"^(?P<scheme>[a-z]+://)?(?P<host>[A-Za-z0-9_.-]+):(?P<port>\d{1,5})(?P<path>/\S*)?$"
)


@dataclass(frozen=True)
class ServiceProcess:
    """One compose service as a local process.

    Attributes
    ----------
    name
        The service's name.
    argv
        Program (a console script of the project's venv) and its arguments.
    environment
        The service's own environment variables, translated.
    cwd
        Its working directory.
    healthcheck
        The health check command (``None``: the service has none).
    depends_on
        Services that must pass their health check before this one starts.
    """

    name: str
    argv: tuple[str, ...]
    environment: Mapping[str, str]
    cwd: Path
    healthcheck: tuple[str, ...] | None
    depends_on: tuple[str, ...]


class LocalTranslation:
    """Maps the containers' ports and paths to this machine's (see the module docstring).

    Parameters
    ----------
    compose
        The (merged) compose document.
    root
        An empty folder: each service's file system and each named volume go under it.
    variables
        Values for ``${VAR}`` in the compose files (unset ones take their defaults).
    host_paths
        Host paths to use in place of others (e.g. the certificate folder), by prefix.
    """

    def __init__(
        self,
        compose: Mapping[str, Any],
        root: Path,
        variables: Mapping[str, str] | None = None,
        host_paths: Mapping[Path, Path] | None = None,
    ) -> None:
        self.compose = compose
        self.services: Mapping[str, Any] = compose["services"]
        self.root = root
        self.variables = dict(variables or {})
        self.host_paths = {Path(k): Path(v) for k, v in (host_paths or {}).items()}
        self.ports: dict[tuple[str, int], int] = {}
        self.published: dict[int, tuple[str, int]] = {}
        for name, service in self.services.items():
            for entry in service.get("ports", []):
                host_port, container_port = self._published_port(str(entry))
                self.published[host_port] = (name, container_port)

    def _published_port(self, entry: str) -> tuple[int, int]:
        parts = interpolate(entry, self.variables).split("/")[0].split(":")
        if len(parts) < 2:
            raise ComposeError(f"port {entry!r} publishes no fixed host port")
        return int(parts[-2]), int(parts[-1])

    def port(self, service: str, container_port: int) -> int:
        """The local port standing for ``service``'s ``container_port``."""
        key = (service, container_port)
        if key not in self.ports:
            self.ports[key] = free_port()
        return self.ports[key]

    def host_address(self, address: str) -> str:
        """A host-side address (``flwr`` connection) of a published port, as a local one."""
        match = ADDRESS.match(address)
        if match is None or match["host"] not in LOCAL_HOSTS:
            raise ComposeError(f"{address!r} is not an address on this host")
        if int(match["port"]) not in self.published:
            raise ComposeError(f"{address!r}: no service publishes port {match['port']}")
        service, container_port = self.published[int(match["port"])]
        return f"{match['host']}:{self.port(service, container_port)}"

    def address(self, token: str, owner: str) -> str | None:
        """``token`` with its service host and port made local, or ``None`` if no address."""
        match = ADDRESS.match(token)
        if match is None:
            return None
        host = match["host"]
        if host in self.services:
            target = host
        elif host in LOCAL_HOSTS:
            target = owner
        else:
            return None
        local_host = "localhost" if host == "localhost" else "127.0.0.1"
        port = self.port(target, int(match["port"]))
        return f"{match['scheme'] or ''}{local_host}:{port}{match['path'] or ''}"

    def filesystem(self, service: str) -> Path:
        """The folder standing for ``service``'s container root."""
        return self.root / "services" / service

    def host_path(self, path: str) -> Path:
        """A host path of the compose files (relative: to the repository), as used here."""
        resolved = (REPO_ROOT / interpolate(path, self.variables)).resolve()
        for original, replacement in self.host_paths.items():
            if resolved == original or original in resolved.parents:
                return replacement / resolved.relative_to(original)
        return resolved

    def mounts(self, service: str) -> dict[PurePosixPath, Path]:
        """Container path -> host path of each of ``service``'s volumes and secrets."""
        config = self.services[service]
        mounts: dict[PurePosixPath, Path] = {}
        for entry in config.get("volumes", []):
            if not isinstance(entry, str):
                raise ComposeError(f"{service}: only short volume syntax is translated")
            source, target = interpolate(entry, self.variables).split(":")[:2]
            if source.startswith((".", "/")):
                host = self.host_path(source)
            else:  # a named volume
                if source not in self.compose.get("volumes", {}):
                    raise ComposeError(f"{service}: volume {source!r} is not declared")
                host = self.volume(source)
            mounts[PurePosixPath(target)] = host
        for entry in config.get("secrets", []):
            name = entry["source"] if isinstance(entry, dict) else entry
            target = (
                entry.get("target", f"/run/secrets/{name}")
                if isinstance(entry, dict)
                else (f"/run/secrets/{name}")
            )
            secret = self.compose.get("secrets", {}).get(name)
            if secret is None or "file" not in secret:
                raise ComposeError(f"{service}: secret {name!r} is not declared with a file")
            mounts[PurePosixPath(target)] = self.host_path(secret["file"])
        return mounts

    def volume(self, name: str) -> Path:
        """The folder standing for the named volume ``name``."""
        return self.root / "volumes" / name

    def working_dir(self, service: str) -> PurePosixPath:
        """``service``'s working directory in the container (Flower's images: /app)."""
        return PurePosixPath(self.services[service].get("working_dir", "/app"))

    def materialize(self, service: str) -> Path:
        """Create ``service``'s file system folder: working directory and mount symlinks."""
        root = self.filesystem(service)
        (root / self.working_dir(service).relative_to("/")).mkdir(parents=True, exist_ok=True)
        for target, host in self.mounts(service).items():
            if self.root / "volumes" in host.parents:
                host.mkdir(parents=True, exist_ok=True)
            link = root / target.relative_to("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(host)
        return root

    def path(self, token: str, service: str) -> str:
        """A container path of ``service`` as a local path; error if no mount holds it."""
        container_path = PurePosixPath(token)
        holders = [*self.mounts(service), self.working_dir(service)]
        if not any(container_path == p or p in container_path.parents for p in holders):
            raise ComposeError(
                f"{service}: {token} is under no mount and not under the working directory"
            )
        return str(self.filesystem(service) / container_path.relative_to("/"))

    def token(self, token: str, service: str) -> str:
        """One command or environment token of ``service``, translated."""
        if token == "0.0.0.0":
            return "127.0.0.1"
        if (address := self.address(token, service)) is not None:
            return address
        if token.startswith("/"):
            return self.path(token, service)
        return token

    def node_config(self, text: str, supernode: str) -> str:
        """A ``--node-config`` value with its paths in the ClientApp executor's file system."""
        executor = clientapp_executor_of(self.services, supernode)
        values = parse_config_args([text])
        parts = []
        for key, value in values.items():
            if isinstance(value, str) and value.startswith("/"):
                value = self.path(value, executor)
            parts.append(f"{key}={_toml(value)}")
        return " ".join(parts)

    def command(self, service: str) -> list[str]:
        """``service``'s command, translated; ``--port`` values are ``service``'s ports."""
        command = [str(part) for part in self.services[service].get("command", [])]
        translated: list[str] = []
        for index, part in enumerate(command):
            previous = command[index - 1] if index else None
            if previous == "--port":
                translated.append(str(self.port(service, int(part))))
            elif previous == "--node-config":
                translated.append(self.node_config(part, service))
            else:
                translated.append(self.token(part, service))
        return translated

    def healthcheck(self, service: str) -> tuple[str, ...] | None:
        """The health check as a local command (``flwr-healthcheck``: docker/healthcheck.py)."""
        check = self.services[service].get("healthcheck")
        if check is None or check.get("disable"):
            return None
        test = [str(part) for part in check["test"]]
        if test[0] != "CMD":
            raise ComposeError(f"{service}: health check {test} is not of the CMD form")
        program, *arguments = test[1:]
        if program != "flwr-healthcheck":
            raise ComposeError(f"{service}: health check runs {program!r}, not flwr-healthcheck")
        return (
            sys.executable,
            str(HEALTHCHECK_SCRIPT),
            *(self.token(a, service) for a in arguments),
        )

    def environment(self, service: str) -> dict[str, str]:
        """``service``'s environment variables, translated."""
        values = self.services[service].get("environment", {})
        if isinstance(values, list):
            values = dict(item.split("=", 1) for item in values)
        return {key: self.token(str(value), service) for key, value in values.items()}


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else str(value)


def plan_services(translation: LocalTranslation, create: bool = True) -> list[ServiceProcess]:
    """Every service as a :class:`ServiceProcess`, in an order that respects ``depends_on``.

    With ``create``, each service's file system folder is made (:meth:`materialize`);
    without, nothing is written (to inspect the translation only).
    """
    stages = dockerfile_stages()
    planned: dict[str, ServiceProcess] = {}
    for name, service in translation.services.items():
        target = service.get("build", {}).get("target")
        if target not in stages or "entrypoint" not in stages[target]:
            raise ComposeError(f"{name}: build target {target!r} has no entrypoint in {DOCKERFILE}")
        depends = service.get("depends_on", {})
        if isinstance(depends, dict):
            for dependency, condition in depends.items():
                if condition.get("condition") != "service_healthy":
                    raise ComposeError(f"{name}: depends on {dependency} without service_healthy")
        filesystem = translation.materialize(name) if create else translation.filesystem(name)
        planned[name] = ServiceProcess(
            name=name,
            argv=(stages[target]["entrypoint"], *translation.command(name)),
            environment=translation.environment(name),
            cwd=filesystem / translation.working_dir(name).relative_to("/"),
            healthcheck=translation.healthcheck(name),
            depends_on=tuple(depends),
        )
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise ComposeError(f"dependency cycle: {' -> '.join((*path, name))}")
        if name not in order:
            for dependency in planned[name].depends_on:
                visit(dependency, (*path, name))
            order.append(name)

    for name in planned:
        visit(name, ())
    return [planned[name] for name in order]
