"""tests/gguf_files.py: a GGUF file written there loads, through the services' GGUF path, as the
model it was written from, and its tokenizer round-trips text."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from specdec.engine.base import forward_one
from specdec.engine.loading import resolve_model_dir
from specdec.engine.torch_engine import TorchEngine
from tests.gguf_files import EOS, SPACE, quantized_like_gguf, save_tiny_gguf

VOCAB = 48
TOKENS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 35, 47, 0, 8, 9, 7, 9, 3, 2, 38, 4]


def logits(engine: TorchEngine) -> torch.Tensor:
    return forward_one(engine, engine.new_session(len(TOKENS)), TOKENS, len(TOKENS)).logits


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Where the conversion goes: a folder of the test's own, not ~/.cache/specdec."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize(
    "extra",
    [{}, {"family": "qwen2"}, {"tie_word_embeddings": True}, {"num_kv_heads": 4, "head_dim": 16}],
    ids=["llama", "qwen2", "llama-tied", "mha-head-dim"],
)
def test_gguf_file_loads_as_the_model_it_was_written_from(tmp_path, cache, extra):
    path = save_tiny_gguf(tmp_path / "tiny.gguf", reference_dir=tmp_path / "hf", vocab_size=VOCAB, init_std=0.5,
                          seed=5, **extra)  # fmt: skip
    model_dir = resolve_model_dir(path)
    assert model_dir.parent == cache / "converted"
    assert resolve_model_dir(path) == model_dir  # converted once, then reused
    # the same tensors under the same names: llama's q/k rows permuted and permuted back
    assert_close(load_file(model_dir / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors"),
                 rtol=0, atol=0)  # fmt: skip
    engine = TorchEngine.load(str(path), dtype="float64")
    reference = TorchEngine.load(tmp_path / "hf", dtype="float64")
    assert engine.info.family == reference.info.family and engine.info.vocab_size == VOCAB
    assert engine.info.eos_token_ids == (0,)
    # rms_norm_eps is a float32 in the file: 1e-6 comes back off by 3e-14
    assert_close(logits(engine), logits(reference), rtol=1e-9, atol=1e-9)


def test_tokenizer_round_trips_text(tmp_path, cache):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(save_tiny_gguf(tmp_path / "t.gguf", vocab_size=VOCAB)))
    vocab = tokenizer.get_vocab()
    assert len(vocab) == VOCAB
    for text in ("the quick brown fox jumps over a lazy dog", "a", "  spaced  out ", "zz top"):
        ids = tokenizer.encode(text)
        assert all(0 < i < VOCAB for i in ids)
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode(" a b") == [vocab[SPACE + "a"], vocab[SPACE + "b"]]  # merges apply
    assert tokenizer.eos_token == EOS and tokenizer.eos_token_id == 0
    assert tokenizer.encode("ab" + EOS) == [vocab["a"], vocab["b"], 0]  # the control token stays whole
    assert tokenizer.decode([vocab["a"], 0], skip_special_tokens=True) == "a"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi "


def test_q8_0_file_holds_the_weights_rounded_to_q8_0(tmp_path, cache):
    import gguf

    path = save_tiny_gguf(tmp_path / "q8.gguf", quant="Q8_0", reference_dir=tmp_path / "hf", vocab_size=VOCAB,
                          init_std=0.1, seed=5)  # fmt: skip
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32

    exact = load_file(tmp_path / "hf" / "model.safetensors")
    converted = load_file(resolve_model_dir(path) / "model.safetensors")
    assert_close(converted, {k: quantized_like_gguf(v, "Q8_0") for k, v in exact.items()}, rtol=0, atol=0)
    assert not torch.equal(converted["model.layers.0.self_attn.q_proj.weight"],
                           exact["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    quantized = logits(TorchEngine.load(str(path), dtype="float64"))
    reference = logits(TorchEngine.load(tmp_path / "hf", dtype="float64"))
    # rounding each weight by up to 0.4% moves the logits a little, not a lot (~7% of their spread here)
    assert not torch.allclose(quantized, reference, rtol=0, atol=1e-6)
    assert_close(quantized, reference, rtol=0, atol=0.15 * float(reference.std()))
