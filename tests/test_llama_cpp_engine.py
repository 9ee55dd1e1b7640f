"""The llama.cpp backend (specdec/engine/llama_cpp_engine.py) on tiny GGUF files written in the
test. Every test but the last needs llama.cpp built by scripts/build_llama_cpp.sh (`.ci/run`
builds it); without it they are skipped, saying so."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from specdec.engine import llama_cpp_engine
from specdec.engine.base import forward_one
from specdec.engine.llama_cpp_engine import LlamaCppEngine
from specdec.engine.torch_engine import TorchEngine
from specdec.errors import ResourceExhausted
from tests.test_gguf_weights import MODELS, VOCAB, assert_greedy_speculation_equals_target_alone, tiny_gguf

needs_llama_cpp = pytest.mark.skipif(
    not llama_cpp_engine.available() and not os.environ.get("SPECDEC_REQUIRE_LLAMA_CPP"),  # CI: fail, never skip
    reason="llama.cpp is not built: run scripts/build_llama_cpp.sh (--libs-only for these tests but the bench one)",
)
PROMPT = [int(t) for t in np.random.default_rng(5).integers(1, VOCAB, 40)]


@pytest.fixture(scope="module", params=list(MODELS))
def llama_pair(request, tmp_path_factory):
    """(llama.cpp on a tiny GGUF file, the same file dequantized to float32 on torch), and the file."""
    path = tiny_gguf(tmp_path_factory.mktemp(request.param) / "tiny.gguf", request.param)
    engine = LlamaCppEngine.load(str(path), max_seq_len=256, max_sessions=8)
    yield engine, TorchEngine.load(str(path), dtype="float32", max_seq_len=256, max_sessions=2), path
    engine.close()


def logits_of(engine, tokens: list[int]) -> torch.Tensor:
    session = engine.new_session(128)
    try:
        return forward_one(engine, session, tokens, len(tokens)).logits.float()
    finally:
        engine.end_session(session)


@needs_llama_cpp
def test_logits_match_the_dequantized_model_to_rounding(llama_pair):
    """llama.cpp rounds activations to 8 bits (Q8_K / Q8_0) before its quantized dot products, so it
    is compared with what bfloat16 activations cost the same dequantized weights (measured here:
    0.3x-1.8x of it over the three files)."""
    engine, dequantized, path = llama_pair
    assert engine.info.backend == "llama.cpp" and engine.info.dtype == "gguf"
    assert engine.info.vocab_size == dequantized.info.vocab_size
    assert engine.info.eos_token_ids == dequantized.info.eos_token_ids
    bfloat16 = TorchEngine.load(str(path), dtype="bfloat16", max_seq_len=256, max_sessions=1)
    got, rounded, expected = (logits_of(e, PROMPT) for e in (engine, bfloat16, dequantized))
    assert (got - expected).abs().max() <= 2.5 * (rounded - expected).abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.85


@needs_llama_cpp
def test_a_rolled_back_suffix_is_gone_from_the_cache(llama_pair):
    """Rejected tokens written then truncated away change nothing: what follows sees the prefix only."""
    engine, _, _ = llama_pair
    straight = logits_of(engine, PROMPT)
    session = engine.new_session(128)
    forward_one(engine, session, PROMPT[:20], 0)
    forward_one(engine, session, [3, 4, 5, 6, 7], 5)
    assert session.truncate(20) == 5
    after = forward_one(engine, session, PROMPT[20:], 20).logits
    engine.end_session(session)
    torch.testing.assert_close(after, straight[20:], rtol=0, atol=1e-4)


@needs_llama_cpp
def test_a_three_row_pass_runs_as_four_and_leaves_no_pad_behind(llama_pair):
    """A 3-row pass gets a fourth row (llama.cpp's 4-row GEMM is faster than three one-row passes):
    its rows come out as a real 4-row pass's would (the same kernel), the pad's cell is held past the
    session's length, then dropped, so what follows sees the real tokens only."""
    engine, _, _ = llama_pair
    straight = logits_of(engine, PROMPT)
    four = engine.new_session(128)
    forward_one(engine, four, PROMPT[:20], 0)
    four_rows = forward_one(engine, four, PROMPT[20:24], 4).logits
    engine.end_session(four)
    session = engine.new_session(128)
    forward_one(engine, session, PROMPT[:20], 0)
    block = forward_one(engine, session, PROMPT[20:23], 3).logits
    assert (session.length, session.cached) == (23, 24)  # the pad cell at position 23
    after = forward_one(engine, session, PROMPT[23:], 17).logits
    engine.end_session(session)
    torch.testing.assert_close(block, four_rows[:3], rtol=0, atol=1e-4)
    torch.testing.assert_close(after, straight[23:], rtol=0, atol=1e-4)


@needs_llama_cpp
def test_sessions_in_one_pass_are_apart(llama_pair):
    """Two sessions' chunks in one llama_decode give each what it gives alone (other sequences'
    cells are masked out), and a sampled chunk gets logits where a greedy one gets argmax ids."""
    from specdec.engine.base import Chunk
    from specdec.sampling import SamplingParams

    engine, _, _ = llama_pair
    a, b = PROMPT[:25], PROMPT[10:40]
    alone_a, alone_b = logits_of(engine, a), logits_of(engine, b)
    sa, sb = engine.new_session(64), engine.new_session(64)
    got = engine.run([Chunk(sa, a, 3, SamplingParams(temperature=1.0)), Chunk(sb, b, 2, SamplingParams())])
    engine.end_session(sa)
    engine.end_session(sb)
    torch.testing.assert_close(got[0].logits, alone_a[-3:], rtol=0, atol=1e-3)
    assert got[1].logits is None and got[1].argmax == alone_b[-2:].argmax(-1).tolist()


@needs_llama_cpp
def test_ending_a_session_frees_its_sequence_and_cells(tmp_path):
    path = tiny_gguf(tmp_path / "tiny.gguf", "qwen2-q4_k_m")
    engine = LlamaCppEngine.load(str(path), max_seq_len=64, max_sessions=2)
    try:
        fresh = logits_of(engine, PROMPT[:8])
        first, second = engine.new_session(64), engine.new_session(64)
        forward_one(engine, first, PROMPT, 1)
        with pytest.raises(ResourceExhausted):
            engine.new_session(16)
        assert engine.kv_usage().used_blocks == engine.kv_usage().total_blocks
        engine.end_session(first)
        again = engine.new_session(64)  # the sequence id `first` had, with no cell of its
        torch.testing.assert_close(forward_one(engine, again, PROMPT[:8], 8).logits, fresh, rtol=0, atol=1e-4)
        engine.end_session(again)
        engine.end_session(second)
        assert engine.kv_usage().used_blocks == 0
    finally:
        engine.close()


@needs_llama_cpp
@pytest.mark.parametrize("k", [2, 5])
def test_greedy_speculative_on_llama_cpp_equals_its_target_alone(loop, llama_pair, k):
    """Target and draft both on llama.cpp, over gRPC. A verify block and a one-row decode may run
    other kernels (llama.cpp repacks Q4_0/Q4_K for multi-row GEMMs), so this holds where no near
    tie sits on the path: these models' logits are spread wide (init_std 0.3)."""
    engine, _, path = llama_pair
    draft = LlamaCppEngine.load(str(path), max_seq_len=256, max_sessions=8)  # its own context: one pass at a time
    try:
        assert_greedy_speculation_equals_target_alone(loop, engine, draft, path, k)
    finally:
        draft.close()


@needs_llama_cpp
def test_the_bench_runs_both_services_on_llama_cpp(tmp_path):
    """`python -m specdec.bench --backend llama.cpp --draft-method both`: target and model draft on
    llama.cpp's kernels (their log says so) and the n-gram draft beside them, every configuration
    measured and labelled with the backend, greedy speculation equal to the target alone or
    explained by a near tie, and llama.cpp's own server on the same file beside them (its target
    alone, its draft model and its n-gram lookup at each k; CI builds it), or a plain word why not."""
    path = tiny_gguf(tmp_path / "tiny.gguf", "qwen2-q4_k_m")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "specdec.bench", "--quick", "--backend", "llama.cpp", "--target", str(path),
               "--draft", str(path), "--draft-method", "both", "--no-hf", "--overlap-k", "0", "--samplings", "greedy",
               "--out", str(out), "--port", "50250"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((out / "results.json").read_text())
    ours = [r for r in figures["rows"] if r["engine"] == "specdec"]
    speculative = {"k=2", "k=4", "adaptive k<=4"}
    assert {r["config"] for r in ours} == {"target alone", *speculative, *(f"ngram {c}" for c in speculative)}
    assert all(r["target_dtype"] == "gguf on llama.cpp" and r["tokens_per_second"] > 0 for r in ours)
    explained = {d["config"] for d in figures["divergences"]}
    assert all(r["identical_to_alone"] in (None, "3/3") or r["config"] in explained for r in ours)
    # these logits spread with a std of about 5; llama.cpp's one-row, block and batched kernels
    # differ on them by up to 0.08 (measured): a flip needs the two best closer than a few of that
    assert all(d["top2_gap"] < 0.25 for d in figures["divergences"])
    assert open(figures["service_log"]).read().count("llama.cpp context:") == 2  # target and model draft
    assert {"gguf on llama.cpp|greedy", "gguf on llama.cpp|greedy|ngram"} <= set(figures["costs"])
    assert (
        figures["costs"]["gguf on llama.cpp|greedy|ngram"]["draft_token"]
        < 0.1 * figures["costs"]["gguf on llama.cpp|greedy"]["draft_token"]
    )
    peer = {r["config"] for r in figures["rows"] if r["engine"] == "llama.cpp"}
    note = figures["llama_cpp"]
    assert bool(peer) == (not note.startswith(("not installed", "not run"))), note
    if peer or os.environ.get("SPECDEC_REQUIRE_LLAMA_CPP"):  # CI builds llama-server: the peer must run
        assert peer == {
            "llama.cpp target alone",
            *(f"llama.cpp {kind}k={k}" for kind in ("", "ngram ") for k in (2, 4)),
        }
        assert "Against llama.cpp" in (out / "README.md").read_text()


def test_without_llama_cpp_the_service_exits_2_saying_how_to_build_it(tmp_path):
    path = tiny_gguf(tmp_path / "tiny.gguf", "qwen2-q4_k_m")
    result = subprocess.run(
        [sys.executable, "-m", "target_service", "--backend", "llama.cpp", "--model", str(path), "--port", "0"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "LLAMA_CPP_LIB_PATH": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "llama.cpp's libraries are not built: run scripts/build_llama_cpp.sh" in result.stderr
