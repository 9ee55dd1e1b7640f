"""The draft side of the loop: proposals for the committed tokens, drafted when asked or, with
overlap, while the target verified the previous block; and what happens when the draft fails.

Drafting ahead assumes the block being verified is accepted whole: the draft guesses the bonus
token (its own next token) and proposes the next block after it. If the target accepts every
proposal and its token equals the guess, the next step needs no draft call; otherwise the work
is dropped, by position, the next time the draft is asked (its cache mirror rolls it back).

Failover: any failure of the draft stream (an error status, a broken stream, no answer within the
link's deadline) ends that stream and yields an empty proposal, so the step is a plain target
decode and the output stays exact. The next step opens a new stream when the link allows
(draft_link.py), and the new stream's first command re-prefills the committed tokens. A hung or
broken stream backs the link off; a lost one (UNAVAILABLE: its replica gone, a sibling may be
up) is retried at once, on another replica (replicas.py), and backs off only if no stream opens.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable

import torch

from orchestrator.clients import REFUSALS, BackendError, DraftSession, failure_reason
from orchestrator.draft_link import DraftLink
from specdec.sampling import SamplingParams

OnFailover = Callable[[str, str], None]  # (reason, message): the servicer's metric, span event, log line


@dataclass
class Proposal:
    token_ids: list[int]  # [k]; empty when there is no draft for this step
    probs: torch.Tensor | None  # [k, vocab] float64, sampling only
    rollback: int  # positions the draft dropped to make it
    drafted_ahead: bool = False
    device_seconds: float = 0.0  # the draft's passes for it, when drafted on the critical path


NO_PROPOSAL = Proposal([], None, 0)


@dataclass
class _Ahead:
    continues: list[int]  # the sequence the proposals follow: committed + the block + the guess
    token_ids: list[int]
    probs: torch.Tensor | None
    complete: bool = False  # the draft stopped short (an n-gram draft's match ended): there is no more


class Drafter:
    def __init__(self, link: DraftLink, overlap: bool, on_failover: OnFailover,
                 remaining: Callable[[], float | None] = lambda: None):  # fmt: skip
        """remaining(): seconds left before the client's deadline (None: no deadline)."""
        self.link = link
        self.remaining = remaining
        self.overlap = overlap
        self.on_failover = on_failover
        self.session: DraftSession | None = None
        self.opened: tuple[int, SamplingParams] | None = None  # what every stream is opened with
        self.refused = False  # every replica answered but would not open a stream (KV full): no retries
        self.closed = False  # the generation ended: a stream still opening is cancelled as it opens
        self.task: asyncio.Task | None = None
        self.task_continues: list[int] = []
        self.task_asked = 0  # proposals the drafting ahead asked for: the guess and the next block
        self.ahead: _Ahead | None = None

    async def open(self, capacity: int, sampling: SamplingParams) -> None:
        self.opened = (capacity, sampling)
        await self._connect()

    async def prefill(self, prompt: list[int]) -> None:
        if self.session is not None:
            await self._command(lambda s: s.propose(prompt, 0), "prefill", rows=len(prompt))

    async def propose(self, committed: list[int], k: int) -> Proposal:
        """k proposals after the committed tokens, or none when the draft is gone."""
        ahead, self.ahead = self.ahead, None
        if ahead and ahead.continues == committed and (len(ahead.token_ids) >= k or ahead.complete):
            probs = ahead.probs[:k] if ahead.probs is not None else None
            return Proposal(ahead.token_ids[:k], probs, rollback=0, drafted_ahead=True)
        if self.session is None and not await self._connect():
            return NO_PROPOSAL
        kind = "step" if self.session.cached else "prefill"  # a new stream re-prefills the committed tokens
        rows = max(1, len(committed) - len(self.session.cached)) + k
        result = await self._command(lambda s: s.propose(committed, k), kind, rows)
        if result is None:
            return NO_PROPOSAL
        token_ids, probs, plan = result
        return Proposal(token_ids, probs, plan.rolled_back, device_seconds=self.session.last_batch.device_seconds)

    def start_ahead(self, committed: list[int], block: list[int], next_k: int) -> None:
        """While `block` is verified, drafts the bonus guess and next_k proposals after it."""
        if self.overlap and self.session is not None and block and next_k > 0:
            self.task_continues, self.task_asked = committed + block, next_k + 1
            self.task = asyncio.ensure_future(
                self._command(lambda s: s.propose(committed, next_k + 1, assumed=block), "step", len(block) + next_k)
            )

    async def finish_ahead(self) -> None:
        """Waits for the drafting ahead (the draft service runs commands in order anyway) and
        keeps its proposals for the next step."""
        if self.task is None:
            return
        task, self.task = self.task, None
        result = await task
        if result is not None:
            token_ids, probs, _ = result
            self.ahead = _Ahead(
                self.task_continues + token_ids[:1],
                token_ids[1:],
                probs[1:] if probs is not None else None,
                complete=len(token_ids) < self.task_asked,
            )

    async def finish(self) -> None:
        if self.session is not None:
            await self.session.finish()

    def cancel_ahead(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def cancel(self) -> None:
        """Ends everything at once; the service frees the session."""
        self.closed = True
        self.cancel_ahead()
        if self.session is not None:
            self.session.cancel()

    # --- failover --------------------------------------------------------------------------------

    async def _connect(self) -> bool:
        """Opens a new stream unless the link backs off; False when there is none."""
        if self.refused or self.closed or not self.link.usable():
            return False
        try:
            session = await self.link.open_session(*self.opened, self.remaining())
        except BackendError as e:
            if e.code in REFUSALS:  # replicas that answered but would not open this session (their KV full, say)
                self.refused = True
            else:
                self.link.unreachable()
            self.on_failover(failure_reason(e), f"cannot open a draft stream, target-only steps: {e}")
            return False
        if self.closed:  # the generation ended while this stream opened (its target refused it, say)
            session.cancel()
            return False
        self.session = session
        return True

    async def _command(self, call: Callable[[DraftSession], Awaitable], kind: str, rows: int):
        """call(session) within the link's deadline for its kind and rows; on any failure the
        stream is dropped and the result is None."""
        session = self.session
        try:
            result = await self.link.deadlines.run(kind, rows, call(session), "draft", session.address)
        except BackendError as e:
            session.failed()
            if failure_reason(e) != "unavailable":  # hung or broken; a lost replica may have a sibling: retry once
                self.link.unreachable()
            if self.session is session:
                self.session = None
                self.on_failover(failure_reason(e), f"draft stream lost, target-only steps: {e}")
            return None
        self.link.reachable()
        return result
