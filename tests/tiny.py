"""Tiny random models and a tiny tokenizer, built inside the tests (no downloaded weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from specdec.engine.base import forward_one
from specdec.sampling import SamplingParams
from specdec.serving.jobs import ProposeJob, ScoreJob


def save_tiny_model(
    path: Path,
    family: str = "llama",
    vocab_size: int = 32,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    init_std: float = 0.02,
    max_positions: int = 8192,
    tie_word_embeddings: bool = False,
    **extra,
) -> Path:
    """A random Hugging Face checkpoint (config.json + safetensors) and a word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_type, model_type = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        family
    ]
    config = config_type(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        initializer_range=init_std,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=None,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_type(config)
    with torch.no_grad():  # HF zeroes biases (Qwen2's q/k/v): random ones make a dropped bias fail
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, init_std)
    model.save_pretrained(path)
    save_tiny_tokenizer(path, vocab_size)
    return Path(path)


def save_layer_skip_draft(target_dir: Path, path: Path, num_layers: int) -> Path:
    """A smaller draft that is the target's first num_layers layers (same embeddings and head):
    it agrees with the target often, but not always."""
    shutil.copytree(target_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = num_layers
    (path / "config.json").write_text(json.dumps(config))
    state = load_file(path / "model.safetensors")
    kept = {
        k: v for k, v in state.items() if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= num_layers)
    }
    save_file(kept, path / "model.safetensors", metadata={"format": "pt"})
    return path


def save_tiny_tokenizer(path: Path, vocab_size: int, word: str = "w") -> None:
    """Token 0 is <|endoftext|> (EOS; the name Qwen2's tokenizer class expects); token i > 0 is the
    word w<i> (another `word` makes another tokenizer of the same size). Text is words separated by spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{f"{word}{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)


def greedy_reference(engine, prompt: list[int], num_tokens: int) -> list[int]:
    """Target alone: one token per forward pass, fresh cache, argmax."""
    session = engine.new_session(len(prompt) + num_tokens)
    try:
        logits = forward_one(engine, session, prompt, 1).logits
        out = []
        for _ in range(num_tokens):
            out.append(int(logits[0].argmax()))
            logits = forward_one(engine, session, [out[-1]], 1).logits
        return out
    finally:
        engine.end_session(session)


def run_alone(engine, job, prefill_chunk: int = 1 << 30):
    """Runs one job to the end in passes of its own (what the scheduler does with no other session)."""
    while not job.done:
        chunk = job.next_chunk(job.rows_wanted(prefill_chunk, 1))
        job.take(engine.run([chunk])[0])
    return job


def propose(engine, session, start: int, token_ids: list[int], k: int, sampler, prefill_chunk: int = 1 << 30):
    """A draft command on one session alone -> (proposed tokens, q rows or None)."""
    job = ProposeJob.build(session, start, token_ids, k, sampler, engine.info.vocab_size, 0.0)
    run_alone(engine, job, prefill_chunk)
    return job.proposed, job.probs()


def score(engine, session, start: int, token_ids: list[int], num_scored: int, params=None, prefill_chunk=1 << 30):
    """A target command on one session alone -> its ScoreJob (argmax, or scored_logits())."""
    params = params or SamplingParams()
    job = ScoreJob.build(session, start, token_ids, num_scored, params, engine.info.vocab_size, 0.0)
    return run_alone(engine, job, prefill_chunk)


def save_tile_sized_pair(root: Path) -> tuple[Path, Path]:
    """A target whose dimensions the ttnn ops take (head_dim 64: whole tiles) and its one-layer
    draft, for running the services' ttnn path on the emulator (tests/ttnn_emulator.py)."""
    target = save_tiny_model(root / "target", vocab_size=256, hidden_size=128, num_heads=2, num_kv_heads=1,
                             init_std=0.1, seed=4)  # fmt: skip
    return target, save_layer_skip_draft(target, root / "draft", num_layers=1)
