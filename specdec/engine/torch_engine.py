"""The torch backend: our Transformer on the CPU or a CUDA GPU, one pass over many sessions."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from specdec.engine.base import Chunk, ChunkResult, Engine, ModelInfo
from specdec.engine.blocks import BlockPool
from specdec.engine.config import ModelConfig, UnsupportedModelError
from specdec.engine.cpu_linear import prepare_cpu_linears
from specdec.engine.cuda_graphs import CudaGraphs
from specdec.engine.loading import load_state_dict, resolve_gguf_file, resolve_model_dir
from specdec.engine.torch_batch import KVPool, pass_layout
from specdec.engine.torch_model import Transformer, fuse_hf_projections

log = logging.getLogger(__name__)

BLOCK_SIZE = 16  # positions per KV block: what a session's capacity is rounded up to

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
    "gguf": torch.bfloat16,  # a GGUF file's weights as shipped (int4/int8 kernels); bfloat16 activations
    "gguf-int8": torch.bfloat16,  # the same, with fbgemm's int8 copy where faster (8-bit activations)
}
GGUF = "gguf"
GGUF_DTYPES = (GGUF, "gguf-int8")

# Keys some checkpoints carry that the model recomputes (RoPE inverse frequencies).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class TorchEngine(Engine):
    def __init__(self, model: Transformer, name: str, device: torch.device, kv_positions: int, weights: str = ""):
        """kv_positions: the KV pool's size; attach_graphs() then captures the CUDA graphs.
        weights: what the weights are when not the activations' dtype ("gguf", "gguf-int8")."""
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
            dtype=weights or str(dtype).removeprefix("torch."),
            device=str(device),
            backend="torch",
        )
        self.pool = BlockPool(-(-kv_positions // BLOCK_SIZE), BLOCK_SIZE)
        self.kv = KVPool(config, self.pool.num_blocks, BLOCK_SIZE, dtype, device)
        self.graphs: CudaGraphs | None = None
        log.info(
            "KV pool: %d positions in blocks of %d, %.1f MiB",
            self.pool.num_blocks * BLOCK_SIZE, BLOCK_SIZE, 2 * self.kv.keys.nbytes / 2**20,
        )  # fmt: skip

    def attach_graphs(self, max_sessions: int, max_rows: int, capture: bool = True) -> None:
        """Decode and verify passes of up to max_sessions sessions, max_rows rows each, replayed
        from CUDA graphs (capture=False: the same padded buckets, eager; for tests on a CPU)."""
        scratch = self.pool.allocate(BLOCK_SIZE)[0]  # padding rows write here; no session owns it
        self.graphs = CudaGraphs(self.model, self.kv, scratch, max_sessions, max_rows, self.device, capture)

    @classmethod
    def load(
        cls,
        model: str | Path,
        dtype: str = "float32",
        device: str = "auto",
        max_seq_len: int = 0,
        max_sessions: int = 8,
        kv_cache_memory: int = 0,
        cuda_graphs: bool | None = None,
        max_draft_tokens: int = 16,
    ) -> "TorchEngine":
        """Loads from a registered name, an HF directory or a GGUF file. max_seq_len 0 = the
        model's. The KV pool holds kv_cache_memory bytes, or (0) max_sessions full-length sessions."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        torch_device = (
            torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
        )
        if dtype in GGUF_DTYPES:
            if torch_device.type != "cpu":
                raise ValueError(f"--dtype {dtype} runs on torch's CPU kernels, not on {torch_device}")
            from specdec.engine.gguf_weights import build_gguf_transformer

            gguf_file, model_dir = resolve_gguf_file(model)
            config = ModelConfig.from_model_dir(model_dir)
            transformer = build_gguf_transformer(gguf_file, config, max_seq_len, int8_rows=dtype != GGUF)
            name = str(model) if isinstance(model, str) and not Path(model).exists() else gguf_file.stem
        else:
            model_dir = resolve_model_dir(model)
            config = ModelConfig.from_model_dir(model_dir)
            state = load_state_dict(model_dir, DTYPES[dtype], torch_device)
            name = str(model) if isinstance(model, str) and not Path(model).exists() else model_dir.name
            transformer = build_transformer(config, state, max_seq_len)
        if torch_device.type == "cpu":
            prepare_cpu_linears(transformer)
        per_position = KVPool.bytes_per_position(config, DTYPES[dtype])
        positions = kv_cache_memory // per_position if kv_cache_memory else max_sessions * transformer.max_seq_len
        graphs = torch_device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if graphs and torch_device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {torch_device}")
        if positions < BLOCK_SIZE:
            raise ValueError(f"a KV pool of {kv_cache_memory} bytes holds no block ({per_position} bytes a position)")
        weights = dtype if dtype in GGUF_DTYPES else ""
        engine = cls(transformer, name, torch_device, positions + (BLOCK_SIZE if graphs else 0), weights)
        if graphs:
            engine.attach_graphs(max_sessions, max_draft_tokens + 1)
        return engine

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> list[ChunkResult]:
        for chunk in chunks:
            s = chunk.session
            assert s.length + len(chunk.token_ids) <= s.capacity, "a chunk past its session's capacity"
        bucket = self.graphs.bucket_for(chunks) if self.graphs else None
        if bucket is not None:
            logits = self.model.logits(self.graphs.run(chunks, bucket), None)  # [num_outputs, vocab]
        else:
            logits = self.model(pass_layout(chunks, BLOCK_SIZE, self.device), self.kv)
        greedy = [c.sampling.greedy for c in chunks]
        argmax = logits.argmax(dim=-1).tolist() if any(greedy) else []  # one device sync for all
        results, row = [], 0
        for chunk, is_greedy in zip(chunks, greedy):
            rows = slice(row, row + chunk.num_outputs)
            row += chunk.num_outputs
            if is_greedy:
                results.append(ChunkResult(argmax[rows], None))
            else:
                results.append(ChunkResult(None, logits[rows].cpu()))
            chunk.session.length += len(chunk.token_ids)
        return results


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
