"""The speculative loop: prefill, then draft k, verify k + 1 in one target pass, accept, repeat.

Every step emits accepted + 1 tokens. Rollback needs no code here: the next command to each
service starts where its cache stops agreeing with the committed tokens (see clients.py). Each
step is a span; the draft and verify spans are recorded by the services under it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator

import torch
from opentelemetry import trace

from orchestrator.acceptance import accept_greedy, accept_sampled, sample
from orchestrator.draft_length import AdaptiveDraftLength, FixedDraftLength
from orchestrator.drafter import NO_PROPOSAL, Drafter
from orchestrator.load import Load
from orchestrator.verifier import Verifier

DraftLength = FixedDraftLength | AdaptiveDraftLength


@dataclass
class Step:
    token_ids: list[int]  # emitted this step: the accepted proposals, then a correction or a bonus
    proposed: int  # k
    accepted: int  # 0..k
    position_before: int  # committed tokens before the step
    draft_rollback: int  # positions the draft dropped at the start of this step
    target_rollback: int
    seconds: float
    prefill: bool = False  # the prompt's pass: its first token, no step

    @property
    def bonus(self) -> bool:
        return self.proposed > 0 and self.accepted == self.proposed

    def span_attributes(self) -> dict:
        return {
            "specdec.step.proposed": self.proposed,
            "specdec.step.accepted": self.accepted,
            "specdec.step.bonus": self.bonus,
            "specdec.position.before": self.position_before,
            "specdec.position.after": self.position_before + len(self.token_ids),
            "specdec.draft.rollback": self.draft_rollback,
            "specdec.target.rollback": self.target_rollback,
        }


async def speculate(
    prompt: list[int],
    max_new_tokens: int,
    draft_length: DraftLength,
    greedy: bool,
    drafter: Drafter | None,
    target: Verifier,
    generator: torch.Generator,
    tracer: trace.Tracer,
    load: Load,
) -> AsyncIterator[Step]:
    """Yields the prefill (as a step without proposals) and then the steps, until max_new_tokens
    are emitted; the caller stops earlier on EOS or a stop. Without a draft every step is a plain
    target decode (k = 0); so is every step the k policy gives k = 0 (the draft then catches up
    on the committed tokens the next time it is asked), and every step whose draft is gone
    (drafter.py: failover)."""
    committed = list(prompt)
    # Prefill: the target's pass over the prompt gives the first token; the draft caches the
    # prompt meanwhile, unless the policy would not draft at all now.
    with tracer.start_as_current_span("prefill") as span:
        start = time.perf_counter()
        draft_prefill = drafter.prefill(committed) if drafter and draft_length.next() > 0 else asyncio.sleep(0)
        (argmax, probs, _), _ = await asyncio.gather(target.score(committed, []), draft_prefill)
        first = argmax[0] if greedy else sample(probs[0], generator)
        span.set_attribute("specdec.prompt_tokens", len(prompt))
    committed.append(first)
    yield Step([first], 0, 0, len(prompt), 0, 0, time.perf_counter() - start, prefill=True)
    emitted = 1
    try:
        while emitted < max_new_tokens:
            with tracer.start_as_current_span("step") as span:
                start = time.perf_counter()
                # Never propose more than can be emitted: a step emits at most k + 1 tokens.
                k = min(draft_length.next(), max_new_tokens - emitted - 1) if drafter else 0
                proposal = await drafter.propose(committed, k) if k > 0 else NO_PROPOSAL
                k = len(proposal.token_ids)  # 0 when the draft is gone: a plain target decode
                if k > 0:  # with overlap: draft the next block while this one is verified
                    drafter.start_ahead(
                        committed, proposal.token_ids, min(draft_length.next(), max_new_tokens - emitted - k - 2)
                    )
                argmax, target_probs, plan = await target.score(committed, proposal.token_ids)
                verified = time.perf_counter()
                with tracer.start_as_current_span("accept"):
                    if greedy:
                        accepted, next_token = accept_greedy(proposal.token_ids, argmax)
                    elif k > 0:
                        accepted, next_token = accept_sampled(
                            proposal.token_ids, proposal.probs, target_probs, generator
                        )
                    else:
                        accepted, next_token = 0, sample(target_probs[0], generator)
                if drafter:
                    await drafter.finish_ahead()
                new = proposal.token_ids[:accepted] + [next_token]
                draft_length.update(k, accepted)
                load.observe_step(verified - start, target.last_batch.device_seconds + proposal.device_seconds)
                step = Step(
                    new, k, accepted, len(committed), proposal.rollback, plan.rolled_back, time.perf_counter() - start
                )
                span.set_attributes(step.span_attributes())
                if proposal.drafted_ahead:
                    span.set_attribute("specdec.step.drafted_ahead", True)
            committed.extend(new)
            emitted += len(new)
            yield step
    finally:
        if drafter:
            drafter.cancel_ahead()
