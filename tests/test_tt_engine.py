"""TtEngine's host logic (prefill, packed verify and draft passes of many sessions, rollback,
block loans) on a stand-in device whose KV holds token ids (tests/tt_fake.py), against the torch
engine."""

from __future__ import annotations

import time

import pytest
import torch

from specdec.engine.base import Chunk, forward_one
from specdec.errors import ResourceExhausted
from specdec.sampling import Sampler, SamplingParams, wire_probs
from specdec.v1 import generate_pb2
from tests.servers import start_stack
from tests.tiny import greedy_reference, propose, score
from tests.tt_fake import fake_tt_engine

GREEDY = Sampler(SamplingParams())


@pytest.fixture(scope="module")
def tt(engines):
    return {name: fake_tt_engine(engines[name]) for name in ("target", "layer_skip")}


def test_warm_up_compiles_then_captures_so_requests_replay_only(tt):
    engine = tt["target"]
    device = engine.owner.device
    assert len(device.traces) == 4 and not device.capturing  # draft and verify, each also with candidates
    assert engine.pool.free_blocks == engine.pool.num_blocks, "the scratch session went back"


def test_score_and_forward_equal_the_torch_engine_across_passes_and_rollbacks(tt, engines):
    ref, engine = engines["target"], tt["target"]
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    ref_session, session = ref.new_session(64), engine.new_session(64)
    for start, tokens, scored in [
        (0, prompt, 1),  # prefill
        (8, [5, 3, 5, 8], 4),  # a verify pass
        (10, [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 2], 5),  # rollback, then more tokens than a pass has rows
        (22, [1], 1),
    ]:
        want = score(ref, ref_session, start, tokens, scored).argmax
        got = score(engine, session, start, tokens, scored).argmax
        assert got == want and session.length == ref_session.length == start + len(tokens)
    logits_ref = forward_one(ref, ref_session, [4, 4], 2).logits
    torch.testing.assert_close(
        forward_one(engine, session, [4, 4], 2).logits.double(), logits_ref, rtol=1e-6, atol=1e-6
    )
    for e, s in ((ref, ref_session), (engine, session)):
        e.end_session(s)


def test_a_pass_of_many_sessions_packs_them_into_replays_and_gives_each_its_own_logits(tt, engines):
    """Prompts, verify blocks of different k, single decode rows and a long chunk, in one run():
    each session's logits equal a pass of its own on the torch engine."""
    ref, engine = engines["target"], tt["target"]
    rng = torch.Generator().manual_seed(5)
    histories = [torch.randint(1, 32, (n,), generator=rng).tolist() for n in (0, 30, 3, 7, 1, 12)]
    new = [torch.randint(1, 32, (n,), generator=rng).tolist() for n in (6, 9, 1, 1, 20, 5)]
    sessions, refs = [], []
    for history in histories:
        s, r = engine.new_session(64), ref.new_session(64)
        if history:
            forward_one(engine, s, history, 1)
            forward_one(ref, r, history, 1)
        sessions.append(s)
        refs.append(r)
    replays = engine.owner.device.replays
    results = engine.run([Chunk(s, t, len(t), SamplingParams(temperature=1.0)) for s, t in zip(sessions, new)])
    for r, t, got in zip(refs, new, results):
        torch.testing.assert_close(got.logits.double(), forward_one(ref, r, t, len(t)).logits, rtol=1e-6, atol=1e-6)
    # a prompt runs eagerly; the other 36 rows go at most 9 per session (k_max + 1) in a replay,
    # so the 20-row chunk takes three: 9 + 9 + 2, beside everyone else's rows in the first
    assert engine.owner.device.replays - replays == 3
    for e, ss in ((engine, sessions), (ref, refs)):
        for s in ss:
            e.end_session(s)


def test_draft_steps_of_many_sessions_share_one_replay(tt, engines):
    ref, engine = engines["layer_skip"], tt["layer_skip"]
    prompts = [[2, 7, 1, 8], [3, 1, 4], [9], [5, 5, 5, 5, 5, 5]]
    sessions = [engine.new_session(64) for _ in prompts]
    first = engine.run([Chunk(s, p, 1, SamplingParams()) for s, p in zip(sessions, prompts)])  # eager prompts
    replays = engine.owner.device.replays
    second = engine.run([Chunk(s, r.argmax, 1, SamplingParams()) for s, r in zip(sessions, first)])
    assert engine.owner.device.replays - replays == 1  # four sessions' next token in one draft replay
    for prompt, a, b in zip(prompts, first, second):
        assert a.argmax + b.argmax == greedy_reference(ref, prompt, 2)
    for s in sessions:
        engine.end_session(s)


def test_proposals_on_the_draft_trace_are_what_the_torch_engine_proposes(tt, engines):
    ref, engine = engines["layer_skip"], tt["layer_skip"]
    ref_session, session = ref.new_session(64), engine.new_session(64)
    for start, tokens, k in [(0, [2, 7, 1, 8], 4), (6, [3], 5), (8, [9, 9], 3), (11, [4], 1)]:
        want, _ = propose(ref, ref_session, start, tokens, k, GREEDY)
        got, _ = propose(engine, session, start, tokens, k, GREEDY)
        assert got == want and session.length == ref_session.length


def test_sampled_proposals_on_the_draft_trace_equal_the_torch_engines_with_the_same_seed(tt, engines):
    """The host samples from each replay's logits. Same seed, same distributions: the same tokens and rows."""
    ref, engine = engines["layer_skip"], tt["layer_skip"]
    ref_session, session = ref.new_session(64), engine.new_session(64)
    ref_sampler, sampler = (Sampler(SamplingParams(temperature=0.8, seed=5)) for _ in range(2))
    for start, tokens, k in [(0, [5, 6, 7], 4), (4, [2], 6), (9, [1, 3], 3)]:
        want, want_probs = propose(ref, ref_session, start, tokens, k, ref_sampler)
        got, got_probs = propose(engine, session, start, tokens, k, sampler)
        assert got == want and session.length == ref_session.length
        torch.testing.assert_close(got_probs, want_probs, rtol=1e-3, atol=1e-4)


def never_read_the_logits_row(monkeypatch, engine):
    def refuse(outputs):
        raise AssertionError("read the vocabulary-wide logits row; a small top-k needs only the candidates")

    monkeypatch.setattr(engine, "_logits", refuse)


def test_sampling_with_a_small_top_k_reads_only_the_candidates_and_equals_the_torch_engine(tt, engines, monkeypatch):
    params = SamplingParams(temperature=0.9, top_k=5, top_p=0.95, seed=3)
    for name in ("layer_skip", "target"):
        never_read_the_logits_row(monkeypatch, tt[name])
    ref_sampler, sampler = Sampler(params), Sampler(params)
    draft, ref_draft = tt["layer_skip"], engines["layer_skip"]
    session, ref_session = draft.new_session(64), ref_draft.new_session(64)
    for start, tokens, k in [(0, [5, 6, 7], 4), (4, [2], 6)]:
        want, want_probs = propose(ref_draft, ref_session, start, tokens, k, ref_sampler)
        got, got_probs = propose(draft, session, start, tokens, k, sampler)
        assert got == want and torch.equal(got_probs, want_probs)
    target, ref_target = tt["target"], engines["target"]
    session, ref_session = target.new_session(64), ref_target.new_session(64)
    for start, tokens, scored in [(0, [3, 1, 4, 1, 5], 1), (5, [9, 2, 6], 3), (6, [5] * 12, 12)]:
        want = wire_probs(score(ref_target, ref_session, start, tokens, scored, params).scored_logits(), params)
        got = wire_probs(score(target, session, start, tokens, scored, params).scored_logits(), params)
        assert torch.equal(got, want)


def test_a_session_at_a_capacity_that_is_no_multiple_of_the_prefill_padding_runs(engines):
    """Sessions round their blocks up to the prefill padding; the page table must be as wide."""
    engine = fake_tt_engine(engines["target"], max_seq_len=200, max_sessions=1)
    session = engine.new_session(200)
    assert len(session.blocks) == 8  # 256 positions
    prompt = list(range(1, 30))
    got = score(engine, session, 0, prompt, 1).argmax + score(engine, session, len(prompt), [3, 4], 2).argmax
    ref = engines["target"]
    ref_session = ref.new_session(200)
    want = score(ref, ref_session, 0, prompt, 1).argmax + score(ref, ref_session, len(prompt), [3, 4], 2).argmax
    assert got == want
    ref.end_session(ref_session)


def test_sessions_borrow_blocks_and_return_them(tt):
    engine = tt["target"]
    free = engine.pool.free_blocks
    sessions = [engine.new_session(256) for _ in range(free // 8)]  # 256 positions = 8 blocks
    with pytest.raises(ResourceExhausted, match="capacity 256 needs 8"):
        engine.new_session(256)
    for s in sessions:
        engine.end_session(s)
    assert engine.pool.free_blocks == free


@pytest.mark.parametrize("k", [1, 4, 8])
def test_speculative_greedy_over_grpc_on_the_ttnn_engine_equals_the_target_alone(loop, tt, engines, model_dirs, k):
    free = {name: engine.pool.free_blocks for name, engine in tt.items()}
    stack = start_stack(loop, tt["target"], tt["layer_skip"], str(model_dirs["target"]))
    try:
        for prompt in ([1], [5, 3, 9, 2, 2, 7, 1]):
            request = generate_pb2.GenerateRequest(
                prompt_token_ids=prompt, max_tokens=20, num_draft_tokens=k, ignore_eos=True
            )
            responses = list(stack.generator().Generate(request, timeout=120))
            tokens = [t for r in responses for t in r.token_ids]
            assert tokens == greedy_reference(engines["target"], prompt, 20)
            assert 0 < responses[-1].stats.accepted_tokens < responses[-1].stats.draft_tokens
        stack.wait_sessions(0)
        deadline = time.monotonic() + 10  # blocks go back on the device thread, after the stream ends
        while {n: e.pool.free_blocks for n, e in tt.items()} != free and time.monotonic() < deadline:
            time.sleep(0.01)
        assert {name: engine.pool.free_blocks for name, engine in tt.items()} == free
        assert all(len(engine.owner.device.traces) == 4 for engine in tt.values())  # no k captured anew
    finally:
        stack.stop()


@pytest.mark.parametrize("top_k", [0, 5])
def test_sampled_speculation_over_grpc_on_the_ttnn_engine_equals_the_torch_engines(
    loop, tt, engines, model_dirs, monkeypatch, top_k
):
    """Same seeds, same distributions: the same samples as the torch stack, whose samples are
    checked against the target's distribution in test_sampling. top_k 5 reads candidates only."""
    if top_k:
        for engine in tt.values():
            never_read_the_logits_row(monkeypatch, engine)
    outputs = []
    for target, draft in ((tt["target"], tt["layer_skip"]), (engines["target"], engines["layer_skip"])):
        stack = start_stack(loop, target, draft, str(model_dirs["target"]))
        try:
            outputs.append([])
            for seed in range(4):
                sampling = generate_pb2.SamplingParams(temperature=0.8, top_k=top_k, seed=seed)
                request = generate_pb2.GenerateRequest(
                    prompt_token_ids=[5, 3, 9], max_tokens=16, num_draft_tokens=4, ignore_eos=True, sampling=sampling
                )
                outputs[-1].append([t for r in stack.generator().Generate(request, timeout=120) for t in r.token_ids])
        finally:
            stack.stop()
    assert outputs[0] == outputs[1] and len({tuple(o) for o in outputs[0]}) > 1
