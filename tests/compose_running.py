"""Start compose services (tests/compose_processes.py's :class:`ServiceProcess`) as Compose would.

:func:`running` starts the services in dependency order, waiting for a service's health
check before starting what depends on it (``condition: service_healthy``), and stops every
process, with its descendants, when it exits. ``flwr-healthcheck`` in a health check is
docker/healthcheck.py, run by this Python (or called in-process, :func:`healthy`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import importlib.util
import io
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from compose_processes import HEALTHCHECK_SCRIPT, ServiceProcess
from flower_processes import Started, start


@functools.cache
def _healthcheck_module() -> Any:
    spec = importlib.util.spec_from_file_location("flwr_healthcheck", HEALTHCHECK_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def healthy(service: ServiceProcess, in_process: bool = True) -> bool:
    """Whether ``service``'s health check passes now.

    ``in_process`` calls docker/healthcheck.py's ``main`` here instead of starting a Python
    for each check (the same code; polling every second would otherwise cost CPU time).
    """
    if service.healthcheck is None:
        return True
    if in_process and service.healthcheck[:2] == (sys.executable, str(HEALTHCHECK_SCRIPT)):
        with contextlib.redirect_stderr(io.StringIO()):
            return _healthcheck_module().main(list(service.healthcheck[2:])) == 0
    result = subprocess.run(service.healthcheck, capture_output=True, timeout=15, check=False)
    return result.returncode == 0


def wait_healthy(
    service: ServiceProcess, process: Started, timeout: float, interval: float = 1.0
) -> None:
    """Run ``service``'s health check every ``interval`` s until it passes.

    Raises
    ------
    RuntimeError
        If the process exits first (its log is in the message).
    TimeoutError
        If the check still fails after ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    while not healthy(service):
        if process.process.poll() is not None:
            raise RuntimeError(
                f"{service.name} exited with {process.process.returncode} before passing its "
                f"health check:\n{process.log()[-4000:]}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{service.name} failed its health check for {timeout:.0f} s:\n"
                f"{process.log()[-4000:]}"
            )
        time.sleep(interval)


@contextlib.contextmanager
def running(
    services: list[ServiceProcess],
    base_environment: Callable[[ServiceProcess], dict[str, str]],
    log_dir: Path,
    before_start: Callable[[ServiceProcess], None] | None = None,
    health_timeout: float = 120.0,
    interval: float = 1.0,
) -> Iterator[dict[str, Started]]:
    """Start ``services`` as Compose would; stop them all (with their children) on exit.

    A service starts as soon as every service it depends on passes its health check
    (checked every ``interval`` s), so independent services start together;
    ``before_start`` runs just before a service starts (e.g. to register a SuperNode's key).
    """
    by_name = {service.name: service for service in services}
    started: dict[str, Started] = {}
    passed: set[str] = set()
    try:
        deadline = time.monotonic() + health_timeout
        while len(started) < len(services):
            for service in services:
                if service.name in started or not set(service.depends_on) <= passed:
                    continue
                if before_start is not None:
                    before_start(service)
                environment = {**base_environment(service), **service.environment}
                started[service.name] = start(
                    service.name, list(service.argv), log_dir, environment, service.cwd
                )
                deadline = time.monotonic() + health_timeout
            awaited = {d for s in services if s.name not in started for d in s.depends_on}
            for name in sorted(awaited & set(started) - passed):
                process = started[name]
                if process.process.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {process.process.returncode} before passing its "
                        f"health check:\n{process.log()[-4000:]}"
                    )
                if healthy(by_name[name]):
                    passed.add(name)
            if len(started) < len(services):
                if time.monotonic() > deadline:
                    waiting = sorted(awaited - passed)
                    raise TimeoutError(f"{waiting}: health check failing for {health_timeout} s")
                time.sleep(interval)
        yield started
    finally:
        # All at once: each stop waits up to a grace period for its process tree to exit.
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(started))) as pool:
            list(pool.map(lambda process: process.stop(), started.values()))
