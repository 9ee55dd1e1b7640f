"""The torch engine against Hugging Face, batched passes against single ones, rollback by
position, and the KV pool."""

from __future__ import annotations

import json

import pytest
import torch

from specdec.engine.base import Chunk, forward_one
from specdec.engine.config import UnsupportedModelError
from specdec.engine.torch_engine import TorchEngine
from specdec.errors import InvalidArgument, ResourceExhausted
from specdec.sampling import Sampler, SamplingParams
from tests.tiny import greedy_reference, propose, save_tiny_model, score

SAMPLED = SamplingParams(temperature=1.0)

LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}  # fmt: skip


@pytest.mark.parametrize(
    "family, extra",
    [
        ("llama", {}),
        ("qwen2", {}),
        ("llama", {"tie_word_embeddings": True, "rope_scaling": LLAMA3_ROPE}),
        ("llama", {"num_kv_heads": 4, "head_dim": 16}),  # no grouping; head_dim not hidden / heads
    ],
    ids=["llama", "qwen2", "llama3-rope-tied", "mha-head-dim"],
)
def test_logits_match_hugging_face(tmp_path, family, extra):
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path / "m", family=family, vocab_size=64, max_positions=64, init_std=0.1, **extra)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    engine = TorchEngine.load(path, dtype="float64")
    tokens = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens[None]).logits[0]  # [40, vocab]
    # in one pass, and as a prefill followed by blocks of 1 and 5 tokens
    one_pass = forward_one(engine, engine.new_session(40), tokens.tolist(), 40).logits
    session = engine.new_session(40)
    pieces = [forward_one(engine, session, tokens[a:b].tolist(), b - a).logits for a, b in
              ((0, 30), (30, 31), (31, 36), (36, 40))]  # fmt: skip
    # HF normalises in float32 even for a float64 model; the rest agrees to float64 precision
    assert torch.allclose(one_pass, expected, atol=1e-5, rtol=0)
    assert torch.allclose(torch.cat(pieces), one_pass, atol=1e-10, rtol=0)


def test_unknown_family_is_rejected_by_name(tmp_path):
    path = save_tiny_model(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2' is not supported"):
        TorchEngine.load(path)


def test_rollback_then_continue_equals_fresh_run(engines):
    engine = engines["target"]
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    wrong, right = [7, 7, 7, 7, 7], [8, 2, 8]
    fresh = forward_one(engine, engine.new_session(32), prompt + right, 3).logits
    session = engine.new_session(32)
    forward_one(engine, session, prompt + wrong, 1)  # cache 13 positions, 5 of them to be discarded
    assert session.truncate(len(prompt)) == len(wrong)
    rolled = forward_one(engine, session, right, 3).logits
    assert torch.allclose(rolled, fresh, atol=1e-12, rtol=0)
    assert session.length == len(prompt) + len(right)


def test_a_pass_mixing_sessions_gives_each_what_a_pass_of_its_own_gives(engines):
    """Sessions at different lengths, with scattered blocks (a pool used by others before),
    a prompt piece, verify blocks of different k and single decode rows, all in one pass."""
    engine = engines["target"]
    holes = [engine.new_session(20) for _ in range(3)]  # borrow, then return some: blocks scatter
    engine.end_session(holes[1])
    rng = torch.Generator().manual_seed(3)
    histories = [torch.randint(1, 32, (n,), generator=rng).tolist() for n in (5, 17, 40, 1, 33)]
    new = [torch.randint(1, 32, (n,), generator=rng).tolist() for n in (1, 5, 9, 40, 2)]
    batched, alone = [], []
    for history in histories:
        for sessions in (batched, alone):
            s = engine.new_session(96)
            if history:
                forward_one(engine, s, history, 1)
            sessions.append(s)
    chunks = [Chunk(s, t, len(t), SAMPLED) for s, t in zip(batched, new)]
    together = engine.run(chunks)
    for s, t, got in zip(alone, new, together):
        want = forward_one(engine, s, t, len(t)).logits
        assert torch.allclose(got.logits, want, atol=1e-12, rtol=0)
    assert [s.length for s in batched] == [len(h) + len(t) for h, t in zip(histories, new)]
    for s in batched + alone + [holes[0], holes[2]]:
        engine.end_session(s)


def test_greedy_rows_come_back_as_argmax_and_sampled_ones_as_logits_in_the_same_pass(engines):
    engine = engines["target"]
    a, b = engine.new_session(16), engine.new_session(16)
    greedy, sampled = engine.run([Chunk(a, [1, 2, 3], 2, SamplingParams()), Chunk(b, [1, 2, 3], 1, SAMPLED)])
    assert greedy.logits is None and sampled.argmax is None
    assert greedy.argmax[-1] == int(sampled.logits[0].argmax())
    for s in (a, b):
        engine.end_session(s)


def test_a_full_kv_pool_refuses_a_session_and_takes_it_once_room_is_back(model_dirs):
    engine = TorchEngine.load(model_dirs["target"], dtype="float64", kv_cache_memory=64 * 1024)
    per_position = 2 * 4 * 2 * 8 * 8  # K and V, 4 layers, 2 KV heads, head_dim 8, float64
    assert engine.kv_usage().total_blocks * 16 == 64 * 1024 // per_position
    first = engine.new_session(48)  # 3 blocks of the pool's 4
    with pytest.raises(ResourceExhausted, match="capacity 48 needs 3"):
        engine.new_session(48)
    engine.end_session(first)
    assert engine.kv_usage().used_blocks == 0
    engine.new_session(48)


def test_score_rolls_back_by_start_position(engines):
    """Scoring twice from the same start_position is idempotent: the first block is overwritten."""
    engine = engines["target"]
    session = engine.new_session(32)
    score(engine, session, 0, [1, 2, 3, 4], 1)
    first = score(engine, session, 4, [5, 6, 7], 3).argmax
    score(engine, session, 4, [9, 9, 9, 9, 9], 5)  # a rejected block
    again = score(engine, session, 4, [5, 6, 7], 3).argmax
    fresh = score(engine, engine.new_session(32), 0, [1, 2, 3, 4, 5, 6, 7], 3).argmax
    assert first == again == fresh


def test_a_prompt_in_prefill_chunks_scores_what_one_pass_does(engines):
    engine = engines["target"]
    prompt = list(range(1, 30))
    whole = score(engine, engine.new_session(32), 0, prompt, 3)
    chunked = score(engine, engine.new_session(32), 0, prompt, 3, prefill_chunk=4)
    assert chunked.argmax == whole.argmax


def test_greedy_propose_is_the_draft_models_greedy_continuation(engines):
    engine = engines["layer_skip"]
    prompt = [5, 4, 3]
    session = engine.new_session(32)
    proposed, probs = propose(engine, session, 0, prompt, 6, Sampler(SamplingParams()))
    assert proposed == greedy_reference(engine, prompt, 6)
    assert probs is None
    assert session.length == len(prompt) + 5  # the last proposal is not fed back


def test_sampled_propose_returns_the_rows_it_drew_from(engines):
    engine = engines["layer_skip"]
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0))
    proposed, probs = propose(engine, engine.new_session(32), 0, [5, 4, 3], 4, sampler)
    assert probs.shape == (4, engine.info.vocab_size) and probs.dtype == torch.float16
    for token, row in zip(proposed, probs):
        assert row[token] > 0


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda e, s: score(e, s, 3, [1], 1), "start_position"),  # nothing cached yet
        (lambda e, s: score(e, s, 0, [1, 99], 1), "token_ids[1]"),
        (lambda e, s: score(e, s, 0, [1, -1], 1), "token_ids[1]"),
        (lambda e, s: score(e, s, 0, [1, 2], 3), "num_scored"),
        (lambda e, s: score(e, s, 0, [1, 2], 0), "num_scored"),
        (lambda e, s: score(e, s, 0, list(range(1, 10)), 1), "token_ids"),  # capacity 8
        (lambda e, s: propose(e, s, 0, [], 2, Sampler(SamplingParams())), "token_ids"),
        (lambda e, s: propose(e, s, 0, [1] * 4, 6, Sampler(SamplingParams())), "token_ids"),  # 4 + 5 > 8
    ],
)
def test_bad_commands_name_the_field_and_leave_the_cache_usable(engines, call, field):
    engine = engines["target"]
    session = engine.new_session(8)
    with pytest.raises(InvalidArgument) as e:
        call(engine, session)
    assert e.value.field == field
    assert score(engine, session, 0, [1, 2], 1).argmax  # still works
    engine.end_session(session)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))],
)
def test_graph_buckets_give_what_the_eager_pass_gives(model_dirs, device):
    """Passes padded to a bucket (padding rows writing to the scratch block): on a CPU run
    eagerly, on a GPU captured as CUDA graphs and replayed. Each session's logits equal the
    eager engine's, pass after pass, and a chunk longer than a bucket's rows runs eagerly."""
    dtype = "float64" if device == "cpu" else "float32"
    graphs = TorchEngine.load(model_dirs["target"], dtype=dtype, device=device, max_seq_len=256, max_sessions=4)
    graphs.attach_graphs(max_sessions=4, max_rows=5, capture=device == "cuda")
    eager = TorchEngine.load(model_dirs["target"], dtype=dtype, device=device, max_seq_len=256, max_sessions=4)
    tolerance = 1e-12 if device == "cpu" else 1e-4
    rng = torch.Generator().manual_seed(1)
    pairs = []
    for n in (3, 20, 7):
        history = torch.randint(1, 32, (n,), generator=rng).tolist()
        pair = graphs.new_session(128), eager.new_session(128)
        for engine, s in zip((graphs, eager), pair):
            forward_one(engine, s, history, 1)
        pairs.append(pair)
    for sizes in ([1, 1, 1], [5, 2, 1], [1, 5], [8, 1, 1]):  # the last: 8 rows fit no bucket
        new = [torch.randint(1, 32, (n,), generator=rng).tolist() for n in sizes]
        assert (graphs.graphs.bucket_for([Chunk(p[0], t, 1, SAMPLED) for p, t in zip(pairs, new)]) is None) == (
            8 in sizes
        )
        got = graphs.run([Chunk(p[0], t, len(t), SAMPLED) for p, t in zip(pairs, new)])
        want = eager.run([Chunk(p[1], t, len(t), SAMPLED) for p, t in zip(pairs, new)])
        for g, w in zip(got, want):
            assert torch.allclose(g.logits, w.logits, atol=tolerance, rtol=0)
    assert graphs.kv_usage().used_blocks == eager.kv_usage().used_blocks + 1  # the scratch block
