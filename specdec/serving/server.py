"""What every service process shares: the gRPC server with health checking and reflection,
explicit message limits, optional TLS, start-up logging, and a graceful stop on SIGTERM / SIGINT.

A process listens first and gets ready after: health answers NOT_SERVING from the moment it
listens, while the process loads its model or reaches its backends (`startup`), and SERVING once
it is ready. Services may then start in any order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specdec.serving.handlers import RejectMalformed
from specdec.telemetry import Telemetry

log = logging.getLogger(__name__)

MiB = 2**20


@dataclass(frozen=True)
class MessageLimits:
    """The largest message a server (or channel) receives and sends; larger ones are refused
    with RESOURCE_EXHAUSTED before they cost any memory beyond their bytes."""

    receive: int
    send: int

    def options(self) -> list[tuple[str, int]]:
        return [("grpc.max_receive_message_length", self.receive), ("grpc.max_send_message_length", self.send)]

    def of_clients(self) -> MessageLimits:
        """The limits of a channel that talks to such a server."""
        return MessageLimits(receive=self.send, send=self.receive)


# A model service receives token ids (a whole prompt at ~5 bytes a token fits in far less) and
# sends probability rows: k + 1 rows of a 152k vocabulary are 10 MiB.
MODEL_SERVICE_MESSAGES = MessageLimits(receive=4 * MiB, send=64 * MiB)
# The public Generator receives a prompt (text or token ids) and streams small responses.
GENERATOR_MESSAGES = MessageLimits(receive=4 * MiB, send=4 * MiB)


class StartupError(Exception):
    """A process cannot get ready (no device, a model it cannot load, a misconfiguration): it
    logs the message and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


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
        messages: MessageLimits = MODEL_SERVICE_MESSAGES,
        credentials: grpc.ServerCredentials | None = None,
        interceptors: tuple = (),
    ):
        self.service_names = service_names
        self.drainable = drainable
        self.telemetry = telemetry
        self.server = grpc.aio.server(
            options=messages.options(),
            # `interceptors` (a token check) come first: a caller without the token learns nothing more.
            interceptors=[*interceptors, RejectMalformed(), *telemetry.server_interceptors()],
        )
        register(self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.on_stop: list[Callable[[], None]] = []  # what else ends with the server (background watchers)
        self.host = host
        address = f"{host}:{port}"
        self.tls = credentials is not None
        self.port = (
            self.server.add_secure_port(address, credentials) if credentials else self.server.add_insecure_port(address)
        )
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")

    async def start(self, serving: bool = True) -> int:
        await self.server.start()
        await self.set_serving(serving)
        log.info("listening on %s:%d%s", self.host, self.port, " (TLS)" if self.tls else "")
        return self.port

    async def set_serving(self, serving: bool) -> None:
        """Health SERVING or NOT_SERVING, for the process and each of its services (ignored once
        the server drains)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for stop in self.on_stop:
            stop()
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

    async def serve_until_signal(self, grace: float = 30.0, startup: Callable[[], Awaitable] | None = None) -> int:
        """Listens (NOT_SERVING), runs `startup`, serves (SERVING) until SIGTERM or SIGINT, then
        drains (drain) and stops. -> the exit code: 0, or a StartupError's."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start(serving=startup is None)
        if startup is not None:
            starting, stopping = asyncio.ensure_future(startup()), asyncio.ensure_future(stop.wait())
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not starting.done():
                log.info("stopping before ready")
                starting.cancel()
                await self.stop(0)
                return 0
            if isinstance(starting.exception(), StartupError):
                log.error("%s", starting.exception())
                await self.stop(0)
                return starting.exception().exit_code
            starting.result()  # a bug: raised as it is
            await self.set_serving(True)
            log.info("ready: serving on %s:%d", self.host, self.port)
        await stop.wait()
        log.info("stopping (grace %.0f s)", grace)
        await self.drain(grace)
        return 0


def in_daemon_thread(fn: Callable):
    """fn() on a thread of its own, awaited: the event loop meanwhile answers health checks and
    signals (a SIGTERM while a model loads exits without waiting for the load)."""
    future = concurrent.futures.Future()

    def run() -> None:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 (handed to the awaiting coroutine)
            if not future.cancelled():
                future.set_exception(e)
        else:
            if not future.cancelled():  # the process stopped before it was ready
                future.set_result(result)

    threading.Thread(target=run, name="load", daemon=True).start()
    return asyncio.wrap_future(future)


def setup_logging(level: str, role: str) -> None:
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
