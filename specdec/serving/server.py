"""What every service process shares: the gRPC server with health checking and reflection,
start-up logging, and a graceful stop on SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Callable, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specdec.telemetry import Telemetry

log = logging.getLogger(__name__)

# Probability rows of a large vocabulary for k + 1 positions exceed gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class Drainable(Protocol):
    """A servicer that can stop taking streams: while `draining` it refuses new ones
    (UNAVAILABLE); in_flight() counts the ones still open."""

    draining: bool

    def in_flight(self) -> int: ...


class Server:
    """An aio gRPC server for one role. `register` adds the role's servicers to it."""

    def __init__(
        self,
        service_names: list[str],
        register: Callable[[grpc.aio.Server], None],
        host: str,
        port: int,
        telemetry: Telemetry,
        drainable: Drainable | None = None,
    ):
        self.service_names = service_names
        self.drainable = drainable
        self.telemetry = telemetry
        self.server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=telemetry.server_interceptors())
        register(self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.host = host
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")

    async def start(self) -> int:
        await self.server.start()
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("listening on %s:%d", self.host, self.port)
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.telemetry.shutdown()  # exports what is still buffered

    async def drain(self, grace: float) -> None:
        """Health NOT_SERVING and new streams refused (UNAVAILABLE: a client or balancer retries
        elsewhere) at once; the server keeps answering health checks while the streams in flight
        finish, for up to `grace` seconds; then it stops, cancelling any left."""
        await self.health.enter_graceful_shutdown()
        if self.drainable is not None:
            self.drainable.draining = True
            deadline = time.monotonic() + grace
            log.info("draining: %d streams in flight, up to %.0f s", self.drainable.in_flight(), grace)
            while self.drainable.in_flight() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.drainable.in_flight():
                log.warning("grace over: cancelling %d streams", self.drainable.in_flight())
        await self.stop(0 if self.drainable is not None else grace)

    async def serve_until_signal(self, grace: float = 30.0) -> None:
        """Runs until SIGTERM or SIGINT, then drains (drain) and stops."""
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping (grace %.0f s)", grace)
        await self.drain(grace)


def setup_logging(level: str, role: str) -> None:
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
