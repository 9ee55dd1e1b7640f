"""Greedy speculative output over real gRPC equals the target alone, token for token."""

from __future__ import annotations

import pytest
import torch

from specdec.v1 import generate_pb2
from tests.conftest import VOCAB
from tests.servers import record_drafted_ahead, start_stack
from tests.tiny import greedy_reference

PROMPTS = [torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (1, 3, 7, 12)]
NUM_TOKENS = 24


def generate(stub, prompt, k, max_tokens=NUM_TOKENS):
    request = generate_pb2.GenerateRequest(
        prompt_token_ids=prompt, max_tokens=max_tokens, num_draft_tokens=k, ignore_eos=True
    )
    responses = list(stub.Generate(request, timeout=60))
    return [t for r in responses for t in r.token_ids], responses[-1]


@pytest.fixture(scope="module", params=["layer_skip", "unrelated", "target"])
def pair(request, loop, engines, model_dirs):
    stack = start_stack(loop, engines["target"], engines[request.param], str(model_dirs["target"]))
    yield request.param, stack
    stack.stop()


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_speculative_greedy_equals_target_alone(pair, engines, k):
    draft_name, stack = pair
    stub = stack.generator()
    for prompt in PROMPTS:
        expected = greedy_reference(engines["target"], prompt, NUM_TOKENS)
        tokens, last = generate(stub, prompt, k)
        assert tokens == expected, f"draft {draft_name}, k={k}, prompt {prompt}"
        stats = last.stats
        assert last.finish_reason == generate_pb2.FINISH_REASON_LENGTH
        assert stats.completion_tokens == NUM_TOKENS and stats.prompt_tokens == len(prompt)
        # every step emits its accepted tokens plus one of the target's own
        assert stats.completion_tokens == 1 + stats.steps + stats.accepted_tokens
        assert stats.accepted_tokens <= stats.draft_tokens <= k * stats.steps
        if draft_name == "target":  # a draft identical to the target is always right
            assert stats.accepted_tokens == stats.draft_tokens
        check_per_position(stats)


def check_per_position(stats):
    assert sum(stats.proposed_per_position) == stats.draft_tokens
    assert sum(stats.accepted_per_position) == stats.accepted_tokens
    # a proposal is accepted only after every one before it in its step
    accepted = list(stats.accepted_per_position)
    assert accepted == sorted(accepted, reverse=True)
    assert all(a <= p for a, p in zip(accepted, stats.proposed_per_position))


def test_acceptance_varies_by_draft(pair):
    """The three drafts really exercise different paths: full acceptance, partial, near none."""
    draft_name, stack = pair
    accepted = proposed = 0
    for prompt in PROMPTS:
        _, last = generate(stack.generator(), prompt, 4)
        accepted += last.stats.accepted_tokens
        proposed += last.stats.draft_tokens
    alpha = accepted / proposed
    low, high = {"target": (1.0, 1.0), "layer_skip": (0.2, 0.95), "unrelated": (0.0, 0.15)}[draft_name]
    assert low <= alpha <= high, f"{draft_name}: alpha {alpha:.2f}"


def test_target_alone_mode_equals_reference(loop, engines, model_dirs):
    """Without a draft the orchestrator decodes with the target alone, one token per pass."""
    stack = start_stack(loop, engines["target"], None, str(model_dirs["target"]))
    try:
        for prompt in PROMPTS[:2]:
            tokens, last = generate(stack.generator(), prompt, 0)
            assert tokens == greedy_reference(engines["target"], prompt, NUM_TOKENS)
            assert last.stats.steps == NUM_TOKENS - 1 and last.stats.draft_tokens == 0
    finally:
        stack.stop()


def test_qwen2_family_target(loop, engines, model_dirs):
    stack = start_stack(loop, engines["qwen2"], engines["qwen2"], str(model_dirs["qwen2"]))
    try:
        tokens, _ = generate(stack.generator(), PROMPTS[2], 4)
        assert tokens == greedy_reference(engines["qwen2"], PROMPTS[2], NUM_TOKENS)
    finally:
        stack.stop()


@pytest.mark.parametrize("draft_name", ["layer_skip", "target"])
def test_overlap_and_adaptive_k_are_lossless(loop, engines, model_dirs, draft_name, monkeypatch):
    """Drafting the next block during verification, and choosing k per step, change no token."""
    drafted_ahead = record_drafted_ahead(monkeypatch)
    stack = start_stack(loop, engines["target"], engines[draft_name], str(model_dirs["target"]), "--overlap")
    try:
        stub = stack.generator()
        for prompt in PROMPTS:
            expected = greedy_reference(engines["target"], prompt, NUM_TOKENS)
            for k, adaptive in ((1, False), (3, False), (8, False), (4, True), (8, True)):
                request = generate_pb2.GenerateRequest(
                    prompt_token_ids=prompt, max_tokens=NUM_TOKENS, num_draft_tokens=k, ignore_eos=True,
                    adaptive_draft_tokens=adaptive,
                )  # fmt: skip
                responses = list(stub.Generate(request, timeout=60))
                assert [t for r in responses for t in r.token_ids] == expected, (draft_name, k, adaptive, prompt)
                check_per_position(responses[-1].stats)
    finally:
        stack.stop()
    # the path under test was taken: some steps used a block drafted ahead, some could not
    assert any(drafted_ahead)
    if draft_name == "layer_skip":
        assert not all(drafted_ahead)
