"""The Docker deployment, run: certificates, and the compose files' services as processes.

The services are run as local processes, exactly as the compose files describe them
(tests/compose_processes.py translates hosts, ports and mounts): the plain deployment and
the TLS one (docker-compose.tls.yml, certificates and SuperNode keys from
docker/certs/generate.sh, keys registered with ``flwr supernode register``) each finish a
``flwr run``; a SuperNode without the CA certificate, and one with an unregistered key, are
refused with a clear error. The files themselves are checked in tests/test_docker_compose.py.
"""

from __future__ import annotations

import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from compose_deployment import (
    ANSI,
    GENERATE,
    QUICK_RUN,
    Deployment,
    deployed,
    process_environment,
    run_config_argument,
    run_flwr,
)
from compose_files import BASE, REGIONS, TLS
from compose_running import healthy
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.x509.oid import ExtendedKeyUsageOID
from flower_processes import (
    Started,
    free_port,
    start,
)

from server.checkpoint import load_checkpoint

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
    with deployed((BASE,), tmp_path, data_dir) as deployment:
        output = run_flwr(
            ["run", ".", "docker", "--stream", "--run-config", run_config_argument(QUICK_RUN)],
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
    with deployed((BASE, TLS), root, data_dir, certs) as deployment:
        yield deployment


@pytest.mark.timeout(420)
def test_tls_deployment_runs_as_processes(tls_deployment: Deployment, tmp_path: Path) -> None:
    output = run_flwr(
        ["run", ".", "docker-tls", "--stream", "--run-config", run_config_argument(QUICK_RUN)],
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
    return start(name, argv, home, process_environment(home)(service), home)


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
