"""The Llama / Qwen2 decoder in plain torch, with a per-session KV cache written by position.

Parameter names follow Hugging Face checkpoints (model.layers.N.self_attn.o_proj, ...), except
that q/k/v and gate/up are fused (fuse_hf_projections converts). Batch size is 1: one call runs
one session's new tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from specdec.engine.config import ModelConfig


class TorchKVCache:
    """Keys and values of one session, preallocated for `capacity` positions.

    Position p of the sequence lives at index p. Rolling back is only moving the session's length;
    entries past it are overwritten by the next write and never read before that.
    """

    def __init__(self, config: ModelConfig, capacity: int, dtype: torch.dtype, device: torch.device):
        shape = (config.num_layers, config.num_kv_heads, capacity, config.head_dim)
        # Zeroed, not empty: a bug that reads past the length then shows as wrong numbers, not NaN.
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [layers, kv_heads, capacity, head_dim]
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


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
    # x: [1, heads, n, head_dim]; cos, sin: [n, head_dim]
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

    def forward(self, x, cos, sin, keys, values, start: int, mask):
        # x: [1, n, hidden]; keys, values: this layer's cache, [kv_heads, capacity, head_dim]
        n = x.shape[1]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(1, n, self.num_heads, self.head_dim).transpose(1, 2)  # [1, heads, n, head_dim]
        k = k.view(1, n, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [1, kv_heads, n, head_dim]
        v = v.view(1, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        end = start + n
        keys[:, start:end] = k[0]
        values[:, start:end] = v[0]
        out = F.scaled_dot_product_attention(
            q, keys[None, :, :end], values[None, :, :end], attn_mask=mask, enable_gqa=True
        )  # [1, heads, n, head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(1, n, -1))


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

    def forward(self, x, cos, sin, keys, values, start, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, keys, values, start, mask)
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

    def forward(self, token_ids: torch.Tensor, cache: TorchKVCache, start: int, num_logits: int) -> torch.Tensor:
        """Writes the KV of token_ids at positions start.. and returns the logits of the last
        num_logits of them, [num_logits, vocab]. The LM head runs on those rows only."""
        n = token_ids.shape[0]  # token_ids: [n]
        end = start + n
        cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]  # [n, head_dim]
        mask = None
        if n > 1:  # row i sees positions 0 .. start + i; one row sees everything cached
            positions = torch.arange(end, device=token_ids.device)
            mask = positions[None, :] <= (start + torch.arange(n, device=token_ids.device))[:, None]  # [n, end]
        x = self.model.embed_tokens(token_ids)[None]  # [1, n, hidden]
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache.keys[i], cache.values[i], start, mask)
        if num_logits == 0:
            return x.new_empty((0, self.config.vocab_size))
        x = self.model.norm(x[0, n - num_logits :])  # [num_logits, hidden]
        return self.lm_head(x)  # [num_logits, vocab]
