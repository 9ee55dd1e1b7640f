"""Model hyper-parameters read from a Hugging Face config.json, for the families we run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Families whose decoder blocks are the same Llama block: RMSNorm, RoPE, grouped-query attention,
# SwiGLU MLP. Qwen2 differs only by biases on the q/k/v projections.
SUPPORTED_FAMILIES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint is of a family or layout this engine cannot run."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's frequency-dependent RoPE scaling."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf_dict(cls, hf: dict, eos_token_ids: tuple[int, ...] = ()) -> "ModelConfig":
        family = hf.get("model_type", "<missing>")
        if family not in SUPPORTED_FAMILIES:
            raise UnsupportedModelError(
                f"model_type {family!r} is not supported; supported families: {', '.join(SUPPORTED_FAMILIES)}"
            )
        # transformers 5 writes rope settings under rope_parameters; older files use rope_theta
        # and rope_scaling at the top level.
        rope = dict(hf.get("rope_parameters") or {})
        rope.update(hf.get("rope_scaling") or {})
        rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        if not eos_token_ids:
            eos = hf.get("eos_token_id")
            eos_token_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return cls(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama has them only when attention_bias is set.
            qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
            eos_token_ids=tuple(int(e) for e in eos_token_ids),
        )

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "ModelConfig":
        config_path = Path(model_dir) / "config.json"
        if not config_path.is_file():
            raise UnsupportedModelError(f"{model_dir} has no config.json")
        hf = json.loads(config_path.read_text())
        # generation_config.json often lists more stop ids than config.json (chat end-of-turn).
        eos: list[int] = []
        gen_path = Path(model_dir) / "generation_config.json"
        for source in (hf, json.loads(gen_path.read_text()) if gen_path.is_file() else {}):
            value = source.get("eos_token_id")
            for token in value if isinstance(value, list) else [value] if value is not None else []:
                if int(token) not in eos:
                    eos.append(int(token))
        return cls.from_hf_dict(hf, tuple(eos))
