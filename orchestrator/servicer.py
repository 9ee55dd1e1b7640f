"""The public Generator service: validates a request, opens a session on a draft and a target
replica, runs the speculative loop, and streams the accepted tokens and their text."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass, replace

import grpc
import torch

from orchestrator.clients import BackendError, DraftSession, TargetSession
from orchestrator.speculative import speculate
from orchestrator.text import TextStream
from orchestrator.validation import Limits, Request, validate
from specdec.errors import InvalidArgument
from specdec.serving.server import GRPC_OPTIONS
from specdec.v1 import generate_pb2, generate_pb2_grpc, session_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = generate_pb2.DESCRIPTOR.services_by_name["Generator"].full_name


@dataclass
class Backend:
    """A draft or target service address (any number of replicas behind it) and what it serves."""

    role: str
    address: str
    stub: object
    info: session_pb2.ServiceInfo


async def connect(role: str, address: str, stub_type, timeout: float) -> Backend:
    """Opens a round-robin channel (each session stream then stays on the replica it opened on)
    and waits up to `timeout` seconds for the service to answer GetInfo."""
    channel = grpc.aio.insecure_channel(address, options=[*GRPC_OPTIONS, ("grpc.lb_policy_name", "round_robin")])
    stub = stub_type(channel)
    try:
        info = await stub.GetInfo(session_pb2.GetInfoRequest(), wait_for_ready=True, timeout=timeout)
    except grpc.aio.AioRpcError as e:
        await channel.close()
        raise ConnectionError(
            f"{role} service at {address} did not answer within {timeout:.0f} s: {e.details()}"
        ) from None
    if info.role != role:
        raise ConnectionError(f"{address} is a {info.role or 'unknown'} service, not a {role} service")
    return Backend(role, address, stub, info)


class GeneratorServicer(generate_pb2_grpc.GeneratorServicer):
    def __init__(self, target: Backend, draft: Backend | None, tokenizer, limits: Limits, max_sessions: int):
        self.target = target
        self.draft = draft
        self.tokenizer = tokenizer
        self.limits = limits
        self.max_sessions = max_sessions
        self.active = 0
        eos = set(target.info.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))

    async def Generate(self, msg: generate_pb2.GenerateRequest, context):
        try:
            request = validate(msg, self.tokenizer, self.limits, self.eos_token_ids)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.active >= self.max_sessions:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"all {self.max_sessions} generation slots are in use"
            )
        self.active += 1
        target = TargetSession(self.target.stub, self.target.address, self.limits.vocab_size)
        draft = DraftSession(self.draft.stub, self.draft.address, self.limits.vocab_size) if self.draft else None
        try:
            async for response in self._generate(request, draft, target):
                yield response
        except BackendError as e:
            log.warning("request %s: %s", request.request_id, e)
            await context.abort(e.code, str(e))
        finally:
            # Cancelling both streams frees both sessions, however this generation ended.
            self.active -= 1
            target.close()
            if draft:
                draft.close()

    async def _generate(self, request: Request, draft: DraftSession | None, target: TargetSession):
        seed = request.sampling.seed if request.sampling.seed is not None else secrets.randbits(63)
        generator = torch.Generator().manual_seed(seed)
        capacity = len(request.prompt_token_ids) + request.max_tokens
        # The draft draws its proposals from a stream of its own, derived from the request's seed.
        draft_sampling = replace(request.sampling, seed=(seed + 1) % 2**63)
        await asyncio.gather(
            target.open(capacity, request.sampling),
            draft.open(capacity, draft_sampling) if draft else asyncio.sleep(0),
        )
        text = TextStream(self.tokenizer, request.prompt_token_ids, request.stop)
        stats = generate_pb2.GenerationStats(prompt_tokens=len(request.prompt_token_ids))
        steps = speculate(
            request.prompt_token_ids, request.max_tokens, request.num_draft_tokens,
            request.sampling.greedy, draft, target, generator,
        )  # fmt: skip
        async with contextlib.aclosing(steps):
            async for step in steps:
                if stats.completion_tokens:  # every pass after the prefill is a step
                    stats.steps += 1
                stats.draft_tokens += step.proposed
                stats.accepted_tokens += step.accepted
                emitted, finish = [], generate_pb2.FINISH_REASON_UNSPECIFIED
                for token in step.token_ids:
                    emitted.append(token)
                    if token in request.stop_token_ids or text.add(token):
                        finish = generate_pb2.FINISH_REASON_STOP
                        break
                stats.completion_tokens += len(emitted)
                if not finish and stats.completion_tokens >= request.max_tokens:
                    finish = generate_pb2.FINISH_REASON_LENGTH
                response = generate_pb2.GenerateResponse(
                    token_ids=emitted, text=text.take(final=bool(finish)), request_id=request.request_id
                )
                if finish:
                    response.finish_reason = finish
                    response.stats.CopyFrom(stats)
                    log.info(
                        "request %s: %s, %d prompt + %d completion tokens, %d steps, accepted %d/%d proposed",
                        request.request_id, generate_pb2.FinishReason.Name(finish), stats.prompt_tokens,
                        stats.completion_tokens, stats.steps, stats.accepted_tokens, stats.draft_tokens,
                    )  # fmt: skip
                    yield response
                    return
                yield response
