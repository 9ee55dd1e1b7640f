"""The backends a service can run, by name: the one place that knows them. A service asks for a
backend's weight dtypes and loads an engine through here; it never imports a backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from specdec.engine.base import Engine
from specdec.engine.llama_cpp_engine import DTYPES as LLAMA_CPP_DTYPES
from specdec.engine.torch_engine import DTYPES as TORCH_DTYPES
from specdec.engine.tt.engine import WEIGHT_DTYPES as TTNN_DTYPES


@dataclass(frozen=True)
class EngineOptions:
    model: str
    dtype: str
    max_seq_len: int
    max_sessions: int
    max_draft_tokens: int
    device: str = "auto"  # torch: cpu, cuda, cuda:N or auto
    device_id: int = 0  # ttnn: the Tenstorrent device
    kv_cache_memory: int = 0  # bytes of KV pool; 0 = max_sessions full-length sessions
    cuda_graphs: bool | None = None  # None: on when the device is CUDA
    max_batch_tokens: int = 512  # llama.cpp: rows of one llama_decode (a pass with more is split)


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    dtypes: tuple[str, ...]
    default_dtype: str | None  # None: the role's own default (a float32 target, a bfloat16 draft)
    load: Callable[[EngineOptions], Engine]
    whole_prompts: bool = False  # prefill runs eagerly from position 0 only: give it whole prompts


def _load_torch(o: EngineOptions) -> Engine:
    from specdec.engine.torch_engine import TorchEngine

    return TorchEngine.load(
        o.model, dtype=o.dtype, device=o.device, max_seq_len=o.max_seq_len, max_sessions=o.max_sessions,
        kv_cache_memory=o.kv_cache_memory, cuda_graphs=o.cuda_graphs, max_draft_tokens=o.max_draft_tokens,
    )  # fmt: skip


def _load_ttnn(o: EngineOptions) -> Engine:
    from specdec.engine.tt.engine import TtEngine

    return TtEngine.load(
        o.model, device_id=o.device_id, weights_dtype=o.dtype, max_seq_len=o.max_seq_len,
        max_draft_tokens=o.max_draft_tokens, max_sessions=o.max_sessions,
    )  # fmt: skip


def _load_llama_cpp(o: EngineOptions) -> Engine:
    from specdec.engine.llama_cpp_engine import LlamaCppEngine

    return LlamaCppEngine.load(
        o.model, max_seq_len=o.max_seq_len, max_sessions=o.max_sessions, kv_cache_memory=o.kv_cache_memory,
        max_batch_tokens=o.max_batch_tokens,
    )  # fmt: skip


BACKENDS = {
    "torch": Backend("torch", "torch (CPU, CUDA)", tuple(TORCH_DTYPES), None, _load_torch),
    "llama.cpp": Backend("llama.cpp", "llama.cpp (CPU; scripts/build_llama_cpp.sh builds it)", LLAMA_CPP_DTYPES,
                         "gguf", _load_llama_cpp),
    "ttnn": Backend("ttnn", "ttnn (Tenstorrent)", TTNN_DTYPES, "bfloat16", _load_ttnn, whole_prompts=True),
}


def load_engine(backend: str, options: EngineOptions) -> Engine:
    return BACKENDS[backend].load(options)


def load_ngram_engine(options: EngineOptions) -> Engine:
    """The model-free draft (prompt lookup) in options.model's vocabulary: no weights, no device."""
    from specdec.engine.ngram import NgramEngine

    return NgramEngine.load(options.model, options.max_seq_len, options.max_sessions)
