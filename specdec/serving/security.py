"""TLS on every hop, and a bearer token on the public API.

Servers: --tls-cert and --tls-key serve TLS; --tls-client-ca also requires every client to present
a certificate that CA signed (mutual TLS). The orchestrator's channels to its services:
--tls-ca verifies the services against that CA; --tls-client-cert and --tls-client-key present
the orchestrator's own certificate (for services that require one). --auth-token-file makes the
Generator service require `authorization: Bearer <token>`: a missing or wrong token gets
UNAUTHENTICATED and one fixed message, whatever was wrong. Health and reflection stay open, for
probes. Plaintext stays the default (loopback, compose).
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token"


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{flag} {path}: {e.strerror}") from None


def server_credentials(cert: str, key: str, client_ca: str) -> grpc.ServerCredentials | None:
    """None (plaintext) unless a certificate and key are given."""
    if not (cert or key):
        if client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise ValueError("--tls-cert and --tls-key go together")
    return grpc.ssl_server_credentials(
        [(_read("--tls-key", key), _read("--tls-cert", cert))],
        root_certificates=_read("--tls-client-ca", client_ca) if client_ca else None,
        require_client_auth=bool(client_ca),
    )


def channel_credentials(ca: str, cert: str, key: str) -> grpc.ChannelCredentials | None:
    """None (plaintext) unless one of them is given; without a CA the system's roots verify."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ValueError("--tls-client-cert and --tls-client-key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read("--tls-ca", ca) if ca else None,
        private_key=_read("--tls-client-key", key) if key else None,
        certificate_chain=_read("--tls-client-cert", cert) if cert else None,
    )


def open_channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    """A (blocking) channel: TLS with `credentials`, plaintext without."""
    return grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)


def read_token(path: str) -> str:
    token = _read("--auth-token-file", path).decode().strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"--auth-token-file {path}: expected one token (no spaces), got {len(token.split())} words")
    return token


async def _unauthenticated(request, context) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


class BearerToken(grpc.aio.ServerInterceptor):
    """Lets a call to `service` through only with `authorization: Bearer <token>`."""

    def __init__(self, token: str, service: str):
        self.expected = f"Bearer {token}".encode()
        self.prefix = f"/{service}/"

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), self.expected):
            return handler
        # A coroutine that aborts serves any kind of RPC (grpc.aio accepts one for streams too).
        kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
        return handler._replace(**{kind: _unauthenticated})
