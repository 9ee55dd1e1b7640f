"""The shell the draft and target services share: one bidirectional stream is one session.

The stream's first message opens the session and sizes its KV cache; each later command runs on
the engine in the service's single device thread (one device, one queue); when the stream ends,
however it ends, the session's cache is released. Subclasses say which command they take and how
to run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from specdec.engine.base import Engine, KVSession
from specdec.errors import InvalidArgument, ResourceExhausted
from specdec.sampling import Sampler
from specdec.telemetry import Telemetry, extract_context
from specdec.v1 import session_pb2
from specdec.wire import sampling_from_proto

log = logging.getLogger(__name__)


@dataclass
class Session:
    id: str
    kv: KVSession
    sampler: Sampler


class SessionServicer:
    role: str  # "draft" / "target"
    command: str  # the oneof field of the role's command: "propose" / "score"
    step_name: str  # what a command after the prefill is called in spans and metrics: "draft" / "verify"
    response_type: type

    def __init__(self, engine: Engine, max_sessions: int, max_draft_tokens: int, telemetry: Telemetry | None = None):
        self.engine = engine
        self.max_sessions = max_sessions
        self.max_draft_tokens = max_draft_tokens
        self.sessions: dict[str, Session] = {}
        self.reserved = 0  # slots taken by sessions still allocating their cache
        self.device = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.role}-device")
        telemetry = telemetry or Telemetry.disabled(self.role)
        self.tracer = telemetry.tracer
        meter = telemetry.meter
        self.durations = {
            phase: meter.create_histogram(
                f"specdec.{phase}.duration", unit="s", description=f"Time on the device per {phase} command"
            )
            for phase in ("prefill", self.step_name)
        }
        self.active_sessions = meter.create_up_down_counter("specdec.sessions.active", unit="{session}")

    def run(self, session: Session, command) -> object:
        """Runs one command on the engine (in the device thread); returns the response message."""
        raise NotImplementedError

    def span_attributes(self, command) -> dict:
        """The role's own attributes of a command's span."""
        raise NotImplementedError

    def execute(self, session: Session, request, received: float) -> object:
        """Runs one command in the device thread inside its span. The span measures time on the
        device; the time the command waited for the device is an attribute."""
        command = getattr(request, self.command)
        phase = "prefill" if command.start_position == 0 else self.step_name
        start = time.perf_counter()
        parent = extract_context(request.trace_context) if request.trace_context else None
        with self.tracer.start_as_current_span(phase, context=parent) as span:
            if span.is_recording():
                span.set_attributes(
                    {
                        "specdec.session.id": session.id,
                        "specdec.start_position": command.start_position,
                        "specdec.rollback": max(session.kv.length - command.start_position, 0),
                        "specdec.input_tokens": len(command.token_ids),
                        "specdec.queue.seconds": start - received,
                        **self.span_attributes(command),
                    }
                )
            response = self.run(session, command)
        self.durations[phase].record(time.perf_counter() - start)
        return response

    async def GetInfo(self, request, context) -> session_pb2.ServiceInfo:
        info = self.engine.info
        return session_pb2.ServiceInfo(
            role=self.role,
            model_name=info.name,
            model_family=info.family,
            vocab_size=info.vocab_size,
            max_seq_len=info.max_seq_len,
            eos_token_ids=info.eos_token_ids,
            dtype=info.dtype,
            device=info.device,
            backend=info.backend,
            max_draft_tokens=self.max_draft_tokens,
            active_sessions=len(self.sessions),
            max_sessions=self.max_sessions,
        )

    async def Session(self, request_iterator, context):
        session: Session | None = None
        loop = asyncio.get_running_loop()
        try:
            async for request in request_iterator:
                kind = request.WhichOneof("command")
                if kind == "open":
                    if session is not None:
                        raise InvalidArgument("open", "the session is already open")
                    session = await self._open(request.open)
                    yield self.response_type(opened=session_pb2.SessionOpened(session_id=session.id))
                elif kind == self.command:
                    if session is None:
                        raise InvalidArgument(kind, "the first message of a session must be `open`")
                    yield await loop.run_in_executor(self.device, self.execute, session, request, time.perf_counter())
                else:
                    raise InvalidArgument("command", f"expected `open` or `{self.command}`, got {kind or 'nothing'}")
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.role}: {e}")
        except (ResourceExhausted, MemoryError, torch.OutOfMemoryError) as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.role}: {e or 'out of memory'}")
        except Exception as e:  # a bug must cost this session only, never the process
            log.exception("session %s failed", session.id if session else "-")
            await context.abort(grpc.StatusCode.INTERNAL, f"{self.role}: {type(e).__name__}: {e}")
        finally:
            if session is not None:
                # Queued behind any step of this session still running on the device thread.
                with contextlib.suppress(RuntimeError):  # the executor is gone: the process is ending
                    self.device.submit(self.engine.end_session, session.kv)
                self.sessions.pop(session.id, None)
                self.active_sessions.add(-1)
                log.info("session %s closed; %d active", session.id, len(self.sessions))

    async def _open(self, msg: session_pb2.OpenSession) -> Session:
        max_len = self.engine.info.max_seq_len
        if not 1 <= msg.capacity <= max_len:
            raise InvalidArgument("open.capacity", f"must be in [1, {max_len}], got {msg.capacity}")
        sampler = Sampler(sampling_from_proto(msg.sampling))
        # Count and reserve before the first await, so concurrent opens cannot overshoot the limit.
        if len(self.sessions) + self.reserved >= self.max_sessions:
            raise ResourceExhausted(f"all {self.max_sessions} sessions are in use")
        self.reserved += 1
        try:
            kv = await asyncio.get_running_loop().run_in_executor(self.device, self.engine.new_session, msg.capacity)
        finally:
            self.reserved -= 1
        session = Session(uuid.uuid4().hex[:12], kv, sampler)
        self.sessions[session.id] = session
        self.active_sessions.add(1)
        log.info("session %s opened, capacity %d; %d active", session.id, msg.capacity, len(self.sessions))
        return session

    def check_block(self, field: str, size: int, limit: int) -> None:
        if size > limit:
            raise InvalidArgument(field, f"{size} exceeds this service's maximum {limit} (--max-draft-tokens)")
