"""The shell the draft and target services share: one bidirectional stream is one session.

The stream's first message opens the session (room in the engine's KV pool); each later command
becomes a job for the service's scheduler, which runs it in forward passes shared with every other
session's waiting work; when the stream ends, however it ends, the session's KV goes back to the
pool. Turning a finished job into a response message (probabilities to bytes) runs on a host
thread, off the device thread and outside the span that times the device. Subclasses say which
command they take, how it becomes a job and how a job becomes a response.
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
from google.protobuf.message import DecodeError
from opentelemetry.metrics import Observation
from opentelemetry.trace import Status, StatusCode

from specdec.engine.base import Engine, KVSession, is_prefill
from specdec.errors import InvalidArgument, ResourceExhausted, ShuttingDown
from specdec.sampling import Sampler
from specdec.serving.jobs import Job, PassRecord
from specdec.serving.scheduler import PassStats, Scheduler
from specdec.telemetry import Telemetry, extract_context
from specdec.v1 import session_pb2
from specdec.wire import sampling_from_proto

log = logging.getLogger(__name__)

ROWS_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


@dataclass(frozen=True)
class ServiceLimits:
    max_sessions: int = 16
    max_draft_tokens: int = 16  # largest k a command may carry
    max_batch_tokens: int = 256  # rows of one forward pass
    prefill_chunk: int = 64  # prompt tokens one session puts in one pass


@dataclass
class Session:
    id: str
    kv: KVSession
    sampler: Sampler


def batch_stats(record: PassRecord) -> session_pb2.BatchStats:
    return session_pb2.BatchStats(
        passes=record.passes, rows=record.rows, sessions=record.sessions,
        device_seconds=record.device_seconds, queue_seconds=record.queue_seconds,
    )  # fmt: skip


class SessionServicer:
    role: str  # "draft" / "target"
    command: str  # the oneof field of the role's command: "propose" / "score"
    step_name: str  # what a command after the prefill is called in spans and metrics: "draft" / "verify"
    response_type: type

    def __init__(self, engine: Engine, limits: ServiceLimits, telemetry: Telemetry | None = None,
                 tokenizer_fingerprint: str = ""):  # fmt: skip
        """tokenizer_fingerprint: the model's vocabulary identity (specdec/vocabulary.py), for GetInfo."""
        self.engine = engine
        self.limits = limits
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.sessions: dict[str, Session] = {}
        self.draining = False  # set on SIGTERM (Server.drain): new sessions are refused
        self.reserved = 0  # slots taken by sessions still borrowing their KV
        self.host = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{self.role}-host")
        telemetry = telemetry or Telemetry.disabled(self.role)
        self.tracer = telemetry.tracer
        meter = telemetry.meter
        self.durations = {
            phase: meter.create_histogram(
                f"specdec.{phase}.duration", unit="s", description=f"Time on the device per {phase} command"
            )
            for phase in ("prefill", self.step_name)
        }
        self.queue_duration = meter.create_histogram(
            "specdec.queue.duration", unit="s", description="From a command's arrival to its first forward pass"
        )
        self.pass_duration = meter.create_histogram("specdec.pass.duration", unit="s", description="One forward pass")
        self.pass_rows = meter.create_histogram(
            "specdec.batch.rows", unit="{row}", description="Rows of one forward pass, every session's",
            explicit_bucket_boundaries_advisory=ROWS_BUCKETS,
        )  # fmt: skip
        self.pass_sessions = meter.create_histogram(
            "specdec.batch.sessions", unit="{session}", description="Sessions in one forward pass",
            explicit_bucket_boundaries_advisory=ROWS_BUCKETS,
        )  # fmt: skip
        # What an autoscaler reads (deploy/kubernetes/autoscaling/): load now, and work done.
        self.active_sessions = meter.create_up_down_counter(
            "specdec.sessions.active", unit="{session}", description="Sessions open (their KV held)"
        )
        meter.create_observable_gauge(
            "specdec.kv.utilization", callbacks=[self._observe_kv], unit="1",
            description="Fraction of the KV pool's blocks that sessions hold",
        )  # fmt: skip
        self.tokens = meter.create_counter(
            "specdec.tokens", unit="{token}", description="Rows run through the model, every session's (rate: tokens/s)"
        )
        self.scheduler = Scheduler(
            engine, limits.max_batch_tokens, limits.prefill_chunk, limits.max_draft_tokens + 1, self.role,
            on_pass=self._record_pass,
        )  # fmt: skip

    def build_job(self, session: Session, command, received: float) -> Job:
        """The command as a job (on the device thread: it checks the command and rolls back)."""
        raise NotImplementedError

    def respond(self, session: Session, job: Job) -> object:
        """The finished job as the role's response message (on a host thread)."""
        raise NotImplementedError

    def check_command(self, command) -> None:
        """What can be checked of a command before it reaches the device."""
        raise NotImplementedError

    def span_attributes(self, command) -> dict:
        """The role's own attributes of a command's span."""
        raise NotImplementedError

    def in_flight(self) -> int:
        return len(self.sessions)

    def close(self) -> None:
        self.scheduler.close()
        self.host.shutdown(wait=False)

    async def GetInfo(self, request, context) -> session_pb2.ServiceInfo:
        info = self.engine.info
        kv = self.engine.kv_usage()
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
            max_draft_tokens=self.limits.max_draft_tokens,
            active_sessions=len(self.sessions),
            max_sessions=self.limits.max_sessions,
            kv_block_size=kv.block_size,
            kv_blocks_total=kv.total_blocks,
            kv_blocks_used=kv.used_blocks,
            max_batch_tokens=self.limits.max_batch_tokens,
            prefill_chunk=self.limits.prefill_chunk,
            draining=self.draining,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
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
                    if self.draining:
                        raise ShuttingDown(f"{self.role} service is shutting down")
                    session = await self._open(request.open)
                    yield self.response_type(opened=session_pb2.SessionOpened(session_id=session.id))
                elif kind == self.command:
                    if session is None:
                        raise InvalidArgument(kind, "the first message of a session must be `open`")
                    yield await self._execute(loop, session, request)
                else:
                    raise InvalidArgument("command", f"expected `open` or `{self.command}`, got {kind or 'nothing'}")
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.role}: {e}")
        except DecodeError as e:  # bytes that are no request message (read as the stream is)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.role}: malformed message: {e}")
        except ShuttingDown as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except (ResourceExhausted, MemoryError, torch.OutOfMemoryError) as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.role}: {e or 'out of memory'}")
        except Exception as e:  # a bug must cost this session only, never the process
            log.exception("session %s failed", session.id if session else "-")
            await context.abort(grpc.StatusCode.INTERNAL, f"{self.role}: {type(e).__name__}: {e}")
        finally:
            if session is not None:
                # Between passes: a job of this session still running is dropped, then its KV freed.
                with contextlib.suppress(RuntimeError):  # the scheduler is gone: the process is ending
                    self.scheduler.end_session(session.kv)
                self.sessions.pop(session.id, None)
                self.active_sessions.add(-1)
                log.info("session %s closed; %d active", session.id, len(self.sessions))

    async def _execute(self, loop, session: Session, request) -> object:
        """Runs one command in the scheduler's passes; its span covers those passes."""
        received, received_ns = time.perf_counter(), time.time_ns()
        command = getattr(request, self.command)
        phase = "prefill" if is_prefill(command.start_position) else self.step_name
        parent = extract_context(request.trace_context) if request.trace_context else None
        try:
            self.check_command(command)
            job = await asyncio.wrap_future(
                self.scheduler.submit(session.kv, lambda: self.build_job(session, command, received))
            )
        except Exception as e:
            span = self.tracer.start_span(phase, context=parent, start_time=received_ns)
            span.record_exception(e)
            span.set_status(Status(StatusCode.ERROR, str(e)))
            span.end()
            raise
        response = await loop.run_in_executor(self.host, self.respond, session, job)
        record = job.record
        response.batch.CopyFrom(batch_stats(record))
        response.batch.open_sessions = len(self.sessions)
        span = self.tracer.start_span(phase, context=parent, start_time=record.first_start_ns or received_ns)
        if span.is_recording():
            span.set_attributes(
                {
                    "specdec.session.id": session.id,
                    "specdec.start_position": command.start_position,
                    "specdec.rollback": job.rolled_back,
                    "specdec.input_tokens": len(command.token_ids),
                    "specdec.queue.seconds": record.queue_seconds,
                    "specdec.batch.passes": record.passes,
                    "specdec.batch.sessions": record.sessions / max(record.passes, 1),  # per pass
                    "specdec.batch.rows": record.rows / max(record.passes, 1),
                    "specdec.device.seconds": record.device_seconds,
                    **self.span_attributes(command),
                }
            )
        span.end(end_time=record.last_end_ns or time.time_ns())
        self.durations[phase].record(record.device_seconds)
        self.queue_duration.record(record.queue_seconds)
        return response

    def _record_pass(self, stats: PassStats) -> None:
        self.pass_duration.record(stats.seconds)
        self.pass_rows.record(stats.rows)
        self.pass_sessions.record(stats.sessions)
        self.tokens.add(stats.rows)

    def _observe_kv(self, options):
        kv = self.engine.kv_usage()
        yield Observation(kv.used_blocks / max(kv.total_blocks, 1))

    async def _open(self, msg: session_pb2.OpenSession) -> Session:
        max_len = self.engine.info.max_seq_len
        if not 1 <= msg.capacity <= max_len:
            raise InvalidArgument("open.capacity", f"must be in [1, {max_len}], got {msg.capacity}")
        sampler = Sampler(sampling_from_proto(msg.sampling))
        # Count and reserve before the first await, so concurrent opens cannot overshoot the limit.
        if len(self.sessions) + self.reserved >= self.limits.max_sessions:
            raise ResourceExhausted(f"all {self.limits.max_sessions} sessions are in use")
        self.reserved += 1
        opening = self.scheduler.call(lambda: self.engine.new_session(msg.capacity))
        try:
            kv = await asyncio.wrap_future(opening)
        except asyncio.CancelledError:  # the stream went away while its KV was being borrowed
            opening.add_done_callback(self._free_if_opened)
            raise
        finally:
            self.reserved -= 1
        session = Session(uuid.uuid4().hex[:12], kv, sampler)
        self.sessions[session.id] = session
        self.active_sessions.add(1)
        log.info("session %s opened, capacity %d; %d active", session.id, msg.capacity, len(self.sessions))
        return session

    def _free_if_opened(self, opening) -> None:
        if not opening.cancelled() and opening.exception() is None:
            self.scheduler.end_session(opening.result())

    def check_block(self, field: str, size: int, limit: int) -> None:
        if size > limit:
            raise InvalidArgument(field, f"{size} exceeds this service's maximum {limit} (--max-draft-tokens)")
