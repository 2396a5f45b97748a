"""Start, watch and stop Flower processes (SuperLink, SuperNodes, ``flwr run``) in tests.

Every process is started in its own session with its output in a log file. Flower's
processes start children of their own (SuperExec, ``flwr-serverapp``, ``flwr-clientapp``,
Ray) that may open sessions of their own, so a process group is not enough to stop them:
:func:`stop_tree` snapshots the whole descendant tree by walking ``/proc`` *before* it
signals anything, then stops each process by PID (TERM, then KILL after a grace period).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children() -> dict[int, list[int]]:
    """Parent PID -> child PIDs of every process visible in /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # The command name (field 2) may contain spaces; the fields after ")" are fixed.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """``pid`` and all its descendants (parents before children)."""
    tree, order, stack = _children(), [], [pid]
    while stack:
        current = stack.pop()
        order.append(current)
        stack.extend(tree.get(current, []))
    return order


def pids_with_environment(key: str, value: str) -> list[int]:
    """PIDs of the processes whose environment has ``key=value``.

    Every process a test starts, and everything those start in turn (even detached, like
    the SuperLink ``flwr run`` may launch), inherits the test's unique ``FLWR_HOME``; this
    finds them all, whoever their parent is now.
    """
    entry_text = f"{key}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environment = (entry / "environ").read_bytes()
        except OSError:  # exited, or not ours to read
            continue
        if entry_text in environment.split(b"\0"):
            found.append(int(entry.name))
    return found


def stop_environment(key: str, value: str, grace: float = 8.0) -> None:
    """Stop every process (and its descendants) whose environment has ``key=value``."""
    for pid in pids_with_environment(key, value):
        stop_tree(pid, grace)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes (its parent has not reaped it yet).
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def signal_tree(pids: Sequence[int], sig: int) -> None:
    """Send ``sig`` to each PID that still exists."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_tree(pid: int, grace: float = 8.0) -> None:
    """Stop ``pid`` and every descendant: SIGTERM, then SIGKILL what is left after ``grace``."""
    pids = descendants(pid)
    signal_tree(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    signal_tree([p for p in pids if _alive(p)], signal.SIGKILL)


@dataclass
class Started:
    """A process started by :func:`start`, with the file its output goes to."""

    name: str
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """Everything the process has written so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Stop the process and all its descendants (idempotent)."""
        stop_tree(self.pid)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


def start(
    name: str, args: Sequence[str], log_dir: Path, env: Mapping[str, str], cwd: Path
) -> Started:
    """Start ``args`` (a console script of this venv first) in a new session, output logged."""
    log_path = log_dir / f"{name}.log"
    command = [str(VENV_BIN / args[0]), *args[1:]]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    return Started(name, process, log_path)


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, watch: Started | None = None
) -> None:
    """Poll ``condition`` until true; ``TimeoutError`` naming ``what`` (and ``watch``'s log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if watch is not None and watch.process.poll() is not None:
            raise RuntimeError(
                f"{watch.name} exited with {watch.process.returncode} while waiting for "
                f"{what}:\n{watch.log()[-4000:]}"
            )
        time.sleep(0.1)
    tail = f"\n{watch.name} log:\n{watch.log()[-4000:]}" if watch is not None else ""
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")


def superlink_healthy(port: int) -> bool:
    """Whether a SuperLink answers its HTTP health check on 127.0.0.1:``port``."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success
    except httpx.HTTPError:
        return False


def write_flower_config(flwr_home: Path, connections: Mapping[str, Mapping[str, object]]) -> None:
    """Write ``$FLWR_HOME/config.toml`` with the given SuperLink connections.

    ``flwr run <app> <connection>`` reads connections from this file (Flower 1.42); the first
    connection is the default.
    """
    lines = ["[superlink]", f'default = "{next(iter(connections))}"', ""]
    for name, values in connections.items():
        lines.append(f"[superlink.{name}]")
        for key, value in values.items():
            rendered = str(value).lower() if isinstance(value, bool) else f'"{value}"'
            lines.append(f"{key} = {rendered}")
        lines.append("")
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text("\n".join(lines))
