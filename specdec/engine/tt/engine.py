"""TtEngine: the Engine interface over a Tenstorrent device. Runs only where a chip is present.

Start-up opens the device, puts the weights on it (converted once, then read from a disk cache),
allocates the paged KV cache, compiles every program and captures the two step traces:
- "draft": one live row, its argmax fed back into its own token input, positions advanced on
  device; k proposals are k replays with one host write at the start of the round.
- "verify": VERIFY_ROWS rows, k+1 live; the target scores a block in one replay. Target-alone
  generation is the same trace with one live row, so "speculative == target alone" holds exactly.
Each is captured twice: as above, and with a top-k of its logits ("_candidates"), which sampled
requests with a small top-k replay so that only the candidates come back (candidates.py).
Sessions borrow KV blocks; rollback moves the position only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from specdec.engine.base import Engine, KVSession, ModelInfo, Proposal
from specdec.engine.config import ModelConfig
from specdec.engine.loading import resolve_model_dir
from specdec.engine.tt.blocks import BlockPool
from specdec.engine.tt.candidates import CANDIDATES, logits_from_candidates, samples_from_candidates
from specdec.engine.tt.device import DeviceOwner, DeviceUnavailable
from specdec.engine.tt.device_weights import device_rope_tables, device_weights
from specdec.engine.tt.host_tensors import prefill_host_tensors, step_host_tensors, tokens_host_tensor
from specdec.engine.tt.step_inputs import (
    ROWS,
    blocks_written_by_prefill,
    prefill_length,
    prefill_lengths,
    session_positions,
    split_into_passes,
    step_inputs,
)
from specdec.engine.tt.traces import StepTraces
from specdec.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)

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


class TtSession(KVSession):
    def __init__(self, capacity: int, blocks: list[int]):
        super().__init__(capacity)
        self.blocks = blocks


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
            draft = step_host_tensors(self.ttnn, step_inputs(0, [0], scratch.blocks, self.max_blocks, 1), 1)
            rows = self.verify_rows
            verify = step_host_tensors(
                self.ttnn, step_inputs(0, [0] * rows, scratch.blocks, self.max_blocks, rows), rows
            )
            programs = {}
            for name, candidates in (("", 0), ("_candidates", CANDIDATES)):
                programs["draft" + name] = (
                    lambda b, c=candidates: self.model.step(b, 1, feed_back=True, candidates=c),
                    draft,
                )
                programs["verify" + name] = (
                    lambda b, c=candidates: self.model.step(b, rows, feed_back=False, candidates=c),
                    verify,
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

    def new_session(self, capacity: int) -> TtSession:
        return TtSession(capacity, self.pool.allocate(session_positions(capacity)))

    def end_session(self, session: TtSession) -> None:
        blocks, session.blocks = session.blocks, []
        self.pool.release(blocks)

    def close(self) -> None:
        self.traces.close()
        self.owner.close()

    def forward(self, session: TtSession, token_ids: list[int], num_logits: int) -> torch.Tensor:
        if self._is_prompt(session, token_ids):
            return self._prefill(session, token_ids, num_logits)
        rows = self._scored_rows(session, token_ids, num_logits, "verify", self._logits)
        return torch.cat(rows) if rows else torch.empty((0, self.info.vocab_size))

    def greedy_next(self, session: TtSession, token_ids: list[int], num_scored: int) -> list[int]:
        if self._is_prompt(session, token_ids):
            return super().greedy_next(session, token_ids, num_scored)
        return [t for ids in self._scored_rows(session, token_ids, num_scored, "verify", self._argmax) for t in ids]

    def sampling_logits(
        self, session: TtSession, token_ids: list[int], num_scored: int, params: SamplingParams
    ) -> torch.Tensor:
        if self._is_prompt(session, token_ids) or not samples_from_candidates(params):
            return self.forward(session, token_ids, num_scored)
        return torch.cat(self._scored_rows(session, token_ids, num_scored, "verify_candidates", self._candidates))

    def propose(self, session: TtSession, start_position: int, token_ids: list[int], num_tokens: int, sampler: Sampler):
        """k replays of the draft trace. It writes each row's KV, advances the positions and feeds
        its argmax back on the device; when sampling, the host picks from the step's candidates
        (or its logits row) instead and writes only the token it picked before the next replay."""
        if num_tokens == 0:
            return super().propose(session, start_position, token_ids, num_tokens, sampler)
        self.start_proposal(session, start_position, token_ids, num_tokens)
        if len(token_ids) > 1:
            self.forward(session, token_ids[:-1], 0)
        inputs = step_inputs(session.length, token_ids[-1:], session.blocks, self.max_blocks, write_rows=1)
        host = step_host_tensors(self.ttnn, inputs, 1)
        greedy, from_candidates = sampler.params.greedy, samples_from_candidates(sampler.params)
        trace = "draft_candidates" if from_candidates else "draft"
        proposed, rows = [], []
        for _ in range(num_tokens):
            outputs = self.traces.run(trace, host)
            if greedy:
                proposed.append(self._argmax(outputs, slice(0, 1))[0])
                host = {}  # the trace already wrote its argmax into its own token input
            else:
                logits = (self._candidates if from_candidates else self._logits)(outputs, slice(0, 1))
                token, row = sampler.pick(logits)
                proposed.append(token)
                rows.append(row)
                host = {"tokens": tokens_host_tensor(self.ttnn, [token])}
        session.length += num_tokens  # the last token of token_ids, and every proposal but the last
        return Proposal(proposed, torch.stack(rows) if rows else None)

    # --- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _is_prompt(session: TtSession, token_ids: list[int]) -> bool:
        """A fresh session's tokens go through the eager prefill, not the verify trace."""
        return session.length == 0 and len(token_ids) > 1

    def _scored_rows(self, session: TtSession, token_ids: list[int], num_scored: int, trace: str, read) -> list:
        """Runs token_ids through a verify trace; returns read(outputs, rows) for the rows of the
        last num_scored tokens, one piece per pass that has any."""
        pieces = []
        for outputs, first, live in self._verify_passes(session, token_ids, trace):
            wanted = [r for r in range(live) if first + r >= len(token_ids) - num_scored]
            if wanted:  # read before the next replay overwrites the outputs
                pieces.append(read(outputs, slice(wanted[0], wanted[-1] + 1)))
        return pieces

    def _verify_passes(self, session: TtSession, token_ids: list[int], trace: str):
        """Runs token_ids through a verify trace, verify_rows at a time; yields each pass's
        outputs, the index in token_ids of its first row, and its number of live rows."""
        base = session.length
        for start, chunk in split_into_passes(base, token_ids, self.verify_rows):
            inputs = step_inputs(start, chunk, session.blocks, self.max_blocks, self.verify_rows)
            outputs = self.traces.run(trace, step_host_tensors(self.ttnn, inputs, self.verify_rows))
            session.length = start + len(chunk)
            yield outputs, start - base, len(chunk)

    # Readers of a replay's outputs: the given rows of the step's ROWS.

    def _logits(self, outputs, rows: slice) -> torch.Tensor:
        return self.ttnn.to_torch(outputs["logits"])[0, 0, rows, : self.info.vocab_size].float()  # [n, vocab]

    def _argmax(self, outputs, rows: slice) -> list[int]:
        return self.ttnn.to_torch(outputs["argmax"]).reshape(-1)[rows].tolist()

    def _candidates(self, outputs, rows: slice) -> torch.Tensor:
        """[n, vocab] logits rebuilt from the rows' top candidates, the only part read back."""
        values, indices = (self.ttnn.to_torch(outputs[k])[0, 0, rows] for k in ("top_values", "top_indices"))
        return logits_from_candidates(values, indices, self.info.vocab_size)

    def _prefill(self, session: TtSession, token_ids: list[int], num_logits: int) -> torch.Tensor:
        padded = prefill_length(len(token_ids), self.info.max_seq_len)
        blocks = blocks_written_by_prefill(len(token_ids), session.blocks, BLOCK_SIZE)
        host = prefill_host_tensors(self.ttnn, token_ids, padded, blocks)
        tokens, page_table = (self.ttnn.to_device(host[k], self.owner.device) for k in ("tokens", "page_table"))
        logits, first = self.model.prefill(
            tokens, len(token_ids), page_table, len(blocks) * BLOCK_SIZE, max(num_logits, 1)
        )
        session.length = len(token_ids)
        if num_logits == 0:
            return torch.empty((0, self.info.vocab_size))
        rows = self.ttnn.to_torch(logits).float()[0, 0]  # [32 t, vocab], row 0 = position `first`
        end = len(token_ids) - first
        return rows[end - num_logits : end, : self.info.vocab_size]
