"""The Docker deployment's files: compose files, images, connections, health checks.

No Docker engine is needed. The compose files are checked against the Compose
specification's JSON schema (the copy that check-jsonschema ships) and for the topology the
deployment needs; every service's command is parsed by Flower's own command-line parser.
The same services run as processes in tests/test_docker_deployment.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import flwr
import pytest
import yaml
from compose_files import (
    BASE,
    CONNECTIONS,
    PLACEHOLDER,
    REGIONS,
    TLS,
    ComposeError,
    clientapp_executor_of,
    dockerfile_stages,
    load_compose,
    merge_compose,
)
from compose_processes import LocalTranslation, ServiceProcess, plan_services
from conftest import REPO_ROOT
from flower_processes import (
    VENV_BIN,
    free_port,
)
from flwr.common.config import parse_config_args
from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink as superlink_parser
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode as supernode_parser

from client.config import NodeDataConfig

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
