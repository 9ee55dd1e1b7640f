"""The orchestrator's channels to its draft and target services, and what it learns of them.

Services start in any order and may be slow to load (a 1.5B model from a GGUF takes minutes), so
the orchestrator never gives up on one: it asks each for its GetInfo until it answers (wait_info),
and follows the target channel's connectivity afterwards to report its own health
(follow_connectivity). Channels reconnect within MAX_RECONNECT_BACKOFF_MS of a service coming
(back) up; gRPC's default backoff grows to two minutes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import grpc

from specdec.serving.server import MODEL_SERVICE_MESSAGES
from specdec.telemetry import Telemetry
from specdec.v1 import session_pb2

log = logging.getLogger(__name__)

MAX_RECONNECT_BACKOFF_MS = 5000
INFO_POLL_SECONDS = 1.0  # between GetInfo calls while a service loads (it answers UNAVAILABLE at once)
WAIT_LOG_SECONDS = 30.0  # how often "still waiting" is logged


class IncompatibleService(Exception):
    """A service answered, but it is not what this orchestrator can work with."""


@dataclass
class Backend:
    """A draft or target service address (any number of replicas behind it) and, once it has
    answered, what it serves."""

    role: str
    address: str
    channel: grpc.aio.Channel
    stub: object
    info: session_pb2.ServiceInfo | None = None


def open_backend(role: str, address: str, stub_type, telemetry: Telemetry,
                 credentials: grpc.ChannelCredentials | None = None) -> Backend:  # fmt: skip
    """A round-robin channel (each session stream then stays on the replica it opened on)."""
    options = [
        *MODEL_SERVICE_MESSAGES.of_clients().options(),
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]
    interceptors = telemetry.client_interceptors()
    if credentials is None:
        channel = grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    else:
        channel = grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
    return Backend(role, address, channel, stub_type(channel))


async def wait_info(backend: Backend) -> session_pb2.ServiceInfo:
    """The service's GetInfo, asked until it answers: it may not listen yet, or be loading."""
    started, logged = time.monotonic(), -WAIT_LOG_SECONDS
    while True:
        try:
            info = await backend.stub.GetInfo(session_pb2.GetInfoRequest(), wait_for_ready=True, timeout=5.0)
            break
        except grpc.aio.AioRpcError as e:
            waited = time.monotonic() - started
            if waited - logged >= WAIT_LOG_SECONDS:
                log.info("waiting for the %s service at %s (%.0f s so far): %s",
                         backend.role, backend.address, waited, e.details())  # fmt: skip
                logged = waited
            await asyncio.sleep(INFO_POLL_SECONDS)
    if info.role != backend.role:
        raise IncompatibleService(
            f"{backend.address} is a {info.role or 'unknown'} service, not a {backend.role} service"
        )
    log.info("%s service at %s: %s (%s, %s)", backend.role, backend.address, info.model_name, info.backend, info.device)
    backend.info = info
    return info


async def follow_connectivity(channel: grpc.aio.Channel, report: Callable[[bool], Awaitable]) -> None:
    """report(True) while the channel has a replica it can reach, report(False) while it has
    none; until the channel closes."""
    reachable = None
    while True:
        state = channel.get_state(try_to_connect=True)
        if state == grpc.ChannelConnectivity.SHUTDOWN:
            return
        now = {grpc.ChannelConnectivity.READY: True, grpc.ChannelConnectivity.TRANSIENT_FAILURE: False}.get(state)
        if now is not None and now != reachable:
            reachable = now
            await report(now)
        await channel.wait_for_state_change(state)
