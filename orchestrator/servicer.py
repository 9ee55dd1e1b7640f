"""The public Generator service: validates a request, opens a session on a draft and a target
replica (the least-loaded of each role: replicas.py), runs the speculative loop, and streams the
accepted tokens and their text."""

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

from orchestrator.clients import BackendError
from orchestrator.compatibility import Requirements
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
from orchestrator.replicas import ReplicaSet
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
    """Built once a target replica has answered GetInfo (`target_info`, which sets the limits);
    the draft replicas may answer later (attach_draft): until one has, and whenever none is
    reachable, generations run target-only."""

    def __init__(
        self,
        targets: ReplicaSet,
        target_info,
        drafts: ReplicaSet | None,
        tokenizer,
        requirements: Requirements,
        limits: Limits,
        max_sessions: int,
        telemetry: Telemetry,
        overlap: bool = False,
    ):
        self.overlap = overlap  # draft the next block while the target verifies
        self.targets = targets
        self.target_info = target_info
        self.drafts = drafts
        self.draft_info = None  # the first draft replica's, once one has answered (attach_draft)
        self.requirements = requirements  # what every replica must serve; limits tighten it
        self.tokenizer = tokenizer
        self.limits = limits
        self.max_sessions = max_sessions
        self.active = 0
        self.draining = False  # set on SIGTERM (Server.drain): new generations are refused
        eos = set(target_info.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.tracer = telemetry.tracer
        self.metrics = GenerationMetrics(telemetry.meter)
        self.load = Load()  # both services' pass costs at their load, from every session's responses
        self.target_deadlines = target_deadlines()  # learnt from every session's target commands
        vocab = limits.vocab_size
        self.draft_link = DraftLink(drafts, vocab, self.load.draft) if drafts else None

    async def watch(self, set_serving) -> None:
        """From now on: health follows whether any target replica serves; the draft is attached
        once a draft replica has answered."""
        self.targets.on_serving = set_serving
        self.targets.report_next()  # the server sets SERVING as start-up ends: the next poll corrects it
        if self.drafts is not None:
            self.drafts.first.add_done_callback(lambda first: first.cancelled() or self.attach_draft(first.result()))

    def attach_draft(self, info) -> None:
        """New generations draft on the draft replicas; the first one's limit on k applies to requests
        from now on, and every later target must verify blocks that large (Requirements); a later
        draft with a smaller limit is asked for fewer tokens (clients.py)."""
        max_k = min(self.limits.max_draft_tokens, info.max_draft_tokens)
        self.limits = replace(
            self.limits,
            max_draft_tokens=max_k,
            default_num_draft_tokens=min(self.limits.default_num_draft_tokens, max_k),
        )
        self.requirements.max_draft_tokens = max_k
        self.draft_info = info
        self.drafts.recheck()
        self.targets.recheck()

    def drafting(self, capacity: int) -> bool:
        """Whether a generation of `capacity` positions drafts: a draft replica has answered and
        one holds that many (a longer one runs target-only rather than fail)."""
        return self.draft_info is not None and self.drafts.holds(capacity)

    def close(self) -> None:
        """Stops watching the replicas (from any thread)."""
        for replicas in (self.targets, self.drafts):
            if replicas is not None:
                replicas.close()

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

        target = Verifier(self.targets, self.limits.vocab_size, self.load.target, self.target_deadlines,
                          self._on_failover(request, chat, "target"), remaining)  # fmt: skip
        drafter = None
        if request.num_draft_tokens > 0 and self.drafting(len(request.prompt_token_ids) + request.max_tokens):
            drafter = Drafter(self.draft_link, self.overlap, self._on_failover(request, chat, "draft"), remaining)
        return target, drafter

    def _on_failover(self, request: Request, chat: bool, role: str):
        """What a failover of this generation's draft or target stream reports: a metric, a span
        event, a log line."""
        attributes = metric_attributes(chat, self.target_info.model_name)
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
        model = target.model_name  # the replica's: while a rolling update runs, not every one's is the same
        draft_model = drafter.session.replica_info.model_name if drafter and drafter.session else None
        root.set_attributes(request_span_attributes(request, chat, model, draft_model))
        attributes = metric_attributes(chat, model)
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
