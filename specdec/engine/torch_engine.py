"""The torch backend: our Transformer on the CPU or a CUDA GPU, eager."""

from __future__ import annotations

from pathlib import Path

import torch

from specdec.engine.base import Engine, KVSession, ModelInfo
from specdec.engine.config import ModelConfig, UnsupportedModelError
from specdec.engine.cpu_linear import prepare_cpu_linears
from specdec.engine.loading import load_state_dict, resolve_model_dir
from specdec.engine.torch_model import TorchKVCache, Transformer, fuse_hf_projections

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}

# Keys some checkpoints carry that the model recomputes (RoPE inverse frequencies).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class TorchSession(KVSession):
    def __init__(self, capacity: int, cache: TorchKVCache):
        super().__init__(capacity)
        self.cache = cache


class TorchEngine(Engine):
    def __init__(self, model: Transformer, name: str, device: torch.device):
        self.model = model
        self.device = device
        config = model.config
        dtype = model.model.embed_tokens.weight.dtype  # the embedding stays a plain tensor
        self.dtype = dtype
        self.info = ModelInfo(
            name=name,
            family=config.family,
            vocab_size=config.vocab_size,
            max_seq_len=model.max_seq_len,
            eos_token_ids=config.eos_token_ids,
            dtype=str(dtype).removeprefix("torch."),
            device=str(device),
            backend="torch",
        )

    @classmethod
    def load(
        cls, model: str | Path, dtype: str = "float32", device: str = "auto", max_seq_len: int = 0
    ) -> "TorchEngine":
        """Loads from a registered name, an HF directory or a GGUF file. max_seq_len 0 = the model's."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        torch_device = (
            torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
        )
        model_dir = resolve_model_dir(model)
        config = ModelConfig.from_model_dir(model_dir)
        state = load_state_dict(model_dir, DTYPES[dtype], torch_device)
        name = str(model) if isinstance(model, str) and not Path(model).exists() else model_dir.name
        transformer = build_transformer(config, state, max_seq_len)
        if torch_device.type == "cpu":
            prepare_cpu_linears(transformer)
        return cls(transformer, name, torch_device)

    def new_session(self, capacity: int) -> TorchSession:
        return TorchSession(capacity, TorchKVCache(self.model.config, capacity, self.dtype, self.device))

    @torch.inference_mode()
    def forward(self, session: TorchSession, token_ids: list[int], num_logits: int) -> torch.Tensor:
        tokens = torch.tensor(token_ids, dtype=torch.long, device=self.device)  # [n]
        logits = self.model(tokens, session.cache, session.length, num_logits)  # [num_logits, vocab]
        session.length += len(token_ids)
        return logits


def build_transformer(config: ModelConfig, state: dict[str, torch.Tensor], max_seq_len: int = 0) -> Transformer:
    """Builds the model around already-loaded weights without allocating a second copy."""
    max_seq_len = min(max_seq_len or config.max_position_embeddings, config.max_position_embeddings)
    with torch.device("meta"):
        model = Transformer(config, max_seq_len)
    state = fuse_hf_projections(
        {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}, config.num_layers
    )
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise UnsupportedModelError(
            f"checkpoint does not match the {config.family} layout: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    if config.tie_word_embeddings:  # assign=True replaced the embedding; tie the head to it again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.setup_rope()
    return model.eval()
