"""The engine interface both services run: batched forward passes over many sessions' KV caches.

A backend implements four things: open a session (borrow room in its KV pool), run one forward
pass over a batch of chunks (each a session's new tokens at that session's end), end a session
(give its room back), and report its model and pool. It never sees a command: proposing k tokens
and scoring a block are jobs the service's scheduler (specdec/serving/) drives one pass at a time,
with every waiting session's chunk in the same pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from specdec.engine.blocks import BlockPool
from specdec.errors import InvalidArgument
from specdec.sampling import SamplingParams


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    vocab_size: int
    max_seq_len: int
    eos_token_ids: tuple[int, ...]
    dtype: str
    device: str
    backend: str


class KVSession:
    """Position bookkeeping of one session's KV cache: the pool blocks it borrowed and how many
    positions are valid.

    `length` is the number of positions whose KV is valid. Rollback is `truncate`: it only moves
    the length, and later writes overwrite what lay beyond it.
    """

    def __init__(self, capacity: int, blocks: list[int]):
        self.capacity = capacity
        self.blocks = blocks
        self.length = 0

    def truncate(self, position: int, field: str = "start_position") -> int:
        """Keeps positions [0, position); returns how many were rolled back."""
        if not 0 <= position <= self.length:
            raise InvalidArgument(field, f"{position} is beyond the {self.length} cached positions")
        rolled_back = self.length - position
        self.length = position
        return rolled_back

    def check_room(self, num_positions: int, field: str = "token_ids") -> None:
        if self.length + num_positions > self.capacity:
            raise InvalidArgument(
                field,
                f"writing {num_positions} positions after {self.length} exceeds the session capacity {self.capacity}",
            )


def is_prefill(start_position: int) -> bool:
    """A session's first command starts at position 0 and caches its prompt: its prefill. The one
    test of "is this the prefill", for spans, metrics and device paths alike."""
    return start_position == 0


@dataclass
class Chunk:
    """One session's part of a forward pass: token_ids written at positions session.length, ...,
    and the next-token output after each of the last num_outputs of them."""

    session: KVSession
    token_ids: list[int]  # [n]
    num_outputs: int  # 0..n
    sampling: SamplingParams  # greedy: argmax ids come back; else logits (a device may trim them)

    def __post_init__(self):
        assert self.token_ids and 0 <= self.num_outputs <= len(self.token_ids), (
            f"a chunk carries >= 1 token and at most that many outputs, got {len(self.token_ids)} / {self.num_outputs}"
        )


@dataclass
class ChunkResult:
    argmax: list[int] | None  # [num_outputs], greedy chunks
    logits: torch.Tensor | None  # [num_outputs, vocab] on the CPU, sampled chunks (a device may send -inf
    # outside the candidates the sampling settings can pick)
    # A draft that runs out (n-gram: where its match ends): no proposal from this chunk, or this
    # chunk's is the last one it has.
    exhausted: bool = False
    last: bool = False


@dataclass(frozen=True)
class KVUsage:
    block_size: int  # positions per block
    total_blocks: int
    used_blocks: int


class Engine(ABC):
    """A model on one device with one KV pool for every session."""

    info: ModelInfo
    pool: BlockPool

    @abstractmethod
    def run(self, chunks: list[Chunk]) -> list[ChunkResult]:
        """One forward pass over every chunk (a session appears at most once). Writes each chunk's
        KV and advances its session's length; returns one result per chunk, in order."""

    def new_session(self, capacity: int) -> KVSession:
        """Borrows blocks for `capacity` positions; ResourceExhausted when the pool is short."""
        return KVSession(capacity, self.pool.allocate(self.session_positions(capacity)))

    def end_session(self, session: KVSession) -> None:
        """Returns the session's blocks. Called between passes, once its stream ended."""
        blocks, session.blocks = session.blocks, []
        self.pool.release(blocks)

    def session_positions(self, capacity: int) -> int:
        """Positions a session of `capacity` occupies in the pool (a backend may round up)."""
        return capacity

    def kv_usage(self) -> KVUsage:
        return KVUsage(self.pool.block_size, self.pool.num_blocks, self.pool.num_blocks - self.pool.free_blocks)

    def close(self) -> None:
        """Releases the device (traces, the device itself) at shutdown."""
        return None


def forward_one(engine: Engine, session: KVSession, token_ids: list[int], num_outputs: int,
                sampling: SamplingParams | None = None) -> ChunkResult:  # fmt: skip
    """A pass with one chunk: what tests and tools call when they want one session's logits."""
    return engine.run([Chunk(session, token_ids, num_outputs, sampling or SamplingParams(temperature=1.0))])[0]
