"""A session's command while the scheduler runs it: the chunks it still needs, one per pass.

- ScoreJob (target): caches its tokens, in prefill-sized chunks, and collects the next-token
  result after each of the last num_scored positions. A verify block is one chunk: one pass.
- ProposeJob (draft): caches its tokens, then drafts k tokens one pass each, feeding each pick
  back in; the last pick is not fed (its KV is written next step, if it is kept).

A job is built on the scheduler's thread, so checking a command and rolling its session back
(truncate) never races a pass. Everything here is host bookkeeping; the engine does the math.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specdec.engine.base import Chunk, ChunkResult, KVSession, is_prefill
from specdec.errors import InvalidArgument, check_token_ids
from specdec.sampling import Sampler, SamplingParams


@dataclass
class PassRecord:
    """What a job saw of the passes it ran in."""

    passes: int = 0
    rows: int = 0  # rows of those passes, every session's, summed
    sessions: int = 0  # sessions in those passes, summed
    device_seconds: float = 0.0
    first_start_ns: int = 0  # wall clock, for the command's span
    last_end_ns: int = 0
    queue_seconds: float = 0.0  # from arrival to the first pass

    def add(
        self, rows: int, sessions: int, seconds: float, start_ns: int, end_ns: int, received: float, started: float
    ):
        if not self.passes:
            self.first_start_ns, self.queue_seconds = start_ns, max(started - received, 0.0)
        self.passes += 1
        self.rows += rows
        self.sessions += sessions
        self.device_seconds += seconds
        self.last_end_ns = end_ns


@dataclass
class Job:
    session: KVSession
    start_position: int
    rolled_back: int  # positions dropped by this command's truncate
    token_ids: list[int]  # to cache
    received: float = field(default_factory=time.perf_counter)
    fed: int = 0  # of token_ids, cached so far
    record: PassRecord = field(default_factory=PassRecord)

    @property
    def prefill(self) -> bool:
        return is_prefill(self.start_position)

    @property
    def done(self) -> bool:
        raise NotImplementedError

    def rows_wanted(self, prefill_chunk: int, block_rows: int) -> int:
        """Rows this job wants in the next pass: a block (at most block_rows) whole, a prompt in
        prefill_chunk pieces."""
        raise NotImplementedError

    def next_chunk(self, rows: int) -> Chunk:
        raise NotImplementedError

    def take(self, result: ChunkResult) -> None:
        raise NotImplementedError


def _feed_rows(job: Job, prefill_chunk: int, block_rows: int) -> int:
    left = len(job.token_ids) - job.fed
    return left if left <= block_rows else min(left, prefill_chunk)


@dataclass
class ScoreJob(Job):
    num_scored: int = 1
    params: SamplingParams = field(default_factory=SamplingParams)
    argmax: list[int] = field(default_factory=list)  # [num_scored], greedy
    logits: list[torch.Tensor] = field(default_factory=list)  # pieces of [num_scored, vocab], sampled

    @classmethod
    def build(cls, session: KVSession, start_position: int, token_ids: list[int], num_scored: int,
              params: SamplingParams, vocab_size: int, received: float) -> "ScoreJob":  # fmt: skip
        if not 1 <= num_scored <= len(token_ids):
            raise InvalidArgument("num_scored", f"must be in [1, {len(token_ids)}] (the tokens sent), got {num_scored}")
        check_token_ids("token_ids", token_ids, vocab_size)
        rolled_back = session.truncate(start_position)
        session.check_room(len(token_ids))
        return cls(session, start_position, rolled_back, list(token_ids), received, num_scored=num_scored,
                   params=params)  # fmt: skip

    @property
    def done(self) -> bool:
        return self.fed == len(self.token_ids)

    def rows_wanted(self, prefill_chunk: int, block_rows: int) -> int:
        return _feed_rows(self, prefill_chunk, block_rows)

    def next_chunk(self, rows: int) -> Chunk:
        first_scored = len(self.token_ids) - self.num_scored
        end = self.fed + rows
        outputs = max(0, end - max(self.fed, first_scored))
        return Chunk(self.session, self.token_ids[self.fed : end], outputs, self.params)

    def take(self, result: ChunkResult) -> None:
        self.fed = self.session.length - self.start_position
        if result.argmax:
            self.argmax += result.argmax
        elif result.logits is not None and result.logits.shape[0]:
            self.logits.append(result.logits)

    def scored_logits(self) -> torch.Tensor:
        return torch.cat(self.logits)  # [num_scored, vocab]


@dataclass
class ProposeJob(Job):
    num_tokens: int = 0  # k
    sampler: Sampler | None = None
    proposed: list[int] = field(default_factory=list)  # [<= k]
    rows: list[torch.Tensor] = field(default_factory=list)  # [<= k] wire-precision q rows, sampled
    exhausted: bool = False  # the engine had nothing more worth proposing: fewer than k proposals

    @classmethod
    def build(cls, session: KVSession, start_position: int, token_ids: list[int], num_tokens: int,
              sampler: Sampler, vocab_size: int, received: float) -> "ProposeJob":  # fmt: skip
        if num_tokens > 0 and not token_ids:
            raise InvalidArgument("token_ids", "proposing needs at least one token to continue from")
        check_token_ids("token_ids", token_ids, vocab_size)
        rolled_back = session.truncate(start_position)
        session.check_room(len(token_ids) + max(num_tokens - 1, 0))
        return cls(session, start_position, rolled_back, list(token_ids), received, num_tokens=num_tokens,
                   sampler=sampler)  # fmt: skip

    @property
    def done(self) -> bool:
        return self.fed == len(self.token_ids) and (len(self.proposed) == self.num_tokens or self.exhausted)

    def rows_wanted(self, prefill_chunk: int, block_rows: int) -> int:
        return _feed_rows(self, prefill_chunk, block_rows) if self.fed < len(self.token_ids) else 1

    def next_chunk(self, rows: int) -> Chunk:
        params = self.sampler.params
        if self.fed < len(self.token_ids):
            end = self.fed + rows
            wants_logits = end == len(self.token_ids) and self.num_tokens > 0
            return Chunk(self.session, self.token_ids[self.fed : end], int(wants_logits), params)
        return Chunk(self.session, self.proposed[-1:], 1, params)  # feed the last pick back

    def take(self, result: ChunkResult) -> None:
        if self.fed < len(self.token_ids):
            self.fed = self.session.length - self.start_position
            if self.fed < len(self.token_ids) or self.num_tokens == 0:
                return
        if result.exhausted:
            self.exhausted = True
            return
        if result.argmax:
            self.proposed.append(result.argmax[0])
        else:
            token, row = self.sampler.pick(result.logits)
            self.proposed.append(token)
            self.rows.append(row)
        self.exhausted = result.last  # the draft has no more: this pick is not fed back

    def probs(self) -> torch.Tensor | None:
        return torch.stack(self.rows) if self.rows else None  # [k, vocab] float16
