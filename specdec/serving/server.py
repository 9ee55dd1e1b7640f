"""What every service process shares: the gRPC server with health checking and reflection,
start-up logging, and a graceful stop on SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Callable

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


class Server:
    """An aio gRPC server for one role. `register` adds the role's servicers to it."""

    def __init__(
        self,
        service_names: list[str],
        register: Callable[[grpc.aio.Server], None],
        host: str,
        port: int,
        telemetry: Telemetry,
    ):
        self.service_names = service_names
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

    async def serve_until_signal(self, grace: float = 5.0) -> None:
        """Runs until SIGTERM or SIGINT, then lets streams in flight finish for `grace` seconds."""
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping (grace %.0f s)", grace)
        await self.stop(grace)


def setup_logging(level: str, role: str) -> None:
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
