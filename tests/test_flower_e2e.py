"""End to end with Flower's own processes, on 127.0.0.1 only.

* ``flwr run .``: the local simulation (a SuperLink in simulation mode, Ray, 2 SuperNodes);
* ``flwr run tests/plugin_app``: a quickstart-style app with only FedAvg swapped for
  ReBasinFedAvg;
* a deployment: ``flower-superlink --insecure``, two ``flower-supernode`` with their own
  ``--node-config``, ``flwr run . deployment``; then the same with one SuperNode killed
  (SIGKILL, whole process tree) while it works on its round.

Every process is started in a fixture or test and stopped by PID in ``finally`` blocks, with
all its descendants (see tests/flower_processes.py). ``$FLWR_HOME`` is a temporary directory
whose ``config.toml`` holds the connections, as ``flwr`` 1.42 reads them from there.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from flower_processes import (
    VENV_BIN,
    Started,
    descendants,
    free_port,
    signal_tree,
    start,
    stop_environment,
    stop_tree,
    superlink_healthy,
    wait_for,
    write_flower_config,
)

from rebasin.zoo import build_model
from server.checkpoint import load_checkpoint
from server.identity import ModelIdentity

PLUGIN_APP = REPO_ROOT / "tests" / "plugin_app"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Small and quick: two rounds on a few hundred MNIST examples per node.
QUICK_RUN = {
    "num-server-rounds": 2,
    "width": 0.125,
    "max-examples": 200,
    "server-eval-examples": 200,
}


def _environment(flwr_home: Path, local_port: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            # Flower starts its helpers (flower-superexec, flwr-serverapp, ...) by name.
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        }
    )
    if local_port is not None:
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(local_port)
    return env


def _run_config(values: dict) -> str:
    """``--run-config`` text: TOML values, strings quoted."""

    def toml(value: object) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        return json.dumps(value) if isinstance(value, str) else str(value)

    return " ".join(f"{key}={toml(value)}" for key, value in values.items())


def flwr_run(
    app: Path, connection: str, run_config: dict, env: dict, log_path: Path, timeout: float
) -> str:
    """``flwr run <app> <connection> --stream``; its output (ANSI codes removed).

    ``--stream`` makes ``flwr run`` follow the run's log until the run ends. The command runs
    in its own session and is stopped with its whole tree if it overruns.
    """
    command = [
        str(VENV_BIN / "flwr"), "run", str(app), connection, "--stream",
        "--run-config", _run_config(run_config),
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
            start_new_session=True,
        )  # fmt: skip
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{shlex.join(command)} ran over {timeout} s:\n{log_path.read_text()}")
        finally:
            stop_tree(process.pid)
    output = ANSI.sub("", log_path.read_text(errors="replace"))
    assert process.returncode == 0, output
    return output


def _assert_run_finished(output: str, rounds: int) -> None:
    assert "Strategy execution finished" in output, output
    assert "Traceback" not in output, output
    for server_round in range(1, rounds + 1):
        assert f"[ROUND {server_round}/{rounds}]" in output


def _assert_checkpoints(directory: Path, rounds: int, width: float) -> None:
    reference = build_model("mlp", "mnist", width=width).state_dict()
    for server_round in range(1, rounds + 1):
        checkpoint = load_checkpoint(
            directory / f"round-{server_round:04d}.safetensors",
            reference=reference,
            identity=ModelIdentity("mlp", "mnist", width, "batch"),
        )
        assert checkpoint.round == server_round
    metrics = json.loads((directory / "metrics.json").read_text())
    expected = [str(r) for r in range(1, rounds + 1)]
    assert sorted(metrics["train-clientapp"]) == expected
    assert sorted(metrics["evaluate-serverapp"]) == ["0", *expected]
    for record in metrics["evaluate-serverapp"].values():
        assert record["num-examples"] == 200 and 0.0 <= record["accuracy"] <= 1.0


# --- local simulation ------------------------------------------------------------------


@dataclass
class LocalSimulation:
    env: dict[str, str]
    superlink: Started


@pytest.fixture(scope="module")
def local_simulation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSimulation]:
    """The SuperLink ``flwr run`` would start for the ``:local:`` connection, started by us.

    ``flwr run`` starts this very command (simulation mode, port from
    ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``) when nothing answers there, detached, and gives
    it 15 s; starting it here gives it longer on a busy machine and makes it ours to stop.
    """
    home = tmp_path_factory.mktemp("flwr-home-local")
    port = free_port()
    env = _environment(home, local_port=port)
    write_flower_config(home, {"local": {"address": ":local:"}})
    state = home / "local-superlink"
    state.mkdir()
    superlink = start(
        "local-superlink",
        ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
         "--host", "127.0.0.1", "--port", str(port), "--database", str(state / "state.db")],
        home, env, REPO_ROOT,
    )  # fmt: skip
    try:
        wait_for(lambda: superlink_healthy(port), 90, "the local SuperLink", superlink)
        yield LocalSimulation(env, superlink)
    finally:
        superlink.stop()
        stop_environment("FLWR_HOME", str(home))  # anything flwr may have detached


@pytest.mark.timeout(300)
def test_flwr_run_local_simulation(local_simulation: LocalSimulation, tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    output = flwr_run(
        REPO_ROOT, "local", {**QUICK_RUN, "checkpoint-dir": str(checkpoints)},
        local_simulation.env, tmp_path / "flwr-run.log", timeout=240,
    )  # fmt: skip
    _assert_run_finished(output, rounds=2)
    assert (
        "Starting ServerRounds strategy" in output and "Wrapped strategy: ReBasinFedAvg" in output
    )
    assert output.count("Re-Basin merge: 2 valid replies of 2") == 2
    assert "Aggregated MetricRecord: {'train-loss'" in output
    assert "Aggregated MetricRecord: {'eval-loss'" in output or "'eval-acc'" in output
    assert "round 2 server evaluation: accuracy" in output
    _assert_checkpoints(checkpoints, rounds=2, width=0.125)
    assert local_simulation.superlink.process.poll() is None  # still ours, still up


@pytest.mark.timeout(240)
def test_quickstart_app_with_rebasin_strategy(
    local_simulation: LocalSimulation, tmp_path: Path
) -> None:
    final_model = tmp_path / "final_model.pt"
    output = flwr_run(
        PLUGIN_APP, "local", {"final-model-path": str(final_model)},
        local_simulation.env, tmp_path / "flwr-run.log", timeout=200,
    )  # fmt: skip
    _assert_run_finished(output, rounds=2)
    assert "Starting ReBasinFedAvg strategy" in output
    assert output.count("Re-Basin merge: 2 valid replies of 2") == 2
    state_dict = torch.load(final_model, weights_only=True)
    expected = {
        "conv1.weight": (6, 1, 5, 5), "conv2.weight": (16, 6, 5, 5), "fc1.weight": (120, 256),
        "fc3.weight": (10, 84),
    }  # fmt: skip
    for key, shape in expected.items():
        assert tuple(state_dict[key].shape) == shape
    assert all(torch.isfinite(t).all() for t in state_dict.values())


# --- deployment ------------------------------------------------------------------------


@dataclass
class Deployment:
    env: dict[str, str]
    superlink: Started
    supernodes: list[Started]
    node_ids: list[int]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Deployment]:
    """``flower-superlink --insecure`` and two ``flower-supernode`` with their node-config."""
    home = tmp_path_factory.mktemp("flwr-home-deployment")
    env = _environment(home)
    port = free_port()
    write_flower_config(home, {"deployment": {"address": f"127.0.0.1:{port}", "insecure": True}})
    started: list[Started] = []
    try:
        superlink = start(
            "superlink",
            ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation"],
            home, env, REPO_ROOT,
        )  # fmt: skip
        started.append(superlink)
        wait_for(lambda: superlink_healthy(port), 90, "the SuperLink", superlink)
        supernodes = []
        for partition in range(2):
            node_config = (
                f"partition-id={partition} num-partitions=2 data-dir={json.dumps(str(data_dir))}"
            )
            supernode = start(
                f"supernode-{partition}",
                ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                 "--port", str(free_port()), "--node-config", node_config],
                home, env, REPO_ROOT,
            )  # fmt: skip
            started.append(supernode)
            supernodes.append(supernode)
        node_ids = []
        for supernode in supernodes:
            wait_for(
                lambda s=supernode: "SuperNode ID:" in s.log(),
                90,
                "SuperNode registration",
                supernode,
            )
            node_ids.append(int(re.search(r"SuperNode ID: (\d+)", supernode.log()).group(1)))
        yield Deployment(env, superlink, supernodes, node_ids)
    finally:
        for process in reversed(started):
            process.stop()
        stop_environment("FLWR_HOME", str(home))


@pytest.mark.timeout(300)
def test_deployment_run(deployment: Deployment, tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    # Every message starts a fresh `flwr-clientapp` process (torch import, data loading), so
    # federated evaluation is left out here to keep the test short; the simulation test has it.
    run_config = {**QUICK_RUN, "fraction-evaluate": 0.0, "checkpoint-dir": str(checkpoints)}
    output = flwr_run(
        REPO_ROOT, "deployment", run_config, deployment.env, tmp_path / "flwr-run.log",
        timeout=240,
    )  # fmt: skip
    _assert_run_finished(output, rounds=2)
    assert output.count("Re-Basin merge: 2 valid replies of 2") == 2
    for node_id in deployment.node_ids:
        assert f"node {node_id}: " in output  # each node's matching is logged by id
    _assert_checkpoints(checkpoints, rounds=2, width=0.125)
    for partition, supernode in enumerate(deployment.supernodes):
        assert f"local train data: 200 examples of mnist (partition {partition}/2)" in (
            ANSI.sub("", supernode.log())
        )


@pytest.mark.timeout(300)
def test_deployment_survives_a_killed_supernode(deployment: Deployment, tmp_path: Path) -> None:
    """SIGKILL one SuperNode (and its ClientApp) once it has taken its training message."""
    victim, victim_id = deployment.supernodes[1], deployment.node_ids[1]
    started_clientapps = victim.log().count("Start `flwr-clientapp` process")
    checkpoints = tmp_path / "checkpoints"
    run_config = {
        **QUICK_RUN,
        "num-server-rounds": 1,
        "fraction-evaluate": 0.0,
        "min-train-nodes": 1,
        # Longer than the survivor needs on a busy machine. The dead node's message ends
        # sooner: once its heartbeat is overdue (at most 60 s after the kill) the SuperLink
        # answers it with a "node unavailable" error reply.
        "round-timeout": 150.0,
        "checkpoint-dir": str(checkpoints),
    }
    log_path = tmp_path / "flwr-run.log"
    command = [
        str(VENV_BIN / "flwr"), "run", str(REPO_ROOT), "deployment", "--stream",
        "--run-config", _run_config(run_config),
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        run = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=deployment.env,
            cwd=REPO_ROOT, start_new_session=True,
        )  # fmt: skip
    try:
        # The victim has pulled this run's training message and is starting its ClientApp.
        wait_for(
            lambda: victim.log().count("Start `flwr-clientapp` process") > started_clientapps,
            120, "the SuperNode to start training", victim,
        )  # fmt: skip
        tree = descendants(victim.pid)
        signal_tree(tree, signal.SIGKILL)
        killed_at = time.monotonic()
        run.wait(timeout=240)
        assert time.monotonic() - killed_at < 200
    finally:
        stop_tree(run.pid)
    output = ANSI.sub("", log_path.read_text(errors="replace"))
    assert run.returncode == 0, output
    _assert_run_finished(output, rounds=1)
    # The server names the node that failed: the SuperLink's "node unavailable" error reply
    # for it (heartbeat overdue), or, had the round timeout come first, its missing reply.
    unavailable = f"round 1 train: node {victim_id} failed: Error: Node Unavailable"
    silent = f"round 1 train: no reply from node {victim_id} within the round timeout (150 s)"
    assert unavailable in output or silent in output, output
    assert re.search(r"Re-Basin merge: 1 valid replies of [12] ", output), output
    assert load_checkpoint(checkpoints / "round-0001.safetensors").round == 1
    assert all(not Path(f"/proc/{pid}").exists() or _is_zombie(pid) for pid in tree)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
