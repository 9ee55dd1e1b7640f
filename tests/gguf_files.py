"""Tiny random models written as GGUF files with the `gguf` package (no downloaded weights), for the
services' `--model FILE.gguf` path: specdec.engine.loading.gguf_to_hf_dir, which hands the file to
transformers' GGUF loader.

What llama.cpp's converter does that the loader undoes, and so what is done here:
- tensors are named the GGUF way (token_embd, blk.N.attn_q, ...), their shapes as in the HF file;
- llama's q_proj/k_proj rows are permuted per head from RoPE's two halves to interleaved pairs
  (transformers permutes them back; qwen2's are stored as they are);
- the config is metadata under "<arch>." keys, the tokenizer is metadata under "tokenizer.".

The tokenizer is a byte-level BPE ("gpt2", as llama.cpp writes for Llama 3 and Qwen2): token 0 is
<|endoftext|> (a control token, EOS), then the space and the lowercase letters, then merges of a
space and a letter, then of two letters, as many as vocab_size leaves room for. It encodes text of
lowercase letters and spaces, and decodes it back. It is not tests/tiny.py's word-level tokenizer
(a byte-level pre-tokenizer splits "w12" into "w" and "12"), so token ids mean other text.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from tests.kquants import WRITERS
from tests.tiny import save_tiny_model

# the names llama.cpp gives the tensors of a llama/qwen2 layer, from the HF names
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"  # tests/tiny.py's
EOS = "<|endoftext|>"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SPACE = "\u0120"  # "Ġ": how a byte-level vocabulary spells the byte of a space


def save_tiny_gguf(
    path: Path, quant: str = "F32", reference_dir: Path | None = None, overrides: dict | None = None, **model_kwargs
) -> Path:
    """A GGUF file holding the random model save_tiny_model(reference_dir, **model_kwargs) builds
    (the same arguments, defaults and seed give the same weights): a llama or qwen2 family, tied
    embeddings or not, with this module's byte-level tokenizer. reference_dir: where to keep that
    HF directory too (its tokenizer is tiny.py's word-level one); by default a temporary folder.
    quant, overrides: how the 2-D matrices are stored (see gguf_from_hf_dir)."""
    path = Path(path)
    if reference_dir is not None:
        return gguf_from_hf_dir(save_tiny_model(reference_dir, **model_kwargs), path, quant, overrides)
    with tempfile.TemporaryDirectory() as scratch:
        return gguf_from_hf_dir(save_tiny_model(Path(scratch) / "hf", **model_kwargs), path, quant, overrides)


def gguf_from_hf_dir(model_dir: Path, path: Path, quant: str = "F32", overrides: dict | None = None) -> Path:
    """Writes the GGUF file of a small llama/qwen2 HF directory (config.json + model.safetensors),
    with this module's tokenizer for the config's vocab_size.

    quant: a gguf.GGMLQuantizationType name. "F32" (default) keeps every tensor as it is; another
    ("F16", "Q8_0", "Q4_0", ... any type gguf.quants can quantize) stores the 2-D matrices that way,
    the embedding and head included, and the norms and biases as F32, as llama.cpp does. Quantized
    types group each row in blocks (32 values for Q8_0), so the rows must be a multiple of that.
    Q4_K and Q6_K (256-value blocks) are written by tests/kquants.py. overrides: {GGUF name
    suffix: type} for the tensors stored otherwise, as llama.cpp's Q4_K_M keeps attn_v, ffn_down
    and output in Q6_K: {"attn_v.weight": "Q6_K", ...}."""
    import gguf
    from safetensors.torch import load_file

    model_dir, path = Path(model_dir), Path(path)
    config = json.loads((model_dir / "config.json").read_text())
    family = config["model_type"]
    if family not in ("llama", "qwen2"):
        raise ValueError(f"model_type {family!r}: only llama and qwen2 are written as GGUF here")
    qtype = gguf.GGMLQuantizationType[quant]
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    rope = {**(config.get("rope_parameters") or {}), **(config.get("rope_scaling") or {})}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"rope {rope}: transformers' GGUF loader rebuilds only the default RoPE")
    if family == "llama" and config.get("attention_bias"):
        raise ValueError("attention_bias: transformers' GGUF loader does not rebuild it for llama")
    if family == "qwen2" and head_dim != hidden // heads:
        raise ValueError("head_dim != hidden / heads: transformers' GGUF loader drops it for qwen2")

    state = {name: tensor.float().numpy() for name, tensor in load_file(model_dir / "model.safetensors").items()}
    tied = bool(config.get("tie_word_embeddings")) or "lm_head.weight" not in state
    tensors = {}
    for name, weights in state.items():
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        if name in _GLOBAL_TENSORS:
            gguf_name = _GLOBAL_TENSORS[name]
        else:
            _, _, layer, rest = name.split(".", 3)  # model.layers.N.<rest>
            gguf_name = f"blk.{layer}.{_LAYER_TENSORS[rest]}"
        if family == "llama" and _is_layer_tensor(name, "self_attn.q_proj.weight"):
            weights = interleave_rope_halves(weights, heads)
        elif family == "llama" and _is_layer_tensor(name, "self_attn.k_proj.weight"):
            weights = interleave_rope_halves(weights, kv_heads)
        tensors[gguf_name] = weights

    vocab_size = config["vocab_size"]
    tokens, token_types, merges = tiny_bpe_vocab(vocab_size)
    writer = gguf.GGUFWriter(path, family)
    writer.add_name(f"tiny-{family}")
    writer.add_file_type(_file_type(gguf, qtype))
    writer.add_vocab_size(vocab_size)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # no split regex of its own: GPT-2's byte-level one
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, weights in tensors.items():
        suffix = next((k for k in overrides or {} if name.endswith(k)), None)
        _add_tensor(gguf, writer, name, weights, gguf.GGMLQuantizationType[overrides[suffix]] if suffix else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _is_layer_tensor(hf_name: str, suffix: str) -> bool:
    return hf_name.startswith("model.layers.") and hf_name.endswith("." + suffix)


def interleave_rope_halves(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's order for q_proj/k_proj rows: HF rotates the first half of each head's rows with
    the second half, llama.cpp rotates adjacent pairs, so row j of a half goes to row 2j (first half)
    or 2j + 1 (second half). transformers' GGUF loader undoes it."""
    rows = weights.shape[0]
    half = rows // num_heads // 2
    return weights.reshape(num_heads, 2, half, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def quantized_like_gguf(weights: torch.Tensor, quant: str) -> torch.Tensor:
    """What a tensor becomes stored as `quant` and read back (float32): a reference for tests."""
    import gguf

    qtype = gguf.GGMLQuantizationType[quant]
    if weights.dim() < 2 or qtype == gguf.GGMLQuantizationType.F32:
        return weights.float().clone()
    data = gguf.quants.quantize(weights.float().numpy(), qtype)
    return torch.from_numpy(np.array(gguf.quants.dequantize(data, qtype), dtype=np.float32).reshape(weights.shape))


def tiny_bpe_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of the byte-level BPE described at the top."""
    letters = LETTERS[: min(len(LETTERS), vocab_size - 2)]
    base = [EOS, SPACE, *letters]
    pairs = [(SPACE, c) for c in letters] + [(a, b) for a in letters for b in letters]
    pairs = pairs[: vocab_size - len(base)]
    if vocab_size < 3 or len(base) + len(pairs) != vocab_size:
        raise ValueError(f"vocab_size {vocab_size}: the tiny BPE vocabulary holds 3 to {len(base) + len(pairs)}")
    tokens = base + [a + b for a, b in pairs]
    token_types = [3] + [1] * (vocab_size - 1)  # gguf.TokenType: 3 CONTROL, 1 NORMAL
    return tokens, token_types, [f"{a} {b}" for a, b in pairs]


def _file_type(gguf, qtype) -> int:
    if qtype == gguf.GGMLQuantizationType.F32:
        return gguf.LlamaFileType.ALL_F32
    named = getattr(gguf.LlamaFileType, f"MOSTLY_{qtype.name}", None)
    return int(named) if named is not None else int(gguf.LlamaFileType.GUESSED)


def _add_tensor(gguf, writer, name: str, weights: np.ndarray, qtype) -> None:
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    if weights.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, weights)
        return
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if weights.shape[-1] % block:
        raise ValueError(f"{name}: rows of {weights.shape[-1]} do not split into {qtype.name} blocks of {block}")
    data = WRITERS[qtype.name](weights) if qtype.name in WRITERS else gguf.quants.quantize(weights, qtype)
    if data.dtype == np.uint8:
        writer.add_tensor(name, data, raw_dtype=qtype)
    else:  # F16 comes back as float16, which the writer recognises
        writer.add_tensor(name, data)
