"""The Docker deployment: compose files, images, certificates, and the same services as processes.

No Docker engine is needed. The compose files are checked against the Compose
specification's JSON schema (the copy that check-jsonschema ships) and for the topology the
deployment needs; every service's command is parsed by Flower's own command-line parser.
Then the services are run as local processes, exactly as the compose files describe them
(tests/compose_processes.py translates hosts, ports and mounts): the plain deployment and
the TLS one (docker-compose.tls.yml, certificates and SuperNode keys from
docker/certs/generate.sh, keys registered with ``flwr supernode register``) each finish a
``flwr run``; a SuperNode without the CA certificate, and one with an unregistered key, are
refused with a clear error.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import flwr
import pytest
import yaml
from compose_processes import (
    ComposeError,
    LocalTranslation,
    ServiceProcess,
    clientapp_executor_of,
    dockerfile_stages,
    healthy,
    load_compose,
    merge_compose,
    plan_services,
    running,
    wait_healthy,
)
from conftest import REPO_ROOT
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.x509.oid import ExtendedKeyUsageOID
from flower_processes import (
    VENV_BIN,
    Started,
    free_port,
    start,
    stop_tree,
    wait_for,
    write_flower_config,
)
from flwr.common.config import parse_config_args
from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink as superlink_parser
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode as supernode_parser

from client.config import NodeDataConfig
from server.checkpoint import load_checkpoint

BASE = REPO_ROOT / "docker-compose.yml"
TLS = REPO_ROOT / "docker-compose.tls.yml"
CONNECTIONS = REPO_ROOT / "docker" / "config.toml"
GENERATE = REPO_ROOT / "docker" / "certs" / "generate.sh"
CERTS_OUT = REPO_ROOT / "docker" / "certs" / "out"
PLACEHOLDER = "/ABSOLUTE/PATH/TO/REPO"
REGIONS = ("us", "eu")
EXPECTED_SERVICES = {
    "superlink", "superexec-serverapp",
    "supernode-us", "superexec-clientapp-us", "supernode-eu", "superexec-clientapp-eu",
}  # fmt: skip
PARSERS = {
    "flower-superlink": superlink_parser,
    "flower-supernode": supernode_parser,
    "flower-superexec": superexec_parser,
}
TLS_OPTIONS = {  # option -> what its value is (a secret's target or nothing)
    "--ssl-ca-certfile": True, "--ssl-certfile": True, "--ssl-keyfile": True,
    "--root-certificates": True, "--auth-supernode-private-key": True,
    "--enable-supernode-auth": False,
}  # fmt: skip
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


def _parse(argv: tuple[str, ...] | list[str]):
    """``argv`` parsed by the Flower command's own parser (a bad option fails the test)."""
    try:
        return PARSERS[argv[0]]().parse_args(list(argv[1:]))
    except SystemExit:
        pytest.fail(f"{argv[0]} rejects the arguments {list(argv[1:])}")


def _services(*files: Path) -> dict[str, ServiceProcess]:
    """The compose files' services as processes (translated only; nothing is written)."""
    translation = LocalTranslation(load_compose(*files), Path("/nonexistent-root"))
    return {s.name: s for s in plan_services(translation, create=False)}


def _compose_command(files: tuple[Path, ...], service: str) -> list[str]:
    return [str(part) for part in load_compose(*files)["services"][service]["command"]]


# --- the files --------------------------------------------------------------------------


def test_compose_files_validate_against_the_compose_specification(tmp_path: Path) -> None:
    merged = tmp_path / "merged.yml"
    merged.write_text(yaml.safe_dump(load_compose(BASE, TLS)))
    command = [str(VENV_BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]
    result = subprocess.run(
        [*command, str(BASE), str(TLS), str(merged)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The check can fail: a misspelt key is reported by name.
    broken = yaml.safe_load(BASE.read_text())
    broken["services"]["superlink"]["healtcheck"] = broken["services"]["superlink"].pop(
        "healthcheck"
    )
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(broken))
    result = subprocess.run(
        [*command, str(tmp_path / "broken.yml")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1 and "'healtcheck' was unexpected" in result.stdout


def test_every_command_is_accepted_by_flowers_parser_and_the_topology_holds() -> None:
    compose = load_compose(BASE)
    assert set(compose["services"]) == EXPECTED_SERVICES
    services = _services(BASE)
    # The commands as written (and as translated for the process tests) parse.
    parsed = {
        name: _parse((service.argv[0], *_compose_command((BASE,), name)))
        for name, service in services.items()
    }
    for service in services.values():
        _parse(service.argv)
    assert {name: s.argv[0] for name, s in services.items()} == {
        "superlink": "flower-superlink", "superexec-serverapp": "flower-superexec",
        "supernode-us": "flower-supernode", "supernode-eu": "flower-supernode",
        "superexec-clientapp-us": "flower-superexec", "superexec-clientapp-eu": "flower-superexec",
    }  # fmt: skip
    superlink = parsed["superlink"]
    # The SuperLink listens on all interfaces of its container, on the port it publishes,
    # and runs ServerApps in a separate executor (process isolation).
    assert (superlink.host, superlink.port, superlink.isolation) == ("0.0.0.0", 8000, "process")
    assert compose["services"]["superlink"]["ports"] == [
        "${SUPERLINK_PUBLISH_ADDRESS:-127.0.0.1}:8000:8000"
    ]
    assert parsed["superexec-serverapp"].runtime_api_address == "superlink:8000"
    for region in REGIONS:
        node = parsed[f"supernode-{region}"]
        assert (node.superlink, node.host, node.port) == ("superlink:8000", "0.0.0.0", 9094)
        assert node.isolation == "process"
        executor = clientapp_executor_of(compose["services"], f"supernode-{region}")
        assert executor == f"superexec-clientapp-{region}"
        assert parsed[executor].runtime_api_address == f"supernode-{region}:{node.port}"
    for name in EXPECTED_SERVICES:
        config = compose["services"][name]
        assert config["restart"] == "unless-stopped", name
        assert config["healthcheck"]["test"][:2] == ["CMD", "flwr-healthcheck"], name
        if name.startswith("superexec"):
            # The executor's health check asks the health server its command starts.
            assert parsed[name].health_server_address == config["healthcheck"]["test"][3]
            assert parsed[name].insecure  # plain, inside the deployment's network
    assert services["supernode-us"].depends_on == ("superlink",)
    assert services["superexec-clientapp-eu"].depends_on == ("supernode-eu",)
    assert services["superexec-serverapp"].depends_on == ("superlink",)


def test_node_configs_data_mounts_and_named_volumes() -> None:
    compose = load_compose(BASE)
    services = compose["services"]
    partitions, data_sources = [], set()
    for region in REGIONS:
        command = [str(p) for p in services[f"supernode-{region}"]["command"]]
        text = command[command.index("--node-config") + 1]
        node = NodeDataConfig.from_mapping(parse_config_args([text]), what="node-config")
        partitions.append(node.partition)
        # The ClientApp runs in the executor: the data directory is mounted there, read-only.
        volumes = services[f"superexec-clientapp-{region}"]["volumes"]
        assert volumes == [f"${{{region.upper()}_DATA_DIR:-./data/{region}}}:{node.data_dir}:ro"]
        data_sources.add(volumes[0].split(":-")[1].split("}")[0])
        assert "volumes" not in services[f"supernode-{region}"]  # the SuperNode reads no data
    assert partitions == [(0, 2), (1, 2)]
    assert data_sources == {"./data/us", "./data/eu"}  # one directory per region
    # The SuperLink's database and the ServerApp's checkpoints are on named volumes.
    assert set(compose["volumes"]) == {"superlink-state", "server-checkpoints"}
    superlink = [str(p) for p in services["superlink"]["command"]]
    database = PurePosixPath(superlink[superlink.index("--database") + 1])
    assert f"superlink-state:{database.parent}" in services["superlink"]["volumes"]
    # The ServerApp writes to run-config checkpoint-dir, relative to its working directory.
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    checkpoint_dir = pyproject["tool"]["flwr"]["app"]["config"]["checkpoint-dir"]
    server = services["superexec-serverapp"]
    expected = PurePosixPath(server["working_dir"]) / checkpoint_dir
    assert f"server-checkpoints:{expected}" in server["volumes"]
    assert server["environment"] == {"REBASIN_DATA_DIR": "/data"}
    assert "${SERVER_DATA_DIR:-./data/server}:/data:ro" in server["volumes"]


def test_tls_override_adds_only_tls_and_authentication_options() -> None:
    base = load_compose(BASE)["services"]
    override = yaml.safe_load(TLS.read_text())
    merged = load_compose(BASE, TLS)["services"]
    # Every service that talks to the SuperLink is changed, nothing else.
    assert set(override["services"]) == {
        "superlink", "superexec-serverapp", "supernode-us", "supernode-eu"
    }  # fmt: skip
    for name, changes in override["services"].items():
        command = [str(p) for p in changes["command"]]
        targets = {entry["target"] for entry in merged[name]["secrets"]}
        kept, options = [], {}
        index = 0
        while index < len(command):
            if command[index] in TLS_OPTIONS:
                takes_value = TLS_OPTIONS[command[index]]
                options[command[index]] = command[index + 1] if takes_value else True
                index += 2 if takes_value else 1
            else:
                kept.append(command[index])
                index += 1
        assert kept == [p for p in map(str, base[name]["command"]) if p != "--insecure"], name
        for option, value in options.items():
            if TLS_OPTIONS[option]:
                assert value in targets, f"{name}: {option} {value} is not a mounted secret"
        assert "--insecure" not in command
        # Each verifies the SuperLink (or, for the SuperLink, serves) with the project's CA.
        ca_option = "--ssl-ca-certfile" if name == "superlink" else "--root-certificates"
        ca_secret = {e["target"]: e["source"] for e in merged[name]["secrets"]}[options[ca_option]]
        assert ca_secret == "ca-certificate", name
    assert _parse(("flower-superlink", *_compose_command((BASE, TLS), "superlink")))
    superlink_options = set(_compose_command((BASE, TLS), "superlink"))
    assert {"--ssl-ca-certfile", "--ssl-certfile", "--enable-supernode-auth"} <= superlink_options
    for region in REGIONS:
        node = _parse(("flower-supernode", *_compose_command((BASE, TLS), f"supernode-{region}")))
        assert node.root_certificates and node.auth_supernode_private_key and not node.insecure
        secrets = {e["target"]: e["source"] for e in merged[f"supernode-{region}"]["secrets"]}
        assert secrets[node.auth_supernode_private_key] == f"supernode-{region}-key"
    # The secrets are the files generate.sh writes.
    files = {name: Path(s["file"]).name for name, s in override["secrets"].items()}
    assert files == {
        "ca-certificate": "ca.crt", "superlink-certificate": "server.pem",
        "superlink-key": "server.key", "supernode-us-key": "supernode-us.key",
        "supernode-eu-key": "supernode-eu.key",
    }  # fmt: skip
    assert all(s["file"].startswith("./docker/certs/out/") for s in override["secrets"].values())
    healthcheck = merged["superlink"]["healthcheck"]["test"]
    assert healthcheck[3].startswith("https://localhost:8000/") and "--cafile" in healthcheck


def test_merge_follows_compose_rules() -> None:
    base = {"services": {"a": {
        "command": ["x", "y"], "volumes": ["v:/a", "w:/b"],
        "healthcheck": {"test": ["CMD", "p"], "interval": "5s"},
    }}}  # fmt: skip
    override = {"services": {"a": {
        "command": ["z"], "volumes": ["u:/b"], "healthcheck": {"test": ["CMD", "q"]},
    }}}  # fmt: skip
    merged = merge_compose(base, override)["services"]["a"]
    assert merged == {
        "command": ["z"], "volumes": ["v:/a", "u:/b"],
        "healthcheck": {"test": ["CMD", "q"], "interval": "5s"},
    }  # fmt: skip
    assert base["services"]["a"]["command"] == ["x", "y"]  # inputs untouched


def test_flwr_connections_and_images_match_the_compose_files() -> None:
    connections = tomllib.loads(CONNECTIONS.read_text())["superlink"]
    assert set(connections) == {"docker", "docker-tls"}
    compose = load_compose(BASE)
    translation = LocalTranslation(compose, Path("/nonexistent-root"))
    # `flwr` reaches the SuperLink's published port, as the SuperLink's own port 8000.
    for name in connections:
        host, port = connections[name]["address"].rsplit(":", 1)
        assert host in {"127.0.0.1", "localhost"} and translation.published[int(port)] == (
            "superlink", 8000,
        )  # fmt: skip
    assert connections["docker"]["insecure"] is True
    ca_path = f"{PLACEHOLDER}/docker/certs/out/ca.crt"
    assert connections["docker-tls"]["root-certificates"] == ca_path
    # Images: Flower's official ones, of the installed Flower version, by default.
    stages = dockerfile_stages()
    assert {t: s["from"] for t, s in stages.items()} == {
        "superlink": "flwr/superlink:${FLWR_VERSION}",
        "supernode": "flwr/supernode:${FLWR_VERSION}",
        "superexec": "flwr/superexec:${FLWR_VERSION}",
    }
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    assert f"ARG FLWR_VERSION={flwr.__version__}\n" in dockerfile
    for name, service in compose["services"].items():
        assert service["build"]["args"]["FLWR_VERSION"] == f"${{FLWR_VERSION:-{flwr.__version__}}}"
        assert service["image"].endswith(f":${{FLWR_VERSION:-{flwr.__version__}}}"), name
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    copy_healthcheck = "COPY --chmod=0755 docker/healthcheck.py /usr/local/bin/flwr-healthcheck"
    assert dockerfile.count(copy_healthcheck) == 3
    # Everything the images copy is in the build context (.dockerignore lets it through).
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    copied = re.findall(r"^COPY (?:--\S+ )*(\S+(?: \S+)*) \S+$", dockerfile, re.MULTILINE)
    for sources in copied:
        for source in sources.split():
            assert f"!{source}" in ignore or f"!{source}/" in ignore, source
            assert (REPO_ROOT / source).exists(), source


def test_healthcheck_script_reports_an_unreachable_service() -> None:
    port = free_port()
    for kind, target in (
        ("http", f"http://127.0.0.1:{port}/health"),
        ("grpc", f"127.0.0.1:{port}"),
    ):
        result = subprocess.run(
            [sys.executable, str(REPO_ROOT / "docker" / "healthcheck.py"), kind, target],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert result.returncode == 1
        assert result.stderr.startswith("unhealthy: ") and f"127.0.0.1:{port}" in result.stderr


def test_translation_refuses_a_path_no_mount_holds() -> None:
    compose = load_compose(BASE)
    compose["services"]["superlink"]["command"][-1] = "/var/lib/state.db"
    translation = LocalTranslation(compose, Path("/nonexistent-root"))
    with pytest.raises(ComposeError, match="/var/lib/state.db is under no mount"):
        translation.command("superlink")


# --- certificates -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates and SuperNode keys made by docker/certs/generate.sh."""
    out = tmp_path_factory.mktemp("certs") / "out"
    result = subprocess.run(
        ["bash", str(GENERATE), str(out)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_generate_sh_makes_a_ca_a_superlink_certificate_and_supernode_keys(certs: Path) -> None:
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # Signed by the CA (raises if not).
    ca.public_key().verify(
        server.signature, server.tbs_certificate_bytes, padding.PKCS1v15(),
        server.signature_hash_algorithm,
    )  # fmt: skip
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"superlink", "localhost"}
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    key = serialization.load_pem_private_key((certs / "server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    for region in REGIONS:
        private = serialization.load_ssh_private_key(
            (certs / f"supernode-{region}.key").read_bytes(), None
        )
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == "secp384r1"  # what `flwr supernode register` accepts
        public = serialization.load_ssh_public_key((certs / f"supernode-{region}.pub").read_bytes())
        assert public.public_numbers() == private.public_key().public_numbers()
    # Only the owner reaches the folder; the CA key is the owner's alone.
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    assert stat.S_IMODE((certs / "ca.key").stat().st_mode) == 0o600
    # A second run keeps everything (a new CA would lock out the SuperNodes that trust this one).
    before = (certs / "ca.crt").read_bytes()
    again = subprocess.run(
        ["bash", str(GENERATE), str(certs)], capture_output=True, text=True, timeout=60, check=False
    )
    assert again.returncode == 1 and "exists; delete" in again.stderr
    assert (certs / "ca.crt").read_bytes() == before


# --- the deployments, as processes ------------------------------------------------------


@dataclass
class Deployment:
    """The services of some compose files, running as processes, and a ``flwr`` to use them."""

    translation: LocalTranslation
    services: dict[str, ServiceProcess]
    started: dict[str, Started]
    cli_environment: dict[str, str]
    root: Path


def _process_environment(root: Path):
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


def _cli_environment(root: Path, translation: LocalTranslation) -> dict[str, str]:
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
    env = _process_environment(root)(ServiceProcess("cli", ("flwr",), {}, root, None, ()))
    env["FLWR_HOME"] = str(home)
    return env


def _flwr(arguments: list[str], env: dict[str, str], log_path: Path, timeout: float) -> str:
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


def _run_config(values: dict[str, object]) -> str:
    def toml(value: object) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    return " ".join(f"{key}={toml(value)}" for key, value in values.items())


def _option(argv: tuple[str, ...] | list[str], option: str) -> str | None:
    return argv[argv.index(option) + 1] if option in argv else None


@contextlib.contextmanager
def _deployment(
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
    cli_environment = _cli_environment(root, translation)
    logs = root / "logs"
    logs.mkdir()

    def register_key(service: ServiceProcess) -> None:
        key = _option(service.argv, "--auth-supernode-private-key")
        if key is None:
            return
        public = Path(os.path.realpath(key)).with_suffix(".pub")
        output = _flwr(
            ["supernode", "register", str(public), "docker-tls"], cli_environment,
            logs / f"register-{service.name}.log", timeout=120,
        )  # fmt: skip
        assert "registered successfully" in output, output

    with running(services, _process_environment(root), logs, register_key) as started:
        # As `docker compose up --wait`: every service passes its health check.
        for service in services:
            wait_healthy(service, started[service.name], timeout=120)
        for region in REGIONS:
            supernode = started[f"supernode-{region}"]
            wait_for(lambda s=supernode: "SuperNode ID:" in s.log(), 120, "SuperNode ID", supernode)
        yield Deployment(translation, {s.name: s for s in services}, started, cli_environment, root)


def _assert_run_finished(deployment: Deployment, output: str) -> None:
    assert "Strategy execution finished" in output and "[ROUND 1/1]" in output, output
    assert "Traceback" not in output, output
    assert "Re-Basin merge: 2 valid replies of 2" in output, output
    # The ServerApp found its test set through REBASIN_DATA_DIR and the server's data mount.
    assert "round 1 server evaluation: accuracy" in output, output
    # Its checkpoints went to the named volume mounted at its working directory.
    checkpoints = deployment.root / "volumes" / "server-checkpoints"
    assert load_checkpoint(checkpoints / "round-0001.safetensors").round == 1
    assert (checkpoints / "metrics.json").is_file()
    # Each region's ClientApp ran in its executor, on its partition of its data mount.
    for partition, region in enumerate(REGIONS):
        log = ANSI.sub("", deployment.started[f"superexec-clientapp-{region}"].log())
        assert f"local train data: 200 examples of mnist (partition {partition}/2)" in log, log
    for service in deployment.services.values():  # the health checks as commands
        assert healthy(service, in_process=False), f"{service.name} unhealthy after the run"


@pytest.mark.timeout(420)
def test_compose_deployment_runs_as_processes(tmp_path: Path, data_dir: Path) -> None:
    with _deployment((BASE,), tmp_path, data_dir) as deployment:
        output = _flwr(
            ["run", ".", "docker", "--stream", "--run-config", _run_config(QUICK_RUN)],
            deployment.cli_environment, tmp_path / "flwr-run.log", timeout=300,
        )  # fmt: skip
        _assert_run_finished(deployment, output)
        assert "Uvicorn running on http://127.0.0.1:" in deployment.started["superlink"].log()


@pytest.fixture(scope="module")
def tls_deployment(
    tmp_path_factory: pytest.TempPathFactory, data_dir: Path, certs: Path
) -> Iterator[Deployment]:
    """docker-compose.yml with docker-compose.tls.yml, as processes, keys registered."""
    root = tmp_path_factory.mktemp("tls-deployment")
    with _deployment((BASE, TLS), root, data_dir, certs) as deployment:
        yield deployment


@pytest.mark.timeout(420)
def test_tls_deployment_runs_as_processes(tls_deployment: Deployment, tmp_path: Path) -> None:
    output = _flwr(
        ["run", ".", "docker-tls", "--stream", "--run-config", _run_config(QUICK_RUN)],
        tls_deployment.cli_environment, tmp_path / "flwr-run.log", timeout=300,
    )  # fmt: skip
    _assert_run_finished(tls_deployment, output)
    superlink_log = ANSI.sub("", tls_deployment.started["superlink"].log())
    assert "Uvicorn running on https://127.0.0.1:" in superlink_log
    assert "SuperNode authentication is disabled" not in superlink_log


def _start_changed_supernode(
    deployment: Deployment, tmp_path: Path, name: str, change: dict[str, str | None]
) -> Started:
    """supernode-us's command with options changed (``None``: left out), on a new port."""
    service = deployment.services["supernode-us"]
    argv = list(service.argv)
    argv[argv.index("--port") + 1] = str(free_port())
    for option, value in change.items():
        index = argv.index(option)
        if value is None:
            del argv[index : index + 2]
        else:
            argv[index + 1] = value
    home = tmp_path / name
    home.mkdir()
    return start(name, argv, home, _process_environment(home)(service), home)


@pytest.mark.timeout(240)
def test_tls_refuses_a_supernode_without_the_ca_or_with_an_unregistered_key(
    tls_deployment: Deployment, tmp_path: Path
) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    unregistered = tmp_path / "unregistered.key"
    unregistered.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )  # fmt: skip
    )
    # Both at once: each exits on its first attempt to connect.
    attempts = [
        _start_changed_supernode(
            tls_deployment, tmp_path, "supernode-without-ca", {"--root-certificates": None}
        ),
        _start_changed_supernode(
            tls_deployment,
            tmp_path,
            "supernode-unregistered",
            {"--auth-supernode-private-key": str(unregistered)},
        ),  # fmt: skip
    ]
    try:
        for attempt in attempts:
            try:
                attempt.process.wait(timeout=150)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{attempt.name} was not refused within 150 s:\n{attempt.log()}")
    finally:
        for attempt in attempts:
            attempt.stop()
    without_ca, unregistered_node = (ANSI.sub("", attempt.log()) for attempt in attempts)
    for attempt, log in zip(attempts, (without_ca, unregistered_node)):
        assert attempt.process.returncode != 0, log
        assert "Exit Code: 305" in log and "SuperNode ID:" not in log, log
    assert "SSL/TLS handshake error" in without_ca, without_ca
    assert "certificate verify failed: unable to get local issuer certificate" in without_ca
    assert "Failed to activate SuperNode" in unregistered_node, unregistered_node
