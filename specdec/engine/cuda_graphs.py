"""Decode-shaped passes as CUDA graphs: captured per bucket at start-up, replayed per pass.

A pass whose chunks are all short (draft tokens, verify blocks: at most `max_rows` rows each) is
padded to a bucket (sessions, rows per session, keys) and replays the graph captured for that
bucket; any other pass (one with a prompt piece) runs eagerly. Padding rows write their K/V into
a scratch block no session owns and attend to its first slot; padding sessions read only it. The
graph covers the decoder (hidden states out, small); the LM head then runs on the wanted rows.

Without a GPU the same buckets run eagerly (capture=False): that is how the padding is tested.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from specdec.engine.base import Chunk
from specdec.engine.torch_batch import AttentionGroup, KVPool, PassLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Bucket:
    sessions: int
    rows: int  # per session
    keys: int  # positions every session's keys are read over


def powers_of_two_up_to(limit: int, start: int = 1) -> list[int]:
    out = [start]
    while out[-1] < limit:
        out.append(out[-1] * 2)
    return out


def buckets(max_sessions: int, max_rows: int, max_seq_len: int) -> list[Bucket]:
    return [
        Bucket(b, q, keys)
        for b in powers_of_two_up_to(max_sessions)
        for q in sorted({1, max_rows})
        for keys in powers_of_two_up_to(max_seq_len, start=min(128, max_seq_len))
    ]


def padded_inputs(chunks: list[Chunk], bucket: Bucket, block_size: int, scratch_slot: int) -> dict[str, torch.Tensor]:
    """The bucket's input buffers for these chunks, on the host, and the rows to read after."""
    b, q, keys = bucket.sessions, bucket.rows, bucket.keys
    tokens = torch.zeros(b * q, dtype=torch.long)
    positions = torch.zeros(b * q, dtype=torch.long)
    slots = torch.full((b * q,), scratch_slot, dtype=torch.long)
    query_positions = torch.zeros((b, q), dtype=torch.long)
    key_slots = torch.full((b, keys), scratch_slot, dtype=torch.long)
    output_rows = []
    p = torch.arange(keys)
    for i, chunk in enumerate(chunks):
        s, n = chunk.session, len(chunk.token_ids)
        first = i * q
        rows = slice(first, first + n)
        tokens[rows] = torch.tensor(chunk.token_ids)
        positions[rows] = torch.arange(s.length, s.length + n)
        query_positions[i, :n] = positions[rows]
        table = torch.tensor(s.blocks)
        table = table[torch.clamp(p // block_size, max=len(s.blocks) - 1)]  # past its blocks: its last one
        key_slots[i] = table * block_size + p % block_size
        slots[rows] = key_slots[i, positions[rows]]
        output_rows += range(first + n - chunk.num_outputs, first + n)
    return {
        "token_ids": tokens, "positions": positions, "slots": slots, "query_positions": query_positions,
        "key_slots": key_slots, "output_rows": torch.tensor(output_rows, dtype=torch.long),
    }  # fmt: skip


@dataclass
class _Captured:
    layout: PassLayout  # the static input buffers
    hidden: torch.Tensor | None = None  # the static output, [sessions * rows, hidden]
    graph: object = None  # torch.cuda.CUDAGraph; None: run eagerly


class CudaGraphs:
    def __init__(self, model, kv: KVPool, scratch_block: int, max_sessions: int, max_rows: int,
                 device: torch.device, capture: bool = True):  # fmt: skip
        self.model, self.kv, self.device = model, kv, device
        self.scratch_slot = scratch_block * kv.block_size
        self.max_rows = max_rows
        self.buckets = buckets(max_sessions, max_rows, model.max_seq_len)
        self.captured: dict[Bucket, _Captured] = {}
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle() if capture else None
        for bucket in sorted(self.buckets, reverse=True):  # the largest first: the smaller reuse its memory
            self.captured[bucket] = self._capture(bucket, pool) if capture else _Captured(self._static(bucket))
        if capture:
            log.info("captured %d CUDA graphs in %.1f s", len(self.captured), time.perf_counter() - start)

    def bucket_for(self, chunks: list[Chunk]) -> Bucket | None:
        """The smallest bucket that holds the pass, or None (a long chunk, too many sessions)."""
        rows = max(len(c.token_ids) for c in chunks)
        end = max(c.session.length + len(c.token_ids) for c in chunks)
        fits = [b for b in self.buckets if b.sessions >= len(chunks) and b.rows >= rows and b.keys >= end]
        return min(fits, key=lambda b: (b.sessions * b.rows, b.keys)) if fits else None

    def run(self, chunks: list[Chunk], bucket: Bucket) -> torch.Tensor:
        """Hidden states of the chunks' wanted rows, in order: [num_outputs, hidden]."""
        captured = self.captured[bucket]
        host = padded_inputs(chunks, bucket, self.kv.block_size, self.scratch_slot)
        layout, group = captured.layout, captured.layout.groups[0]
        for target, name in ((layout.token_ids, "token_ids"), (layout.positions, "positions"),
                             (layout.slots, "slots"), (group.query_positions, "query_positions"),
                             (group.key_slots, "key_slots")):  # fmt: skip
            target.copy_(host[name], non_blocking=True)
        if captured.graph is None:
            hidden = self.model.hidden(layout, self.kv)
        else:
            captured.graph.replay()
            hidden = captured.hidden
        return hidden[host["output_rows"].to(self.device)]

    def _static(self, bucket: Bucket) -> PassLayout:
        """Input buffers holding an all-padding pass (every row at the scratch slot)."""
        host = padded_inputs([], bucket, self.kv.block_size, self.scratch_slot)
        t = {k: v.to(self.device) for k, v in host.items()}
        group = AttentionGroup(slice(0, bucket.sessions * bucket.rows), t["query_positions"], t["key_slots"], None,
                               bucket.sessions, bucket.rows, bucket.keys)  # fmt: skip
        return PassLayout(t["token_ids"], t["positions"], t["slots"], [group], None)

    def _capture(self, bucket: Bucket, pool) -> _Captured:
        captured = _Captured(self._static(bucket))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm-up runs build the kernels and the allocator's state
                self.model.hidden(captured.layout, self.kv)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool), torch.inference_mode():
            captured.hidden = self.model.hidden(captured.layout, self.kv)
        captured.graph = graph
        return captured
