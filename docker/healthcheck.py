#!/usr/bin/env python
"""Health check of the Flower services in docker-compose.yml (exit 0: healthy, 1: not).

Copied into the images as ``/usr/local/bin/flwr-healthcheck``; it needs only the standard
library and, for ``grpc``, the gRPC packages every Flower image has.

Usage
-----
``flwr-healthcheck http URL [--cafile CA]``
    GET ``URL`` (the ``/health`` endpoint of a SuperLink or SuperNode); healthy on a 2xx
    answer. An ``https`` URL is verified against ``CA`` (default: the system's CAs).
``flwr-healthcheck grpc HOST:PORT``
    Ask a gRPC health server (``--health-server-address`` of ``flower-superexec``); healthy
    when it answers SERVING.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 3.0


def check_http(url: str, cafile: str | None) -> str | None:
    """``None`` if ``url`` answers 2xx, else why not."""
    context = ssl.create_default_context(cafile=cafile) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        return f"{url} answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url} unreachable: {getattr(exc, 'reason', exc)}"
    return None if 200 <= status < 300 else f"{url} answered HTTP {status}"


def check_grpc(address: str) -> str | None:
    """``None`` if the gRPC health server at ``address`` is SERVING, else why not."""
    import grpc  # imported here: the http check must work without gRPC
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            return f"gRPC health server {address} unreachable: {exc.code().name}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return f"gRPC health server {address} is {status}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flwr-healthcheck", description=__doc__.split("\n")[0])
    kinds = parser.add_subparsers(dest="kind", required=True)
    http = kinds.add_parser("http", help="GET a /health URL")
    http.add_argument("url")
    http.add_argument("--cafile", help="CA certificate that signed the server's (https)")
    grpc_parser = kinds.add_parser("grpc", help="ask a gRPC health server")
    grpc_parser.add_argument("address", help="HOST:PORT")
    args = parser.parse_args(argv)
    problem = check_http(args.url, args.cafile) if args.kind == "http" else check_grpc(args.address)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
