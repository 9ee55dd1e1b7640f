"""The public Generator service: validates a request, opens a session on a draft and a target
replica, runs the speculative loop, and streams the accepted tokens and their text."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import replace

import grpc
import torch
from opentelemetry import trace

from orchestrator.backends import Backend, IncompatibleService, follow_connectivity
from orchestrator.clients import BackendError
from orchestrator.draft_length import AdaptiveDraftLength, FixedDraftLength
from orchestrator.draft_link import DraftLink
from orchestrator.drafter import Drafter
from orchestrator.load import Load
from orchestrator.observability import (
    GenerationMetrics,
    metric_attributes,
    request_span_attributes,
    response_span_attributes,
)
from orchestrator.speculative import speculate
from orchestrator.text import TextStream
from orchestrator.validation import Limits, Request, validate
from orchestrator.verifier import Verifier, target_deadlines
from specdec.errors import InvalidArgument
from specdec.tally import Tally
from specdec.telemetry import Telemetry
from specdec.v1 import generate_pb2, generate_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = generate_pb2.DESCRIPTOR.services_by_name["Generator"].full_name
# Backend streams end this long after the client's deadline: the orchestrator's own cancel comes
# first (a backend's DEADLINE_EXCEEDED must not pass for a failed replica); theirs only when it cannot.
BACKEND_DEADLINE_MARGIN = 0.5


class GeneratorServicer(generate_pb2_grpc.GeneratorServicer):
    """Built once the target has answered GetInfo; the draft may answer later (attach_draft):
    until it has, and whenever it is unreachable, generations run target-only."""

    def __init__(
        self,
        target: Backend,
        draft: Backend | None,
        tokenizer,
        limits: Limits,
        max_sessions: int,
        telemetry: Telemetry,
        overlap: bool = False,
    ):
        self.overlap = overlap  # draft the next block while the target verifies
        self.target = target
        self.draft = draft  # usable once draft.info is known (attach_draft)
        self.tokenizer = tokenizer
        self.limits = limits
        self.max_sessions = max_sessions
        self.active = 0
        self.draining = False  # set on SIGTERM (Server.drain): new generations are refused
        eos = set(target.info.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.tracer = telemetry.tracer
        self.metrics = GenerationMetrics(telemetry.meter)
        self.load = Load()  # both services' pass costs at their load, from every session's responses
        self.target_deadlines = target_deadlines()  # learnt from every session's target commands
        vocab = limits.vocab_size
        self.draft_link = DraftLink(draft.stub, draft.address, vocab, self.load.draft) if draft else None
        self.tasks: list[asyncio.Task] = []

    def watch(self, set_serving, draft_answer: asyncio.Future | None) -> None:
        """In the background: health follows whether the target is reachable; the draft is
        attached once `draft_answer` (a task asking its GetInfo until it answers) has come."""
        self.tasks.append(asyncio.ensure_future(follow_connectivity(self.target.channel, set_serving)))
        if draft_answer is None:
            return
        if draft_answer.done():
            self._attach_draft(draft_answer)
        else:
            self.tasks.append(draft_answer)
            draft_answer.add_done_callback(self._attach_draft)

    def _attach_draft(self, draft_answer: asyncio.Future) -> None:
        try:
            if not draft_answer.cancelled():
                self.attach_draft(draft_answer.result())
        except IncompatibleService as e:
            log.error("%s: generations run target-only", e)
            self.draft = self.draft_link = None

    def attach_draft(self, info) -> None:
        """New generations draft on the draft service; its limits apply to k from now on. A draft
        with another vocabulary than the target's is never used: its proposals would mean other
        tokens."""
        if info.vocab_size != self.limits.vocab_size:
            raise IncompatibleService(
                f"draft vocabulary ({info.vocab_size}) at {self.draft.address} differs from the target's "
                f"({self.limits.vocab_size})"
            )
        max_k = min(self.limits.max_draft_tokens, info.max_draft_tokens)
        self.limits = replace(
            self.limits,
            max_draft_tokens=max_k,
            default_num_draft_tokens=min(self.limits.default_num_draft_tokens, max_k),
        )
        self.draft.info = info

    def drafting(self, capacity: int) -> bool:
        """Whether a generation of `capacity` positions drafts: the draft has answered and holds
        that many (a longer one runs target-only rather than fail)."""
        return self.draft is not None and self.draft.info is not None and capacity <= self.draft.info.max_seq_len

    def close(self) -> None:
        """Stops the background tasks (from any thread)."""
        for task in self.tasks:
            task.get_loop().call_soon_threadsafe(task.cancel)

    async def Generate(self, msg: generate_pb2.GenerateRequest, context):
        try:
            request = validate(msg, self.tokenizer, self.limits, self.eos_token_ids)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the orchestrator is shutting down")
        if self.active >= self.max_sessions:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"all {self.max_sessions} generation slots are in use"
            )
        target, drafter = self._sessions(request, msg.chat, context)
        self.active += 1  # no await since the check above: concurrent generations cannot overshoot
        sessions = [target, drafter] if drafter else [target]
        try:
            async for response in self._generate(request, msg.chat, drafter, target):
                yield response
            await asyncio.gather(*(session.finish() for session in sessions))
        except BackendError as e:
            log.warning("request %s: %s", request.request_id, e)
            await context.abort(e.code, str(e))
        except Exception as e:  # a bug must cost this generation only, never the process
            log.exception("request %s failed", request.request_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        finally:
            # However this generation ended (client gone, a service failed), both sessions end.
            self.active -= 1
            for session in sessions:
                session.cancel()

    def in_flight(self) -> int:
        return self.active

    def _sessions(self, request: Request, chat: bool, context) -> tuple[Verifier, Drafter | None]:
        """The generation's target session and, when it drafts, its draft session (not open yet)."""

        def remaining() -> float | None:  # the client's deadline, passed on to every backend stream
            left = context.time_remaining()
            return None if left is None else left + BACKEND_DEADLINE_MARGIN

        target = Verifier(self.target.stub, self.target.address, self.limits.vocab_size, self.load.target,
                          self.target_deadlines, self._on_failover(request, chat, "target"), remaining)  # fmt: skip
        drafter = None
        if request.num_draft_tokens > 0 and self.drafting(len(request.prompt_token_ids) + request.max_tokens):
            drafter = Drafter(self.draft_link, self.overlap, self._on_failover(request, chat, "draft"), remaining)
        return target, drafter

    def _on_failover(self, request: Request, chat: bool, role: str):
        """What a failover of this generation's draft or target stream reports: a metric, a span
        event, a log line."""
        attributes = metric_attributes(chat, self.target.info.model_name)
        counter = self.metrics.failovers[role]

        def report(reason: str, message: str) -> None:
            counter.add(1, {**attributes, "reason": reason})
            trace.get_current_span().add_event(f"specdec.{role}.failover", {"reason": reason, "message": message})
            log.warning("request %s: %s", request.request_id, message)

        return report

    async def _generate(self, request: Request, chat: bool, drafter: Drafter | None, target: Verifier):
        started = time.perf_counter()
        # The root span of this generation: the gRPC server span (a no-op one when tracing is off).
        root = trace.get_current_span()
        model, draft_model = self.target.info.model_name, self.draft.info.model_name if drafter else None
        root.set_attributes(request_span_attributes(request, chat, model, draft_model))
        attributes = metric_attributes(chat, model)
        first_token_seconds = 0.0
        seed = request.sampling.seed if request.sampling.seed is not None else secrets.randbits(63)
        generator = torch.Generator().manual_seed(seed)
        capacity = len(request.prompt_token_ids) + request.max_tokens
        # The draft draws its proposals from a stream of its own, derived from the request's seed.
        draft_sampling = replace(request.sampling, seed=(seed + 1) % 2**63)
        await asyncio.gather(
            target.open(capacity, request.sampling),
            drafter.open(capacity, draft_sampling) if drafter else asyncio.sleep(0),
        )
        text = TextStream(self.tokenizer, request.prompt_token_ids, request.stop)
        tally, completion_tokens = Tally(), 0
        k = request.num_draft_tokens
        draft_length = AdaptiveDraftLength(k, k, self.load, self.overlap) if request.adaptive else FixedDraftLength(k)
        steps = speculate(
            request.prompt_token_ids, request.max_tokens, draft_length,
            request.sampling.greedy, drafter, target, generator, self.tracer, self.load,
        )  # fmt: skip
        async with contextlib.aclosing(steps):
            async for step in steps:
                emitted, finish = [], generate_pb2.FINISH_REASON_UNSPECIFIED
                for token in step.token_ids:
                    emitted.append(token)
                    if token in request.stop_token_ids or text.add(token):
                        finish = generate_pb2.FINISH_REASON_STOP
                        break
                if step.prefill:
                    first_token_seconds = time.perf_counter() - started
                else:
                    tally.add_step(step.proposed, step.accepted, len(emitted))
                    self.metrics.record_step(step, attributes)
                completion_tokens += len(emitted)
                if not finish and completion_tokens >= request.max_tokens:
                    finish = generate_pb2.FINISH_REASON_LENGTH
                response = generate_pb2.GenerateResponse(
                    token_ids=emitted, text=text.take(final=bool(finish)), request_id=request.request_id
                )
                if finish:
                    response.finish_reason = finish
                    stats = response.stats
                    stats.prompt_tokens, stats.completion_tokens = len(request.prompt_token_ids), completion_tokens
                    tally.fill(stats)
                    root.set_attributes(response_span_attributes(tally, completion_tokens, finish))
                    self.metrics.record_request(
                        first_token_seconds, time.perf_counter() - started, completion_tokens, attributes
                    )
                    log.info(
                        "request %s: %s, %d prompt + %d completion tokens, %d steps, accepted %d/%d proposed",
                        request.request_id, generate_pb2.FinishReason.Name(finish), stats.prompt_tokens,
                        completion_tokens, tally.steps, tally.accepted, tally.proposed,
                    )  # fmt: skip
                    yield response
                    return
                yield response
