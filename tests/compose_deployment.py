"""The project's Docker deployment as local processes, and ``flwr`` to drive it (tests only).

:func:`deployed` runs the services of some compose files (tests/compose_processes.py,
tests/compose_running.py) with a ``flwr`` whose connections are docker/config.toml's, made
local; :func:`run_flwr` runs a ``flwr`` command against them.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from compose_files import CONNECTIONS, PLACEHOLDER, REGIONS, load_compose
from compose_processes import LocalTranslation, ServiceProcess, plan_services
from compose_running import running, wait_healthy
from conftest import REPO_ROOT
from flower_processes import (
    VENV_BIN,
    Started,
    stop_tree,
    wait_for,
    write_flower_config,
)

GENERATE = REPO_ROOT / "docker" / "certs" / "generate.sh"
CERTS_OUT = REPO_ROOT / "docker" / "certs" / "out"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# One quick round: tiny MLP, 200 examples per node, no federated evaluation (every message
# starts a fresh ClientApp process); the server evaluates on 200 test examples.
QUICK_RUN = {
    "num-server-rounds": 1,
    "width": 0.125,
    "max-examples": 200,
    "server-eval-examples": 200,
    "fraction-evaluate": 0.0,
}


@dataclass
class Deployment:
    """The services of some compose files, running as processes, and a ``flwr`` to use them."""

    translation: LocalTranslation
    services: dict[str, ServiceProcess]
    started: dict[str, Started]
    cli_environment: dict[str, str]
    root: Path


def process_environment(root: Path):
    """The environment a service's process starts with (its compose environment is added)."""

    def environment(service: ServiceProcess) -> dict[str, str]:
        # The data directory must come from the compose file, not from the test's settings.
        env = {k: v for k, v in os.environ.items() if k != "REBASIN_DATA_DIR"}
        env.update(
            {
                "FLWR_HOME": str(root / "flwr-home" / service.name),
                # Flower starts its helpers (flwr-serverapp, flwr-clientapp) by name.
                "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    return environment


def cli_environment(root: Path, translation: LocalTranslation) -> dict[str, str]:
    """``flwr``'s environment; its config.toml holds docker/config.toml's connections, local."""
    home = root / "flwr-home" / "cli"
    connections = {}
    for name, entry in tomllib.loads(CONNECTIONS.read_text())["superlink"].items():
        connection: dict[str, object] = {"address": translation.host_address(entry["address"])}
        if "insecure" in entry:
            connection["insecure"] = entry["insecure"]
        if "root-certificates" in entry:
            path = entry["root-certificates"].replace(PLACEHOLDER, str(REPO_ROOT))
            connection["root-certificates"] = str(translation.host_path(path))
        connections[name] = connection
    write_flower_config(home, connections)
    env = process_environment(root)(ServiceProcess("cli", ("flwr",), {}, root, None, ()))
    env["FLWR_HOME"] = str(home)
    return env


def run_flwr(arguments: list[str], env: dict[str, str], log_path: Path, timeout: float) -> str:
    """Run ``flwr <arguments>`` in the repository; its output (ANSI codes removed)."""
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [str(VENV_BIN / "flwr"), *arguments], stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, cwd=REPO_ROOT, start_new_session=True,
        )  # fmt: skip
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"flwr {arguments} ran over {timeout} s:\n{log_path.read_text()}")
        finally:
            stop_tree(process.pid)
    output = ANSI.sub("", log_path.read_text(errors="replace"))
    assert process.returncode == 0, output
    return output


def run_config_argument(values: dict[str, object]) -> str:
    """``values`` as ``flwr run --run-config``'s argument."""

    def toml(value: object) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    return " ".join(f"{key}={toml(value)}" for key, value in values.items())


def option_value(argv: tuple[str, ...] | list[str], option: str) -> str | None:
    """The value after ``option`` in ``argv`` (``None`` if absent)."""
    return argv[argv.index(option) + 1] if option in argv else None


@contextlib.contextmanager
def deployed(
    files: tuple[Path, ...], root: Path, data_dir: Path, certs: Path | None = None
) -> Iterator[Deployment]:
    """The compose files' services running as processes; stopped, all of them, on exit.

    Every region's data directory and the server's are the shared data directory (each
    SuperNode takes its own partition of it). With ``certs``, the compose files' certificate
    folder is that one, and each SuperNode's key is registered before the SuperNode starts,
    as the README tells users to do.
    """
    variables = {f"{r.upper()}_DATA_DIR": str(data_dir) for r in REGIONS}
    variables["SERVER_DATA_DIR"] = str(data_dir)
    host_paths = {CERTS_OUT: certs} if certs is not None else {}
    translation = LocalTranslation(load_compose(*files), root, variables, host_paths)
    services = plan_services(translation)
    flwr_environment = cli_environment(root, translation)
    logs = root / "logs"
    logs.mkdir()

    def register_key(service: ServiceProcess) -> None:
        key = option_value(service.argv, "--auth-supernode-private-key")
        if key is None:
            return
        public = Path(os.path.realpath(key)).with_suffix(".pub")
        output = run_flwr(
            ["supernode", "register", str(public), "docker-tls"], flwr_environment,
            logs / f"register-{service.name}.log", timeout=120,
        )  # fmt: skip
        assert "registered successfully" in output, output

    with running(services, process_environment(root), logs, register_key) as started:
        # As `docker compose up --wait`: every service passes its health check.
        for service in services:
            wait_healthy(service, started[service.name], timeout=120)
        for region in REGIONS:
            supernode = started[f"supernode-{region}"]
            wait_for(lambda s=supernode: "SuperNode ID:" in s.log(), 120, "SuperNode ID", supernode)
        yield Deployment(
            translation, {s.name: s for s in services}, started, flwr_environment, root
        )
