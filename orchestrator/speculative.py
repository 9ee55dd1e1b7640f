"""The speculative loop: prefill, then draft k, verify k + 1 in one target pass, accept, repeat.

Every step emits accepted + 1 tokens. Rollback needs no code here: the next command to each
service starts where its cache stops agreeing with the committed tokens (see clients.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

import torch

from orchestrator.acceptance import accept_greedy, accept_sampled, sample
from orchestrator.clients import DraftSession, TargetSession


@dataclass
class Step:
    token_ids: list[int]  # emitted this step: the accepted proposals, then the target's token
    proposed: int  # k
    accepted: int  # 0..k


async def speculate(
    prompt: list[int],
    max_new_tokens: int,
    num_draft_tokens: int,
    greedy: bool,
    draft: DraftSession | None,
    target: TargetSession,
    generator: torch.Generator,
) -> AsyncIterator[Step]:
    """Yields steps until max_new_tokens are emitted; the caller stops earlier on EOS or a stop.
    Without a draft every step is a plain target decode (k = 0)."""
    committed = list(prompt)
    # Prefill: the target's pass over the prompt gives the first token; the draft caches the
    # prompt meanwhile.
    draft_prefill = draft.propose(committed, 0) if draft else asyncio.sleep(0)
    (argmax, probs, _), _ = await asyncio.gather(target.score(committed, []), draft_prefill)
    first = argmax[0] if greedy else sample(probs[0], generator)
    committed.append(first)
    yield Step([first], 0, 0)
    emitted = 1
    while emitted < max_new_tokens:
        # Never propose more than can be emitted: a step emits at most k + 1 tokens.
        k = min(num_draft_tokens, max_new_tokens - emitted - 1) if draft else 0
        proposed, draft_probs = [], None
        if k > 0:
            proposed, draft_probs, _ = await draft.propose(committed, k)
        argmax, target_probs, _ = await target.score(committed, proposed)
        if greedy:
            accepted, next_token = accept_greedy(proposed, argmax)
        elif k > 0:
            accepted, next_token = accept_sampled(proposed, draft_probs, target_probs, generator)
        else:
            accepted, next_token = 0, sample(target_probs[0], generator)
        new = proposed[:accepted] + [next_token]
        committed.extend(new)
        emitted += len(new)
        yield Step(new, k, accepted)
