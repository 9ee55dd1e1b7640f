"""TtEngine: the Engine interface over a Tenstorrent device. Runs only where a chip is present.

Start-up opens the device, puts the weights on it (converted once, then read from a disk cache),
allocates the paged KV cache, compiles every program and captures the two step traces. Both are
the same decode-shaped pass over ROWS rows, where many sessions' rows sit side by side, each with
its own position and page-table row:
- "draft": one row per session (up to 32 sessions' next draft token, or plain decodes), one KV
  write per layer;
- "verify": up to verify_rows (k_max + 1) rows per session, written one row of each session per
  KV write; several sessions' blocks are scored in one replay.
Before capture a self-test picks how decode attention masks (hazards.py: the kernel's causal mask,
or an explicit one where the chip leaks past it). Each step is captured twice: as above, and with
a top-k of its logits ("_candidates"), which sampled rows with a small top-k read instead of the
logits row (candidates.py). A pass of the scheduler
becomes as many replays as its rows need; the host writes every replay's inputs (the batch
changes between passes). Prompts (a chunk at position 0) run eagerly. Sessions borrow KV blocks;
rollback moves the position only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from specdec.engine.base import Chunk, ChunkResult, Engine, KVSession, ModelInfo, is_prefill
from specdec.engine.blocks import BlockPool
from specdec.engine.config import ModelConfig
from specdec.engine.loading import resolve_model_dir
from specdec.engine.tt.candidates import CANDIDATES, logits_from_candidates, samples_from_candidates
from specdec.engine.tt.device import DeviceOwner
from specdec.engine.tt.device_weights import device_mask_table, device_rope_tables, device_weights
from specdec.engine.tt.hazards import self_test
from specdec.engine.tt.host_tensors import prefill_host_tensors, step_host_tensors
from specdec.engine.tt.step_inputs import (
    ROWS,
    Piece,
    blocks_written_by_prefill,
    pack_passes,
    prefill_length,
    prefill_lengths,
    session_positions,
    step_inputs,
)
from specdec.engine.tt.traces import StepTraces
from specdec.errors import DeviceUnavailable

log = logging.getLogger(__name__)

WEIGHT_DTYPES = ("bfloat16", "bfloat8_b")
BLOCK_SIZE = 32
TRACE_REGION_BYTES = 64 * 1024 * 1024


def import_ttnn():
    try:
        import ttnn
    except ImportError as e:
        raise DeviceUnavailable(
            "the ttnn backend needs the ttnn package: pip install ttnn==0.81.1 (Python 3.10 or 3.12)"
        ) from e
    return ttnn


def check_model_fits(config: ModelConfig) -> None:
    """What the decode-shaped ops need of a model: whole tiles per head, heads within one tile."""
    if config.head_dim % 32:
        raise ValueError(f"the ttnn backend needs a head_dim that is a multiple of 32 (a tile), got {config.head_dim}")
    if config.num_heads > ROWS:
        raise ValueError(f"the ttnn backend runs at most {ROWS} attention heads on one device, got {config.num_heads}")


def kv_block_pool(max_sessions: int, max_seq_len: int) -> BlockPool:
    """Room for every session at full capacity (rounded as new_session rounds it), plus a scratch
    session's worth for warm-up."""
    return BlockPool((max_sessions + 1) * session_positions(max_seq_len) // BLOCK_SIZE, BLOCK_SIZE)


class TtRuntime:
    """traces.Runtime on a ttnn device."""

    def __init__(self, ttnn, device):
        self.ttnn, self.device = ttnn, device
        self._capturing = None

    def allocate(self, host):
        return self.ttnn.to_device(host, self.device)

    def write(self, host, device_tensor):
        self.ttnn.copy_host_to_device_tensor(host, device_tensor)

    def begin_capture(self):
        self._capturing = self.ttnn.begin_trace_capture(self.device, cq_id=0)

    def end_capture(self):
        trace, self._capturing = self._capturing, None
        self.ttnn.end_trace_capture(self.device, trace, cq_id=0)
        return trace

    def replay(self, trace):
        self.ttnn.execute_trace(self.device, trace, cq_id=0, blocking=False)

    def release(self, trace):
        self.ttnn.release_trace(self.device, trace)


class TtEngine(Engine):
    def __init__(self, ttnn, owner: DeviceOwner, model, info: ModelInfo, pool: BlockPool, verify_rows: int):
        self.ttnn, self.owner, self.model, self.info, self.pool = ttnn, owner, model, info, pool
        self.verify_rows = verify_rows
        self.max_blocks = pool.blocks_for(session_positions(info.max_seq_len))
        self.traces = StepTraces(TtRuntime(ttnn, owner.device))

    @classmethod
    def load(
        cls,
        model: str | Path,
        device_id: int = 0,
        weights_dtype: str = "bfloat16",
        max_seq_len: int = 4096,
        max_draft_tokens: int = 16,
        max_sessions: int = 8,
    ) -> "TtEngine":
        if not 1 <= max_draft_tokens < ROWS:
            raise ValueError(f"the ttnn backend verifies at most {ROWS - 1} draft tokens, got {max_draft_tokens}")
        ttnn = import_ttnn()
        model_dir = resolve_model_dir(model)
        config = ModelConfig.from_model_dir(model_dir)
        max_seq_len = min(max_seq_len, config.max_position_embeddings)
        owner = DeviceOwner(
            device_id,
            lambda i: ttnn.open_device(device_id=i, trace_region_size=TRACE_REGION_BYTES),
            ttnn.close_device,
        )
        device = owner.open()
        try:
            check_model_fits(config)
            from specdec.engine.tt.model import TtTransformer  # imports ttnn at module level

            weights = device_weights(ttnn, device, config, model_dir, weights_dtype)
            pool = kv_block_pool(max_sessions, max_seq_len)
            kv_cache = [
                tuple(
                    ttnn.zeros(
                        [pool.num_blocks, config.num_kv_heads, BLOCK_SIZE, config.head_dim],
                        dtype=ttnn.bfloat16,
                        layout=ttnn.TILE_LAYOUT,
                        device=device,
                        memory_config=ttnn.DRAM_MEMORY_CONFIG,
                    )  # zeroed: masked garbage could still be NaN, and NaN poisons softmax
                    for _ in range(2)
                )
                for _ in range(config.num_layers)
            ]
            # RoPE rows for every position a padded prefill reaches, not only max_seq_len
            rope = device_rope_tables(ttnn, device, config, session_positions(max_seq_len))
            tt_model = TtTransformer(device, config, weights, kv_cache, rope)
            positions = session_positions(max_seq_len)
            # the kernel's causal mask, or an explicit one where the chip leaks past it (hazards.py)
            self_test(ttnn, device, tt_model, device_mask_table(ttnn, device, positions), positions // BLOCK_SIZE)
            info = ModelInfo(
                name=str(model) if isinstance(model, str) and not Path(model).exists() else model_dir.name,
                family=config.family,
                vocab_size=config.vocab_size,
                max_seq_len=max_seq_len,
                eos_token_ids=config.eos_token_ids,
                dtype=weights_dtype,
                device=f"tt:{device_id}",
                backend="ttnn",
            )
            engine = cls(ttnn, owner, tt_model, info, pool, verify_rows=max_draft_tokens + 1)
            engine.warm_up()
        except BaseException:
            owner.close()
            raise
        return engine

    def warm_up(self) -> None:
        """Compiles prefill at every padded length, then compiles and captures both steps, on a
        scratch session, so that no request compiles or captures anything."""
        scratch = self.new_session(self.info.max_seq_len)
        try:
            for length in prefill_lengths(self.info.max_seq_len):
                self._prefill(scratch, [0] * min(length, self.info.max_seq_len), 0)
            programs = {}
            for name, write_rows in (("draft", 1), ("verify", self.verify_rows)):
                inputs = step_inputs([Piece(0, [0] * write_rows, scratch.blocks)], self.max_blocks, write_rows)
                host = self.host_inputs(inputs, write_rows)
                for suffix, candidates in (("", 0), ("_candidates", CANDIDATES)):
                    programs[name + suffix] = (
                        lambda b, w=write_rows, c=candidates: self.model.step(b, w, candidates=c),
                        host,
                    )
            self.traces.warm_up(programs)
        finally:
            self.end_session(scratch)
        log.info(
            "compiled prefill for %s tokens and captured the draft and verify traces, each also with top-%d candidates",
            prefill_lengths(self.info.max_seq_len),
            CANDIDATES,
        )

    # --- Engine ----------------------------------------------------------------------------------

    def session_positions(self, capacity: int) -> int:
        return session_positions(capacity)  # a padded prompt's rows land in the session's blocks

    def close(self) -> None:
        self.traces.close()
        self.owner.close()

    def run(self, chunks: list[Chunk]) -> list[ChunkResult]:
        """Prompts eagerly, one at a time; every other chunk's rows packed into replays of the
        draft trace (one row per session) or the verify trace (up to verify_rows each)."""
        outputs: list[list] = [[] for _ in chunks]  # per chunk: argmax ids, or logits rows
        steps = []
        for i, chunk in enumerate(chunks):
            if is_prefill(chunk.session.length):
                logits = self._prefill(chunk.session, chunk.token_ids, chunk.num_outputs)
                outputs[i] = logits.argmax(-1).tolist() if chunk.sampling.greedy else [logits]
            else:
                steps.append(i)
        starts = {i: chunks[i].session.length for i in steps}
        for pieces in pack_passes([len(chunks[i].token_ids) for i in steps], self.verify_rows):
            self._replay([(steps[j], offset, count) for j, offset, count in pieces], chunks, starts, outputs)
        for i in steps:
            chunks[i].session.length = starts[i] + len(chunks[i].token_ids)
        return [
            ChunkResult(out, None) if chunk.sampling.greedy else ChunkResult(None, _cat(out, self.info.vocab_size))
            for chunk, out in zip(chunks, outputs)
        ]

    # --- helpers ---------------------------------------------------------------------------------

    def _replay(self, pieces: list[tuple[int, int, int]], chunks: list[Chunk], starts: dict, outputs: list) -> None:
        """One replay over (chunk, first token, count) pieces; appends each piece's wanted rows
        to its chunk's outputs (read before the next replay overwrites them)."""
        write_rows = 1 if all(count == 1 for _, _, count in pieces) else self.verify_rows
        inputs = step_inputs(
            [Piece(starts[i] + first, chunks[i].token_ids[first : first + n], chunks[i].session.blocks)
             for i, first, n in pieces],
            self.max_blocks,
            write_rows,
        )  # fmt: skip
        wanted = []  # (chunk, rows of this replay whose next-token output it wants)
        for (i, first, n), rows in zip(pieces, inputs.rows):
            first_output = len(chunks[i].token_ids) - chunks[i].num_outputs
            keep = [r for t, r in zip(range(first, first + n), rows) if t >= first_output]
            if keep:
                wanted.append((i, keep))
        sampled = [chunks[i].sampling for i, _ in wanted if not chunks[i].sampling.greedy]
        from_candidates = bool(sampled) and all(samples_from_candidates(p) for p in sampled)
        trace = ("draft" if write_rows == 1 else "verify") + ("_candidates" if from_candidates else "")
        out = self.traces.run(trace, self.host_inputs(inputs, write_rows))
        if not wanted:
            return
        read = self._candidates if from_candidates else self._logits
        argmax = self._argmax(out) if len(sampled) < len(wanted) else None
        logits = read(out) if sampled else None
        for i, rows in wanted:
            if chunks[i].sampling.greedy:
                outputs[i] += [argmax[r] for r in rows]
            else:
                outputs[i].append(logits[rows])

    def host_inputs(self, inputs, write_rows: int) -> dict:
        """A step's inputs as the host tensors its buffers take (the masked path also reads
        each row's position per head)."""
        heads = self.model.config.num_heads if self.model.masked else 0
        return step_host_tensors(self.ttnn, inputs, write_rows, mask_heads=heads)

    # Readers of a replay's outputs, all ROWS rows.

    def _logits(self, outputs) -> torch.Tensor:
        return self.ttnn.to_torch(outputs["logits"])[0, 0, :, : self.info.vocab_size].float()  # [ROWS, vocab]

    def _argmax(self, outputs) -> list[int]:
        return self.ttnn.to_torch(outputs["argmax"]).reshape(-1).tolist()  # [ROWS]

    def _candidates(self, outputs) -> torch.Tensor:
        """[ROWS, vocab] logits rebuilt from each row's top candidates, the only part read back."""
        values, indices = (self.ttnn.to_torch(outputs[k])[0, 0] for k in ("top_values", "top_indices"))
        return logits_from_candidates(values, indices, self.info.vocab_size)

    def _prefill(self, session: KVSession, token_ids: list[int], num_logits: int) -> torch.Tensor:
        padded = prefill_length(len(token_ids), self.info.max_seq_len)
        blocks = blocks_written_by_prefill(len(token_ids), session.blocks, BLOCK_SIZE)
        host = prefill_host_tensors(self.ttnn, token_ids, padded, blocks)
        tokens, page_table = (self.ttnn.to_device(host[k], self.owner.device) for k in ("tokens", "page_table"))
        logits, first = self.model.prefill(
            tokens, len(token_ids), page_table, len(blocks) * BLOCK_SIZE, max(num_logits, 1)
        )
        rows = self.ttnn.to_torch(logits).float()[0, 0]  # [32 t, vocab], row 0 = position `first`
        # allocated after the traces were captured: freed before the next replay could corrupt them
        for tensor in (tokens, page_table, logits):
            self.ttnn.deallocate(tensor)
        session.length = len(token_ids)
        if num_logits == 0:
            return torch.empty((0, self.info.vocab_size))
        end = len(token_ids) - first
        return rows[end - num_logits : end, : self.info.vocab_size]


def _cat(pieces: list[torch.Tensor], vocab: int) -> torch.Tensor:
    return torch.cat(pieces) if pieces else torch.empty((0, vocab))
