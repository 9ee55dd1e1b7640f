"""A GGUF file's weights as shipped (`--dtype gguf`): the model built around its quantized
tensors without a full-precision copy.

- Q4_0, Q4_1 and Q4_K are 32-weight groups on an affine 4-bit grid: they are unpacked into
  Int4Grid and run on the int4 kernel as they are (only their scale and zero are rounded to
  bfloat16).
- Every other matrix type (Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, F16, ...) is dequantized by the gguf
  package and put on an int8 grid, one scale per output row.
- `--dtype gguf-int8`: a layer may instead run every pass on an int8 copy of its weights on
  fbgemm's kernel, where that measured faster at load (specdec.engine.cpu_quant_linear).
- Norms and biases are small and stay dense; the token embedding is a bfloat16 table (a lookup
  reads a few rows, not the whole matrix). Activations and the KV cache are bfloat16.

Block layouts (ggml's ggml-common.h, as the gguf package's quants.py reads them): Q4_0 is an
fp16 d and 16 bytes of nibbles, w = d (q - 8), the low nibbles holding weights 0-15 and the high
ones 16-31; Q4_1 adds an fp16 m, w = d q + m; Q4_K is a 256-weight super-block of fp16 d and dmin,
12 bytes of 6-bit scales and mins for its eight 32-weight groups, and 128 bytes of nibbles where
each 32 bytes hold group 2c in their low nibbles and group 2c + 1 in their high ones,
w = d sc q - dmin m.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from specdec.engine.config import ModelConfig
from specdec.engine.cpu_quant_linear import Int4Grid, WeightOnlyLinear, plan_row_splits
from specdec.engine.torch_model import Transformer, fuse_hf_projections

log = logging.getLogger(__name__)

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, layer, rest = gguf_name.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
    return None


def _halves(raw: np.ndarray, start: int) -> np.ndarray:
    """16 bytes from `start` of each block -> its 32 nibbles, low nibbles first."""
    qs = raw[..., start : start + 16]
    return np.concatenate((qs & 0x0F, qs >> 4), axis=-1)


def _f16(raw: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(raw[..., start : start + 2]).view(np.float16).astype(np.float32)


def unpack_q4_0(raw: np.ndarray) -> Int4Grid:
    blocks = raw.reshape(raw.shape[0], -1, 18)
    d = _f16(blocks, 0)[..., 0]  # [N, groups]
    return Int4Grid(_halves(blocks, 2).reshape(raw.shape[0], -1), d, -8 * d)


def unpack_q4_1(raw: np.ndarray) -> Int4Grid:
    blocks = raw.reshape(raw.shape[0], -1, 20)
    d, m = _f16(blocks, 0)[..., 0], _f16(blocks, 2)[..., 0]
    return Int4Grid(_halves(blocks, 4).reshape(raw.shape[0], -1), d, m)


def unpack_q4_k(raw: np.ndarray) -> Int4Grid:
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, 144)
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # [N, super-blocks, 1]
    s = blocks[..., 4:16].astype(np.uint8)
    # Groups 0-3: the low 6 bits of bytes 0-3 (scales) and 4-7 (mins). Groups 4-7: a nibble of
    # bytes 8-11 and the top 2 bits of bytes 0-3 (scales) or 4-7 (mins) above it.
    sc = np.concatenate((s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)), axis=-1)
    mn = np.concatenate((s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)), axis=-1)
    qs = blocks[..., 16:144].reshape(n, -1, 4, 1, 32)
    q = np.concatenate((qs & 0x0F, qs >> 4), axis=-2)  # [N, super-blocks, 4, 2, 32]: group 2c + h
    return Int4Grid(q.reshape(n, -1), (d * sc).reshape(n, -1), (-dmin * mn).reshape(n, -1))


def read_tensor(tensor) -> Int4Grid | np.ndarray:
    """One GGUF tensor (a gguf.ReaderTensor) in HF orientation: [out, in] for a matrix."""
    import gguf

    kind = gguf.GGMLQuantizationType
    shape = tuple(int(d) for d in reversed(tensor.shape))
    unpack = {kind.Q4_0: unpack_q4_0, kind.Q4_1: unpack_q4_1, kind.Q4_K: unpack_q4_k}.get(tensor.tensor_type)
    if unpack is not None and len(shape) == 2:
        return unpack(np.asarray(tensor.data).reshape(shape[0], -1))
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)


def read_gguf_weights(path: Path, config: ModelConfig) -> dict[str, Int4Grid | np.ndarray]:
    """Every tensor under its Hugging Face name. llama.cpp's converter interleaves a llama's q/k
    rows for its RoPE (see tests/gguf_files.py); they are put back in HF's order here."""
    from gguf import GGUFReader

    weights: dict[str, Int4Grid | np.ndarray] = {}
    for tensor in GGUFReader(str(path)).tensors:
        name = hf_name(tensor.name)
        if name is None:
            log.info("%s: ignoring tensor %s", path.name, tensor.name)
            continue
        value = read_tensor(tensor)
        if config.family == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            value = _take_rows(value, _rope_halves_order(value.shape[0], heads))
        weights[name] = value
    return weights


def _rope_halves_order(rows: int, heads: int) -> np.ndarray:
    """Row i of HF's order is row order[i] of llama.cpp's (pairs (2j, 2j + 1) -> rows j, j + half)."""
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(rows)


def _take_rows(value: Int4Grid | np.ndarray, order: np.ndarray) -> Int4Grid | np.ndarray:
    return value.rows(order) if isinstance(value, Int4Grid) else value[order]


def build_gguf_transformer(
    path: Path, config: ModelConfig, max_seq_len: int = 0, int8_rows: bool = False
) -> Transformer:
    """The Transformer in bfloat16 with WeightOnlyLinear layers around path's quantized tensors.
    int8_rows: a layer runs on fbgemm's int8 copy where that is faster (specdec.engine.
    cpu_quant_linear); False: only the weights as shipped."""
    weights = read_gguf_weights(path, config)
    max_seq_len = min(max_seq_len or config.max_position_embeddings, config.max_position_embeddings)
    with torch.device("meta"):
        model = Transformer(config, max_seq_len)

    def linear(*names: str) -> WeightOnlyLinear:
        parts = [weights.pop(n + ".weight") for n in names]
        biases = [weights.pop(n + ".bias", None) for n in names]
        bias = torch.from_numpy(np.concatenate(biases)) if all(b is not None for b in biases) else None
        return WeightOnlyLinear.from_parts(parts, bias, int8_rows)

    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        layer.self_attn.qkv_proj = linear(*(f"{p}self_attn.{x}_proj" for x in "qkv"))
        layer.self_attn.o_proj = linear(f"{p}self_attn.o_proj")
        layer.mlp.gate_up_proj = linear(f"{p}mlp.gate_proj", f"{p}mlp.up_proj")
        layer.mlp.down_proj = linear(f"{p}mlp.down_proj")
    embedding = weights.pop("model.embed_tokens.weight")
    head = weights.pop("lm_head.weight", embedding)  # a tied head is the embedding's own grid
    model.lm_head = WeightOnlyLinear.from_parts([head], None, int8_rows)
    dense = embedding.dequantize() if isinstance(embedding, Int4Grid) else embedding
    state = {"model.embed_tokens.weight": torch.from_numpy(dense).to(torch.bfloat16)}
    state.update({name: torch.from_numpy(np.array(value)).to(torch.bfloat16) for name, value in weights.items()})
    result = model.load_state_dict(fuse_hf_projections(state, config.num_layers), strict=False, assign=True)
    if result.unexpected_keys or any(p.is_meta for p in model.parameters()):
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        raise ValueError(f"{path.name}: unexpected tensors {result.unexpected_keys[:5]}, missing {missing[:5]}")
    model.setup_rope()
    log.info("%s: %d layer shapes timed for their row splits", path.name, plan_row_splits(model))
    return model.eval()
