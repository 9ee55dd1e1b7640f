"""Where a role's replicas are, from the --target / --draft flag: fixed addresses, or a DNS name
that replicas.py resolves again and again (a Kubernetes headless Service: one address per ready
pod)."""

from __future__ import annotations

import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Discovery:
    """Where a role's replicas are: fixed addresses, or a DNS name resolved again and again."""

    addresses: tuple[str, ...] = ()
    dns_host: str = ""
    dns_port: int = 0

    @classmethod
    def parse(cls, spec: str) -> Discovery:
        spec = spec.strip()
        if spec.startswith("dns:"):
            name = spec[len("dns:"):]
            if name.startswith("//"):
                authority, _, name = name[2:].partition("/")
                if authority:
                    raise ValueError(f"{spec}: a DNS server of its own (dns://server/...) is not supported")
            host, port = _host_port(name, spec)
            return cls(dns_host=host, dns_port=port)
        if spec.startswith(("ipv4:", "ipv6:")):  # gRPC's form: one scheme, several addresses
            scheme, _, rest = spec.partition(":")
            addresses = tuple(f"{scheme}:{a.strip()}" for a in rest.split(",") if a.strip())
        elif spec.startswith("unix:"):
            addresses = (spec,)
        else:
            addresses = tuple(a.strip() for a in spec.split(",") if a.strip())
        if not addresses:
            raise ValueError(f"{spec!r} names no address")
        return cls(addresses=addresses)


def _host_port(text: str, spec: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{spec}: dns:///host:port needs a host and a port")
    return host.strip("[]"), int(port)


def socket_address(family: int, sockaddr: tuple) -> str:
    return f"[{sockaddr[0]}]:{sockaddr[1]}" if family == socket.AF_INET6 else f"{sockaddr[0]}:{sockaddr[1]}"
