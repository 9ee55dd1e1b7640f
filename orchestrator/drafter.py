"""The draft side of the loop: proposals for the committed tokens, drafted when asked or, with
overlap, while the target verified the previous block.

Drafting ahead assumes the block being verified is accepted whole: the draft guesses the bonus
token (its own next token) and proposes the next block after it. If the target accepts every
proposal and its token equals the guess, the next step needs no draft call; otherwise the work
is dropped, by position, the next time the draft is asked (its cache mirror rolls it back).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from orchestrator.clients import DraftSession


@dataclass
class Proposal:
    token_ids: list[int]  # [k]
    probs: torch.Tensor | None  # [k, vocab] float64, sampling only
    rollback: int  # positions the draft dropped to make it
    drafted_ahead: bool = False
    device_seconds: float = 0.0  # the draft's passes for it, when drafted on the critical path


@dataclass
class _Ahead:
    continues: list[int]  # the sequence the proposals follow: committed + the block + the guess
    token_ids: list[int]
    probs: torch.Tensor | None


class Drafter:
    def __init__(self, session: DraftSession, overlap: bool):
        self.session = session
        self.overlap = overlap
        self.task: asyncio.Task | None = None
        self.task_continues: list[int] = []
        self.ahead: _Ahead | None = None

    async def prefill(self, prompt: list[int]) -> None:
        await self.session.propose(prompt, 0)

    async def propose(self, committed: list[int], k: int) -> Proposal:
        ahead, self.ahead = self.ahead, None
        if ahead and ahead.continues == committed and len(ahead.token_ids) >= k:
            probs = ahead.probs[:k] if ahead.probs is not None else None
            return Proposal(ahead.token_ids[:k], probs, rollback=0, drafted_ahead=True)
        token_ids, probs, plan = await self.session.propose(committed, k)
        return Proposal(token_ids, probs, plan.rolled_back, device_seconds=self.session.last_batch.device_seconds)

    def start_ahead(self, committed: list[int], block: list[int], next_k: int) -> None:
        """While `block` is verified, drafts the bonus guess and next_k proposals after it."""
        if self.overlap and block and next_k > 0:
            self.task_continues = committed + block
            self.task = asyncio.ensure_future(self.session.propose(committed, next_k + 1, assumed=block))

    async def finish_ahead(self) -> None:
        """Waits for the drafting ahead (the draft service runs commands in order anyway) and
        keeps its proposals for the next step."""
        if self.task is None:
            return
        task, self.task = self.task, None
        token_ids, probs, _ = await task
        self.ahead = _Ahead(
            self.task_continues + token_ids[:1], token_ids[1:], probs[1:] if probs is not None else None
        )

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
