"""TtEngine's host logic (prefill, verify passes, the self-feeding draft, rollback, block loans)
on a stand-in device whose KV holds token ids (tests/tt_fake.py), against the torch engine."""

from __future__ import annotations

import time

import pytest
import torch

from specdec.errors import ResourceExhausted
from specdec.sampling import Sampler, SamplingParams
from specdec.v1 import generate_pb2
from tests.servers import start_stack
from tests.tiny import greedy_reference
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
    params = SamplingParams()
    for start, tokens, scored in [
        (0, prompt, 1),  # prefill
        (8, [5, 3, 5, 8], 4),  # a verify pass
        (10, [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 2], 5),  # rollback, then more tokens than a pass has rows
        (22, [1], 1),
    ]:
        want = ref.score(ref_session, start, tokens, scored, params).argmax_token_ids
        got = engine.score(session, start, tokens, scored, params).argmax_token_ids
        assert got == want and session.length == ref_session.length == start + len(tokens)
    logits_ref = ref.forward(ref_session, [4, 4], 2)
    torch.testing.assert_close(engine.forward(session, [4, 4], 2).double(), logits_ref, rtol=1e-6, atol=1e-6)


def test_the_self_feeding_draft_proposes_what_the_torch_engine_does(tt, engines):
    ref, engine = engines["layer_skip"], tt["layer_skip"]
    ref_session, session = ref.new_session(64), engine.new_session(64)
    for start, tokens, k in [(0, [2, 7, 1, 8], 4), (6, [3], 5), (8, [9, 9], 3), (11, [4], 1)]:
        want = ref.propose(ref_session, start, tokens, k, GREEDY).token_ids
        got = engine.propose(session, start, tokens, k, GREEDY).token_ids
        assert got == want and session.length == ref_session.length


def test_sampled_proposals_on_the_draft_trace_equal_the_torch_engines_with_the_same_seed(tt, engines):
    """The host samples from each replay's logits and writes only its token back; positions move
    on the device. Same seed, same distributions: the same tokens and rows."""
    ref, engine = engines["layer_skip"], tt["layer_skip"]
    ref_session, session = ref.new_session(64), engine.new_session(64)
    ref_sampler, sampler = (Sampler(SamplingParams(temperature=0.8, seed=5)) for _ in range(2))
    for start, tokens, k in [(0, [5, 6, 7], 4), (4, [2], 6), (9, [1, 3], 3)]:
        want = ref.propose(ref_session, start, tokens, k, ref_sampler)
        got = engine.propose(session, start, tokens, k, sampler)
        assert got.token_ids == want.token_ids and session.length == ref_session.length
        torch.testing.assert_close(got.probs, want.probs, rtol=1e-3, atol=1e-4)


def never_read_the_logits_row(monkeypatch, engine):
    def refuse(outputs, rows):
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
        want = ref_draft.propose(ref_session, start, tokens, k, ref_sampler)
        got = draft.propose(session, start, tokens, k, sampler)
        assert got.token_ids == want.token_ids and torch.equal(got.probs, want.probs)
    target, ref_target = tt["target"], engines["target"]
    session, ref_session = target.new_session(64), ref_target.new_session(64)
    for start, tokens, scored in [(0, [3, 1, 4, 1, 5], 1), (5, [9, 2, 6], 3), (6, [5] * 12, 12)]:
        want = ref_target.score(ref_session, start, tokens, scored, params).probs
        assert torch.equal(target.score(session, start, tokens, scored, params).probs, want)


def test_a_session_at_a_capacity_that_is_no_multiple_of_the_prefill_padding_runs(engines):
    """Sessions round their blocks up to the prefill padding; the page table must be as wide."""
    engine = fake_tt_engine(engines["target"], max_seq_len=200, max_sessions=1)
    session = engine.new_session(200)
    assert len(session.blocks) == 8  # 256 positions
    prompt = list(range(1, 30))
    got = engine.score(session, 0, prompt, 1, SamplingParams()).argmax_token_ids
    got += engine.score(session, len(prompt), [3, 4], 2, SamplingParams()).argmax_token_ids
    ref = engines["target"]
    ref_session = ref.new_session(200)
    want = ref.score(ref_session, 0, prompt, 1, SamplingParams()).argmax_token_ids
    want += ref.score(ref_session, len(prompt), [3, 4], 2, SamplingParams()).argmax_token_ids
    assert got == want


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
