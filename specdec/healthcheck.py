"""Exit 0 when the gRPC health service at ADDRESS answers SERVING (a container health check).

python -m specdec.healthcheck localhost:50053 [SERVICE] [--tls-ca CA [--tls-client-cert C --tls-client-key K]]
"""

from __future__ import annotations

import argparse

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.serving.security import channel_credentials, open_channel


def is_serving(address: str, service: str = "", timeout: float = 2.0, credentials=None) -> bool:
    with open_channel(address, credentials) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdec.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("address")
    parser.add_argument("service", nargs="?", default="")
    parser.add_argument("--tls-ca", default="", help="the server is TLS: verify it against this CA (PEM)")
    parser.add_argument("--tls-client-cert", default="", help="present this certificate (mutual TLS)")
    parser.add_argument("--tls-client-key", default="")
    args = parser.parse_args(argv)
    try:
        credentials = channel_credentials(args.tls_ca, args.tls_client_cert, args.tls_client_key)
    except ValueError as e:
        parser.error(str(e))
    return 0 if is_serving(args.address, args.service, credentials=credentials) else 1


if __name__ == "__main__":
    raise SystemExit(main())
