"""The orchestrator's side of a session on a draft or target replica.

Each RemoteSession wraps one bidirectional stream and mirrors which token the replica holds at
each position. Before every command it computes where the replica's cache stops agreeing with the
committed tokens: that is the command's start_position (the replica rolls back to it) and the
committed tokens from there on are what it must cache. No other rollback arithmetic exists.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

import grpc

from orchestrator.load import PassCosts
from specdec.sampling import SamplingParams
from specdec.telemetry import inject_context
from specdec.v1 import session_pb2
from specdec.wire import decode_probs, sampling_to_proto

# Codes a backend may answer that the client should see as they are (a refusal: another replica
# would refuse too); the rest mean the backend is not usable right now (UNAVAILABLE) or that
# something broke between us (INTERNAL), which another stream may not suffer.
REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
# CANCELLED from a backend is the replica ending our stream (it stops or drains): it is going away.
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


class BackendError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class DeadlineMissed(BackendError):
    """A replica did not answer a command in time: for the client, it is unavailable."""

    def __init__(self, role: str, address: str, seconds: float):
        super().__init__(
            grpc.StatusCode.UNAVAILABLE, f"{role} service at {address} did not answer within {seconds:.1f} s"
        )


def failure_reason(error: BackendError) -> str:
    """A BackendError's name in failover metrics and spans."""
    return "deadline" if isinstance(error, DeadlineMissed) else error.code.name.lower()


def backend_error(role: str, address: str, code: grpc.StatusCode, details: str) -> BackendError:
    if code in _UNREACHABLE:
        return BackendError(grpc.StatusCode.UNAVAILABLE, f"{role} service at {address} is unavailable: {details}")
    if code in REFUSALS:
        return BackendError(code, f"{role} service at {address}: {details}")
    return BackendError(grpc.StatusCode.INTERNAL, f"{role} service at {address} failed ({code.name}): {details}")


@dataclass
class Plan:
    start_position: int
    new_tokens: list[int]  # committed tokens the replica must cache from start_position on
    rolled_back: int  # positions the replica drops


class RemoteSession:
    role: str
    request_type: type

    def __init__(self, stub, address: str, vocab_size: int, costs: PassCosts | None = None,
                 timeout: float | None = None, on_end: Callable[[], None] | None = None, replica=None):  # fmt: skip
        """on_end(): called once when the stream ends (the replica set counts the session off);
        replica: the Replica it runs on (replicas.py), told when the stream fails."""
        self.address = address
        self.replica = replica
        self.replica_info = replica.info if replica is not None else None  # what it served when this opened
        self.on_end = on_end
        self.vocab_size = vocab_size
        self.costs = costs  # the service's pass costs, learnt from every response
        # The client's deadline goes on: the replica ends the session itself when it passes.
        self.call = stub.Session(timeout=timeout)
        self.cached: list[int] = []  # the token at each position the replica holds
        self.agreed = 0  # leading positions known to equal the committed tokens
        self.last_batch = session_pb2.BatchStats()  # the passes of the last command

    async def open(self, capacity: int, sampling: SamplingParams) -> str:
        response = await self._exchange(
            self.request_type(open=session_pb2.OpenSession(capacity=capacity, sampling=sampling_to_proto(sampling)))
        )
        return response.opened.session_id

    async def open_within(self, capacity: int, sampling: SamplingParams, deadline: float) -> None:
        """open within `deadline` (else DeadlineMissed), and the stream cancelled if it does not
        open (or its generation ends meanwhile); the error is raised."""
        try:
            await asyncio.wait_for(self.open(capacity, sampling), deadline)
        except asyncio.TimeoutError:
            self.cancel()
            raise DeadlineMissed(self.role, self.address, deadline) from None
        except BaseException:
            self.cancel()
            raise

    def plan(self, sequence: list[int], need_last_logits: bool, committed: int | None = None) -> Plan:
        """Where the replica must start writing to hold `sequence`, whose first `committed`
        tokens (default: all) are final. When the next token's logits are needed, the last token
        is always (re)written: its logits are never kept."""
        limit = min(len(self.cached), len(sequence) - (1 if need_last_logits else 0))
        i = min(self.agreed, limit)
        while i < limit and self.cached[i] == sequence[i]:
            i += 1
        # Committed tokens only ever grow at their end, so positions agreed with them stay agreed.
        self.agreed = min(i, len(sequence) if committed is None else committed)
        return Plan(i, sequence[i:], len(self.cached) - i)

    def record(self, start_position: int, written: list[int]) -> None:
        del self.cached[start_position:]
        self.cached.extend(written)

    async def _exchange(self, request):
        inject_context(request.trace_context)  # this step's span becomes the service span's parent
        try:
            await self.call.write(request)
            response = await self.call.read()
        except grpc.aio.AioRpcError as e:
            raise backend_error(self.role, self.address, e.code(), e.details()) from None
        except Exception:  # the stream broke in a way the call itself will tell
            response = grpc.aio.EOF
        if response is grpc.aio.EOF:
            raise backend_error(self.role, self.address, await self.call.code(), await self.call.details())
        self.last_batch = response.batch
        return response

    def observe(self, speculative: bool) -> None:
        """Feeds the last command's passes to the service's cost model."""
        if self.costs is not None:
            self.costs.observe(self.last_batch, speculative)

    async def finish(self, timeout: float = 5.0) -> None:
        """Ends the stream cleanly: the service frees the session and the stream ends OK. Reading
        to the end also ends the stream's client span."""
        try:
            await self.call.done_writing()
            while await asyncio.wait_for(self.call.read(), timeout) is not grpc.aio.EOF:
                pass
        except (grpc.aio.AioRpcError, asyncio.TimeoutError, asyncio.InvalidStateError):
            self.cancel()
        if self.on_end is not None:
            self.on_end()

    def cancel(self) -> None:
        """Ends the stream at once (no-op once it has ended); the service frees the session."""
        self.call.cancel()
        if self.on_end is not None:
            self.on_end()

    def failed(self) -> None:
        """The stream failed or hung: its replica goes last for new sessions for a while."""
        self.cancel()
        if self.replica is not None:
            self.replica.failed()


class DraftSession(RemoteSession):
    role = "draft"
    request_type = session_pb2.DraftRequest

    async def propose(self, committed: list[int], num_tokens: int, assumed: list[int] = ()):
        """Drafts num_tokens tokens after the committed ones and, if given, the `assumed` ones
        (proposals still being verified); at most as many as the replica takes (fewer proposals are
        always valid).
        -> (proposed tokens [k], their draft distributions [k, vocab] float64 or None), and the plan."""
        if self.replica_info is not None:
            num_tokens = min(num_tokens, self.replica_info.max_draft_tokens)
        plan = self.plan(committed + list(assumed), need_last_logits=num_tokens > 0, committed=len(committed))
        cmd = session_pb2.ProposeCommand(
            start_position=plan.start_position, token_ids=plan.new_tokens, num_tokens=num_tokens
        )
        proposal = (await self._exchange(self.request_type(propose=cmd))).proposal
        self.observe(speculative=num_tokens > 0)
        proposed = list(proposal.token_ids)
        if len(proposed) > num_tokens:  # fewer is allowed: a draft may stop where it has nothing to propose
            raise BackendError(
                grpc.StatusCode.INTERNAL, f"draft at {self.address} proposed {len(proposed)} tokens, asked {num_tokens}"
            )
        # The last proposal is not fed back, so the replica holds all but it.
        self.record(plan.start_position, plan.new_tokens + proposed[:-1])
        probs = decode_probs(proposal.probs, self.vocab_size) if proposal.probs else None
        return proposed, probs, plan


class TargetSession(RemoteSession):
    role = "target"
    request_type = session_pb2.TargetRequest

    async def score(self, committed: list[int], proposed: list[int]):
        """One forward pass over the uncached committed tokens and the proposed ones.
        -> (greedy argmax [k + 1] or None, processed distributions [k + 1, vocab] float64 or None), plan."""
        plan = self.plan(committed, need_last_logits=True)
        tokens = plan.new_tokens + proposed
        cmd = session_pb2.ScoreCommand(
            start_position=plan.start_position, token_ids=tokens, num_scored=len(proposed) + 1
        )
        scores = (await self._exchange(self.request_type(score=cmd))).scores
        self.observe(speculative=bool(proposed))
        self.record(plan.start_position, tokens)
        if scores.probs:
            return None, decode_probs(scores.probs, self.vocab_size), plan
        argmax = list(scores.argmax_token_ids)
        if len(argmax) != len(proposed) + 1:
            raise BackendError(
                grpc.StatusCode.INTERNAL,
                f"target at {self.address} scored {len(argmax)} rows, asked {len(proposed) + 1}",
            )
        return argmax, None, plan
