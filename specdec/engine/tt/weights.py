"""Hugging Face weights in the layout our ttnn forward reads, as numpy arrays, then host tensors.

Two layout changes, both pure numpy (tested without a chip):
- q and k rows are reordered per head from HF's rotate-half order (x_i pairs with x_{i+d/2}) to
  interleaved pairs (x_{2i} with x_{2i+1}), the order ttnn's rotary_embedding_llama rotates.
  Attention scores q.k are unchanged: both sides get the same permutation, v and o do not.
- Linear weights are stored [in, out] (ttnn.linear computes x @ W), q/k/v fused; norm weights
  as rows of 32 ([1, 1, hidden/32, 32], row-major), the form ttnn.rms_norm reads.
Host tensors are cached on disk in bfloat16, row-major, so a second start skips the conversion;
tiling (and bfloat8_b) happen on the device, which a chip-less host cannot do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from specdec.engine.config import ModelConfig
from specdec.engine.tt.step_inputs import ROWS

MASKED = -1e4  # a masked score: exp() of it is 0, and it stays finite (a fully masked chunk's max is no NaN)


def interleave_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorders the rows of a q or k projection (weight [heads*d, in] or bias [heads*d]) so each
    head's output is (x_0, x_{d/2}, x_1, x_{d/2+1}, ...): rotate-half pairs become adjacent."""
    head_dim = w.shape[0] // num_heads
    rest = w.shape[1:]
    return w.reshape(num_heads, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def interleave_rope_tables(cos: np.ndarray, sin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HF tables ([positions, d] = cat(f, f)) to the interleaved form (f_0, f_0, f_1, f_1, ...)."""
    half = cos.shape[-1] // 2
    return np.repeat(cos[..., :half], 2, axis=-1), np.repeat(sin[..., :half], 2, axis=-1)


def rotation_matrix(size: int = 32) -> np.ndarray:
    """T with x @ T = (-x_1, x_0, -x_3, x_2, ...): the pair rotation that, with the interleaved
    tables, gives rope(x) = x * cos + (x @ T) * sin. One tile wide: the op applies it per tile."""
    t = np.zeros((size, size), dtype=np.float32)
    t[np.arange(0, size, 2), np.arange(1, size, 2)] = 1.0
    t[np.arange(1, size, 2), np.arange(0, size, 2)] = -1.0
    return t


def norm_rows(weight: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(weight.reshape(1, 1, -1, 32), dtype=np.float32)


def layer_arrays(config: ModelConfig, hf: Mapping[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """One decoder layer's weights for the ttnn forward, float32."""
    attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    q = interleave_rope_rows(hf[f"{attn}q_proj.weight"], config.num_heads)
    k = interleave_rope_rows(hf[f"{attn}k_proj.weight"], config.num_kv_heads)
    out = {
        "attention_norm": norm_rows(hf[f"model.layers.{i}.input_layernorm.weight"]),
        "wqkv": np.concatenate([q, k, hf[f"{attn}v_proj.weight"]]).T,  # [hidden, (h + 2 kv) d]
        "wo": hf[f"{attn}o_proj.weight"].T,  # [h d, hidden]
        "ffn_norm": norm_rows(hf[f"model.layers.{i}.post_attention_layernorm.weight"]),
        "w_gate": hf[f"{mlp}gate_proj.weight"].T,  # [hidden, intermediate]; apart, as ttnn.mul
        "w_up": hf[f"{mlp}up_proj.weight"].T,  # applies SiLU to one whole operand
        "w_down": hf[f"{mlp}down_proj.weight"].T,  # [intermediate, hidden]
    }
    if config.qkv_bias:
        bias = np.concatenate(
            [
                interleave_rope_rows(hf[f"{attn}q_proj.bias"], config.num_heads),
                interleave_rope_rows(hf[f"{attn}k_proj.bias"], config.num_kv_heads),
                hf[f"{attn}v_proj.bias"],
            ]
        )
        out["bqkv"] = bias[None, None, None]  # [1, 1, 1, (h + 2 kv) d]: prefill broadcasts it (eager)
        # the decode step's rows each get their own copy: a trace may not broadcast
        # (tt_transformers' attention.py expands its decode bias to the batch for this)
        out["bqkv_rows"] = np.broadcast_to(bias, (1, 1, ROWS, bias.shape[0]))
    return {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in out.items()}


def causal_mask_table(positions: int) -> np.ndarray:
    """[positions, positions]: row p is the additive attention mask of a query at position p,
    0 for keys at 0..p and MASKED past it (what the masked decode step looks up per row)."""
    keys = np.arange(positions)
    return np.where(keys[None, :] <= keys[:, None], 0.0, MASKED).astype(np.float32)


def model_arrays(config: ModelConfig, hf: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every weight of the model, named `layers.N.<name>` for layers; float32."""
    embedding = hf["model.embed_tokens.weight"]
    head = embedding if config.tie_word_embeddings else hf["lm_head.weight"]
    arrays = {
        "embedding": np.ascontiguousarray(embedding, dtype=np.float32),  # [vocab, hidden]
        "norm": norm_rows(hf["model.norm.weight"]),
        "lm_head": np.ascontiguousarray(head.T, dtype=np.float32),  # [hidden, vocab]; tied: a copy
    }
    for i in range(config.num_layers):
        arrays.update({f"layers.{i}.{name}": a for name, a in layer_arrays(config, hf, i).items()})
    return arrays


def cached_host_tensors(
    cache_dir: Path, build: Callable[[], dict[str, np.ndarray]], dtype_name: str = "bfloat16"
) -> dict[str, object]:
    """Host ttnn tensors (row-major, `dtype_name`) for every array `build` returns, from
    cache_dir when a previous start wrote them there; `build` runs only on a cache miss."""
    import ttnn

    dtype = getattr(ttnn, dtype_name)
    done = cache_dir / "complete"
    if done.exists():
        names = done.read_text().split()
        return {name: ttnn.load_tensor(cache_dir / f"{name}.tensorbin") for name in names}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, array in build().items():
        host = ttnn.Tensor(array, data_type=ttnn.float32, layout=ttnn.ROW_MAJOR_LAYOUT)
        tensors[name] = ttnn.to_dtype(host, dtype)
        ttnn.dump_tensor(cache_dir / f"{name}.tensorbin", tensors[name])
    done.write_text("\n".join(tensors))  # written last: a start killed midway leaves no marker
    return tensors
