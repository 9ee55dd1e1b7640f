"""The Llama / Qwen2 decoder in plain torch, over a pass of many sessions' rows.

Parameter names follow Hugging Face checkpoints (model.layers.N.self_attn.o_proj, ...), except
that q/k/v and gate/up are fused (fuse_hf_projections converts). A pass is flattened: the rows of
every session side by side (torch_batch.PassLayout), so each linear runs once over all of them;
only attention looks at which session a row belongs to. KV lives in one pool of slots for every
session (KVPool), written by slot and read through each session's blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from specdec.engine.config import ModelConfig
from specdec.engine.torch_batch import KVPool, PassLayout


def rope_tables(config: ModelConfig, num_positions: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, [num_positions, head_dim]. Computed in float32 as HF does."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if config.rope_scaling is not None:
        inv_freq = _llama3_scaled(inv_freq, config)
    freqs = torch.arange(num_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)  # [num_positions, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _llama3_scaled(inv_freq: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between blended.
    s = config.rope_scaling
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, head_dim]; cos, sin: [T, 1, head_dim]
    return x * cos + _rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Low-precision inputs are normalised in float32; float64 keeps its precision.
        compute = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        normed = compute * torch.rsqrt(compute.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        q_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.split = [q_dim, kv_dim, kv_dim]
        # q, k and v in one projection: one large GEMM costs less than three small ones.
        self.qkv_proj = nn.Linear(config.hidden_size, q_dim + 2 * kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, keys, values, layout: PassLayout, masks: list):
        # x: [T, hidden]; keys, values: this layer's pool, [slots, kv_heads, head_dim]
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = apply_rope(q.view(t, self.num_heads, self.head_dim), cos, sin)  # [T, heads, head_dim]
        k = apply_rope(k.view(t, self.num_kv_heads, self.head_dim), cos, sin)  # [T, kv_heads, head_dim]
        v = v.view(t, self.num_kv_heads, self.head_dim)
        # Every row's K/V is written before any row attends: row j of a verify block sees rows
        # 0..j of it through the mask, never the rows after it.
        keys.index_copy_(0, layout.slots, k)
        values.index_copy_(0, layout.slots, v)
        out = q.new_empty((t, self.num_heads * self.head_dim))
        for group, mask in zip(layout.groups, masks):
            out = group.attend(q, keys, values, mask, out)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def fuse_hf_projections(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Hugging Face checkpoints keep q/k/v and gate/up apart; this model has them fused."""
    for i in range(num_layers):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        for kind in ("weight", "bias"):
            parts = [state.pop(f"{attn}{name}_proj.{kind}", None) for name in "qkv"]
            if all(p is not None for p in parts):
                state[f"{attn}qkv_proj.{kind}"] = torch.cat(parts)
        gate, up = state.pop(f"{mlp}gate_proj.weight", None), state.pop(f"{mlp}up_proj.weight", None)
        if gate is not None and up is not None:
            state[f"{mlp}gate_up_proj.weight"] = torch.cat([gate, up])
    return state


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, keys, values, layout, masks):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, keys, values, layout, masks)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, max_seq_len: int):
        super().__init__()
        self.config = config
        self.max_seq_len = max_seq_len
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None

    def setup_rope(self) -> None:
        """Builds the RoPE tables in the model's dtype and device (after loading and casting)."""
        weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(self.config, self.max_seq_len, weight.dtype)
        self.rope_cos, self.rope_sin = cos.to(weight.device), sin.to(weight.device)

    def forward(self, layout: PassLayout, pool: KVPool) -> torch.Tensor:
        """Writes the KV of the pass's rows into the pool and returns the logits after the rows
        layout.output_rows names, [num_outputs, vocab]. The LM head runs on those rows only."""
        return self.logits(self.hidden(layout, pool), layout.output_rows)

    def hidden(self, layout: PassLayout, pool: KVPool) -> torch.Tensor:
        """The decoder over the pass's rows: [T, hidden], before the final norm. What a CUDA
        graph captures (its output is small; the LM head then runs on the wanted rows only)."""
        cos = self.rope_cos[layout.positions][:, None]  # [T, 1, head_dim]
        sin = self.rope_sin[layout.positions][:, None]
        masks = [group.mask() for group in layout.groups]  # once per pass, shared by the layers
        x = self.model.embed_tokens(layout.token_ids)  # [T, hidden]
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, pool.keys[i], pool.values[i], layout, masks)
        return x

    def logits(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        if rows is not None:
            x = x[rows]  # [num_outputs, hidden]
        return self.lm_head(self.model.norm(x))  # [num_outputs, vocab]
