"""The llama.cpp backend: a GGUF file's weights as shipped, on llama.cpp's CPU kernels, one
`llama_decode` over many sessions' chunks (each session a llama.cpp sequence id).

llama.cpp is optional: `scripts/build_llama_cpp.sh` builds its libraries (and the benchmark's
llama-server) into the cache, and the `llama-cpp-python` bindings load them from there
(`LLAMA_CPP_LIB_PATH`, set here when unset). Rollback stays what KVSession.truncate says: the
length moves, and the cells beyond it are removed (`llama_memory_seq_rm`) before the session's
next write, so a rejected suffix never reaches attention.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch

from specdec.engine.base import Chunk, ChunkResult, Engine, KVSession, ModelInfo
from specdec.engine.blocks import BlockPool
from specdec.engine.config import ModelConfig
from specdec.engine.loading import cache_root, resolve_gguf_file
from specdec.errors import ResourceExhausted

log = logging.getLogger(__name__)

BACKEND = "llama.cpp"
DTYPES = ("gguf",)  # the file's own types (Q4_K, Q6_K, ...): llama.cpp never dequantizes them
BLOCK_SIZE = 16  # positions per pool block: bookkeeping only, llama.cpp places cells itself
VERSION = "0.3.36"  # the llama-cpp-python release whose vendored llama.cpp the build script builds
# A pass of 3 rows costs more than one of 4: llama.cpp's repacked Q4_K GEMM takes rows 4 at a time
# and sends the rest through its one-row kernel (Qwen2.5-Coder-1.5B Q4_K_M, 2 Xeon cores: 3 rows
# 1.82 decodes, 4 rows 1.61; 2 rows 1.51 and 7 rows 2.73 stay as they are, below 4 and 8 rows:
# results/2026-12-08-llama-cpp-services/verify_rows.py). So a 3-row pass gets a fourth row whose
# output nobody reads, and its cell is dropped like a rejected suffix.
PADDED_ROWS = {3: 4}
_init_lock = threading.Lock()
_initialized = False


def library_dir() -> Path | None:
    """Where libllama.so is: $LLAMA_CPP_LIB_PATH, else the build script's cache folder."""
    named = os.environ.get("LLAMA_CPP_LIB_PATH")
    folder = Path(named) if named else cache_root() / "llama.cpp" / VERSION / "build" / "bin"
    return folder if (folder / "libllama.so").is_file() else None


def bindings():
    """llama_cpp.llama_cpp loaded against our build, or ImportError saying how to get it."""
    global _initialized
    folder = library_dir()
    if folder is None:
        raise ImportError("llama.cpp's libraries are not built: run scripts/build_llama_cpp.sh")
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(folder))
    try:
        import llama_cpp.llama_cpp as lib
    except ImportError as e:
        raise ImportError(f"the llama-cpp-python bindings are missing ({e}): run scripts/build_llama_cpp.sh") from None
    with _init_lock:
        if not _initialized:
            lib.llama_log_set(_LOG_TO_PYTHON, None)
            lib.llama_backend_init()
            _initialized = True
    return lib


def _log_to_python(level: int, text: bytes, _user_data) -> None:
    """llama.cpp's own log: its warnings and errors to ours, its chatter (every tensor it loads) dropped."""
    if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
        log.log(
            logging.WARNING if level == 3 else logging.ERROR, "llama.cpp: %s", text.decode(errors="replace").rstrip()
        )


_LOG_TO_PYTHON = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(_log_to_python)


def available() -> bool:
    try:
        bindings()
        return True
    except ImportError:
        return False


class LlamaSession(KVSession):
    def __init__(self, capacity: int, blocks: list[int], seq_id: int):
        super().__init__(capacity, blocks)
        self.seq_id = seq_id
        self.cached = 0  # positions llama.cpp holds for this sequence (>= length after a rollback)


class LlamaCppEngine(Engine):
    def __init__(self, path: Path, config: ModelConfig, name: str, max_seq_len: int, max_sessions: int,
                 positions: int, threads: int, batch_rows: int):  # fmt: skip
        self.lib = lib = bindings()
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise ValueError(f"llama.cpp cannot load {path}")
        context = lib.llama_context_default_params()
        context.n_ctx = positions
        context.n_batch = context.n_ubatch = batch_rows
        context.n_seq_max = max_sessions
        context.kv_unified = True  # one pool of cells: a session may use up to its capacity of them
        context.n_threads = context.n_threads_batch = threads
        context.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, context)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise ValueError(f"llama.cpp cannot make a context of {positions} positions x {max_sessions} sequences")
        self.memory = lib.llama_get_memory(self.ctx)
        self.batch_rows = batch_rows
        self.batch = lib.llama_batch_init(batch_rows, 0, 1)
        vocab = lib.llama_model_get_vocab(self.model)
        self.vocab_size = lib.llama_vocab_n_tokens(vocab)
        self.info = ModelInfo(
            name=name, family=config.family, vocab_size=self.vocab_size, max_seq_len=max_seq_len,
            eos_token_ids=config.eos_token_ids, dtype="gguf", device="cpu", backend=BACKEND,
        )  # fmt: skip
        self.pool = BlockPool(-(-positions // BLOCK_SIZE), BLOCK_SIZE)
        self.max_sessions = max_sessions
        self.free_seq_ids = list(range(max_sessions - 1, -1, -1))
        log.info("llama.cpp context: %d positions, %d sequences, %d threads", positions, max_sessions, threads)

    @classmethod
    def load(cls, model: str | Path, max_seq_len: int = 0, max_sessions: int = 8, kv_cache_memory: int = 0,
             max_batch_tokens: int = 512, threads: int = 0) -> "LlamaCppEngine":  # fmt: skip
        """A registered model name or a .gguf file. The cells hold max_sessions full-length
        sessions, or what kv_cache_memory bytes hold in llama.cpp's float16 KV."""
        gguf_file, model_dir = resolve_gguf_file(model)
        config = ModelConfig.from_model_dir(model_dir)
        max_seq_len = min(max_seq_len or config.max_position_embeddings, config.max_position_embeddings)
        per_position = 2 * 2 * config.num_layers * config.num_kv_heads * config.head_dim  # K and V, float16
        positions = kv_cache_memory // per_position if kv_cache_memory else max_sessions * max_seq_len
        if positions < BLOCK_SIZE:
            raise ValueError(f"a KV pool of {kv_cache_memory} bytes holds no block ({per_position} bytes a position)")
        name = str(model) if isinstance(model, str) and not Path(model).exists() else gguf_file.stem
        threads = threads or torch.get_num_threads()
        return cls(gguf_file, config, name, max_seq_len, max_sessions, positions, threads, max(64, max_batch_tokens))

    def new_session(self, capacity: int) -> LlamaSession:
        if not self.free_seq_ids:
            raise ResourceExhausted(f"all {self.max_sessions} of llama.cpp's sequences are in use")
        blocks = self.pool.allocate(capacity)
        return LlamaSession(capacity, blocks, self.free_seq_ids.pop())

    def end_session(self, session: LlamaSession) -> None:
        super().end_session(session)
        if session.seq_id >= 0:
            self.lib.llama_memory_seq_rm(self.memory, session.seq_id, -1, -1)
            self.free_seq_ids.append(session.seq_id)
            session.seq_id = -1

    def run(self, chunks: list[Chunk]) -> list[ChunkResult]:
        rows = []  # (chunk index, token, position, seq id, wants logits)
        for index, chunk in enumerate(chunks):
            s = chunk.session
            assert s.length + len(chunk.token_ids) <= s.capacity, "a chunk past its session's capacity"
            if s.cached > s.length:  # a rollback: drop the rejected cells before writing past them
                self.lib.llama_memory_seq_rm(self.memory, s.seq_id, s.length, -1)
            first_output = len(chunk.token_ids) - chunk.num_outputs
            rows += [(index, t, s.length + i, s.seq_id, i >= first_output) for i, t in enumerate(chunk.token_ids)]
        pads = self._pad(chunks[-1].session, rows) if rows else 0
        outputs = [self._decode(rows[i : i + self.batch_rows]) for i in range(0, len(rows), self.batch_rows)]
        logits = torch.cat(outputs) if outputs else torch.empty(0, self.vocab_size)
        results, row = [], 0
        for chunk in chunks:
            mine = logits[row : row + chunk.num_outputs]
            row += chunk.num_outputs
            greedy = chunk.sampling.greedy
            results.append(ChunkResult(mine.argmax(-1).tolist() if greedy else None, None if greedy else mine))
            chunk.session.length += len(chunk.token_ids)
            chunk.session.cached = chunk.session.length
        if pads:
            chunks[-1].session.cached += pads  # the pad rows' cells, removed before the session's next write
        return results

    def _pad(self, session: LlamaSession, rows: list[tuple]) -> int:
        """Pads rows to PADDED_ROWS' size with the last row's token again at the next positions of
        its session (the last chunk's), no output wanted; -> how many rows it added (0 without room)."""
        index, token, position, seq_id, _ = rows[-1]
        pads = PADDED_ROWS.get(len(rows), len(rows)) - len(rows)
        if position + pads >= session.capacity:
            return 0
        rows += [(index, token, position + 1 + i, seq_id, False) for i in range(pads)]
        return pads

    def _decode(self, rows: list[tuple]) -> torch.Tensor:
        """One llama_decode of at most batch_rows rows; the logits of those that want them, in order."""
        b = self.batch
        for i, (_, token, position, seq_id, wants) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, position, 1, wants
            b.seq_id[i][0] = seq_id
        b.n_tokens = len(rows)
        status = self.lib.llama_decode(self.ctx, b)
        if status != 0:  # 1: no room for the batch in the cells; < 0: an error
            raise RuntimeError(f"llama_decode returned {status} for {len(rows)} rows")
        wanted = sum(1 for r in rows if r[4])
        if not wanted:
            return torch.empty(0, self.vocab_size)
        # in batch order (llama_get_logits reorders its outputs first); copied: the next pass reuses it
        buffer = np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(wanted, self.vocab_size))
        return torch.from_numpy(buffer.copy())

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = self.model = None
