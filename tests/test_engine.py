"""The torch engine against Hugging Face, and rollback by position."""

from __future__ import annotations

import json

import pytest
import torch

from specdec.engine.config import UnsupportedModelError
from specdec.engine.torch_engine import TorchEngine
from specdec.errors import InvalidArgument
from specdec.sampling import Sampler, SamplingParams
from tests.tiny import greedy_reference, save_tiny_model

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
    one_pass = engine.forward(engine.new_session(40), tokens.tolist(), 40)
    session = engine.new_session(40)
    pieces = [engine.forward(session, tokens[:30].tolist(), 30), engine.forward(session, tokens[30:31].tolist(), 1)]
    pieces += [engine.forward(session, tokens[31:36].tolist(), 5), engine.forward(session, tokens[36:].tolist(), 4)]
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
    fresh = engine.forward(engine.new_session(32), prompt + right, 3)
    session = engine.new_session(32)
    engine.forward(session, prompt + wrong, 1)  # cache 13 positions, 5 of them to be discarded
    assert session.truncate(len(prompt)) == len(wrong)
    rolled = engine.forward(session, right, 3)
    assert torch.allclose(rolled, fresh, atol=1e-12, rtol=0)
    assert session.length == len(prompt) + len(right)


def test_score_rolls_back_by_start_position(engines):
    """Scoring twice from the same start_position is idempotent: the first block is overwritten."""
    engine = engines["target"]
    params = SamplingParams()
    session = engine.new_session(32)
    engine.score(session, 0, [1, 2, 3, 4], 1, params)
    first = engine.score(session, 4, [5, 6, 7], 3, params).argmax_token_ids
    engine.score(session, 4, [9, 9, 9, 9, 9], 5, params)  # a rejected block
    again = engine.score(session, 4, [5, 6, 7], 3, params).argmax_token_ids
    fresh = engine.score(engine.new_session(32), 0, [1, 2, 3, 4, 5, 6, 7], 3, params).argmax_token_ids
    assert first == again == fresh


def test_greedy_propose_is_the_draft_models_greedy_continuation(engines):
    engine = engines["layer_skip"]
    prompt = [5, 4, 3]
    session = engine.new_session(32)
    proposal = engine.propose(session, 0, prompt, 6, Sampler(SamplingParams()))
    assert proposal.token_ids == greedy_reference(engine, prompt, 6)
    assert proposal.probs is None
    assert session.length == len(prompt) + 5  # the last proposal is not fed back


def test_sampled_propose_returns_the_rows_it_drew_from(engines):
    engine = engines["layer_skip"]
    proposal = engine.propose(engine.new_session(32), 0, [5, 4, 3], 4, Sampler(SamplingParams(temperature=1.0, seed=0)))
    assert proposal.probs.shape == (4, engine.info.vocab_size) and proposal.probs.dtype == torch.float16
    for token, row in zip(proposal.token_ids, proposal.probs):
        assert row[token] > 0


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda e, s: e.score(s, 3, [1], 1, SamplingParams()), "start_position"),  # nothing cached yet
        (lambda e, s: e.score(s, 0, [1, 99], 1, SamplingParams()), "token_ids[1]"),
        (lambda e, s: e.score(s, 0, [1, -1], 1, SamplingParams()), "token_ids[1]"),
        (lambda e, s: e.score(s, 0, [1, 2], 3, SamplingParams()), "num_scored"),
        (lambda e, s: e.score(s, 0, [1, 2], 0, SamplingParams()), "num_scored"),
        (lambda e, s: e.score(s, 0, list(range(1, 10)), 1, SamplingParams()), "token_ids"),  # capacity 8
        (lambda e, s: e.propose(s, 0, [], 2, Sampler(SamplingParams())), "token_ids"),
        (lambda e, s: e.propose(s, 0, [1] * 4, 6, Sampler(SamplingParams())), "token_ids"),  # 4 + 5 > 8
    ],
)
def test_bad_commands_name_the_field_and_leave_the_cache_usable(engines, call, field):
    engine = engines["target"]
    session = engine.new_session(8)
    with pytest.raises(InvalidArgument) as e:
        call(engine, session)
    assert e.value.field == field
    assert engine.score(session, 0, [1, 2], 1, SamplingParams()).argmax_token_ids  # still works
