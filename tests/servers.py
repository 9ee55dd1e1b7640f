"""Real gRPC servers on loopback, in this process: an asyncio loop in a background thread runs
them, and tests talk to them with ordinary synchronous gRPC clients."""

from __future__ import annotations

import asyncio
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

import grpc

from draft_service.servicer import SERVICE_NAME as DRAFT_SERVICE
from draft_service.servicer import DraftServicer
from draft_service.servicer import add_to_server as add_draft
from orchestrator.__main__ import build, parse_flags
from specdec.engine.base import Engine
from specdec.serving.server import Server
from specdec.serving.session_servicer import ServiceLimits
from specdec.telemetry import Telemetry
from specdec.v1 import generate_pb2_grpc, session_pb2, session_pb2_grpc
from target_service.servicer import SERVICE_NAME as TARGET_SERVICE
from target_service.servicer import TargetServicer
from target_service.servicer import add_to_server as add_target


class Loop:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class Running:
    server: Server
    address: str
    servicer: object = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_model_service(loop: Loop, role: str, engine: Engine, max_sessions: int = 8, max_draft_tokens: int = 16,
                        telemetry=None, port: int = 0, credentials=None, **limits) -> Running:  # fmt: skip
    servicer_type, add, name = {
        "draft": (DraftServicer, add_draft, DRAFT_SERVICE),
        "target": (TargetServicer, add_target, TARGET_SERVICE),
    }[role]
    telemetry = telemetry or Telemetry.disabled(role)
    servicer = servicer_type(engine, ServiceLimits(max_sessions, max_draft_tokens, **limits), telemetry)

    async def start():
        server = Server([name], lambda s: add(servicer, s), "127.0.0.1", port, telemetry, credentials=credentials)
        return server, await server.start()

    server, port = loop.run(start())
    return Running(server, f"127.0.0.1:{port}", servicer)


def start_orchestrator(loop: Loop, target: str, draft: str, tokenizer: str, *flags: str, telemetry=None,
                       wait_draft: bool = True) -> Running:  # fmt: skip
    """An orchestrator once its target has answered, and (wait_draft) its draft too."""
    args = parse_flags(
        ["--host", "127.0.0.1", "--port", "0", "--target", target, "--draft", draft, "--tokenizer", tokenizer, *flags]
    )  # fmt: skip

    async def start():
        server, startup = build(args, telemetry or Telemetry.disabled("orchestrator"))
        port = await server.start(serving=False)
        servicer = await asyncio.wait_for(startup(), 10)
        await server.set_serving(True)
        deadline = time.monotonic() + 10
        while wait_draft and draft and not servicer.drafting(1) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return server, port, servicer

    server, port, servicer = loop.run(start())
    return Running(server, f"127.0.0.1:{port}", servicer)


@dataclass
class Stack:
    """Draft, target and orchestrator servers, and channels to each."""

    loop: Loop
    draft: Running | None
    target: Running
    orchestrator: Running
    channels: list = field(default_factory=list)

    def channel(self, address: str) -> grpc.Channel:
        channel = grpc.insecure_channel(address)
        self.channels.append(channel)
        return channel

    def generator(self):
        return generate_pb2_grpc.GeneratorStub(self.channel(self.orchestrator.address))

    def info(self, role: str) -> session_pb2.ServiceInfo:
        running = self.draft if role == "draft" else self.target
        stub_type = session_pb2_grpc.DraftServiceStub if role == "draft" else session_pb2_grpc.TargetServiceStub
        return stub_type(self.channel(running.address)).GetInfo(session_pb2.GetInfoRequest(), timeout=10)

    def wait_sessions(
        self, expected: int, roles: tuple[str, ...] = ("target", "draft"), timeout: float = 10.0
    ) -> dict[str, int]:
        """Polls the services' session counts until they equal `expected`; returns the last seen."""
        roles = [role for role in roles if role == "target" or self.draft]
        deadline = time.monotonic() + timeout
        while True:
            counts = {role: self.info(role).active_sessions for role in roles}
            if all(c == expected for c in counts.values()) or time.monotonic() > deadline:
                return counts
            time.sleep(0.05)

    def stop(self):
        for channel in self.channels:
            channel.close()
        for running in (self.orchestrator, self.draft, self.target):
            if running:
                self.loop.run(running.server.stop(0))
                if running.servicer is not None:
                    running.servicer.close()


def start_stack(loop: Loop, target_engine: Engine, draft_engine: Engine | None, tokenizer: str, *flags: str,
                max_sessions: int = 8, telemetry: dict | None = None) -> Stack:  # fmt: skip
    """telemetry: role -> Telemetry, for the roles that should record."""
    telemetry = telemetry or {}
    target = start_model_service(loop, "target", target_engine, max_sessions, telemetry=telemetry.get("target"))
    draft = None
    if draft_engine:
        draft = start_model_service(loop, "draft", draft_engine, max_sessions, telemetry=telemetry.get("draft"))
    orchestrator = start_orchestrator(
        loop, target.address, draft.address if draft else "", tokenizer, *flags, telemetry=telemetry.get("orchestrator")
    )
    return Stack(loop, draft, target, orchestrator)


class GatedEngine(Engine):
    """Wraps an engine; while the gate is closed its forward passes wait, holding sessions open."""

    def __init__(self, inner: Engine):
        self.inner = inner
        self.info = inner.info
        self.pool = inner.pool
        self.gate = threading.Event()
        self.gate.set()
        self.blocked = threading.Event()  # set once a forward pass waits at the closed gate

    def new_session(self, capacity: int):
        return self.inner.new_session(capacity)

    def end_session(self, session):
        return self.inner.end_session(session)

    def run(self, chunks):
        if not self.gate.is_set():
            self.blocked.set()
            self.gate.wait(60)
        return self.inner.run(chunks)


class HeldSessions:
    """n target sessions opened by another client than the orchestrator, held open until end()."""

    def __init__(self, address: str, n: int, capacity: int = 16):
        self.channel = grpc.insecure_channel(address)
        stub = session_pb2_grpc.TargetServiceStub(self.channel)
        self.held = []
        for _ in range(n):
            requests: queue.Queue = queue.Queue()
            requests.put(session_pb2.TargetRequest(open=session_pb2.OpenSession(capacity=capacity)))
            call = stub.Session(iter(requests.get, None))
            self.held.append((call, requests))
            assert next(call).opened.session_id

    def end(self) -> None:
        for call, requests in self.held:
            requests.put(None)
            call.cancel()
        self.channel.close()


def record_drafted_ahead(monkeypatch) -> list[bool]:
    """Wraps Drafter.propose so a test sees, per proposal, whether it was drafted ahead (overlap)."""
    import orchestrator.drafter

    drafted_ahead: list[bool] = []
    propose = orchestrator.drafter.Drafter.propose

    async def recording(self, committed, k):
        proposal = await propose(self, committed, k)
        drafted_ahead.append(proposal.drafted_ahead)
        return proposal

    monkeypatch.setattr(orchestrator.drafter.Drafter, "propose", recording)
    return drafted_ahead
