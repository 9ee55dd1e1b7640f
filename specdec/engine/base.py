"""The engine interface both services run, and the steps built on it.

A backend implements three things: open a session (allocate its KV cache), run a forward pass
over new tokens at the session's end, and its model info. Proposing k draft tokens and scoring a
block are written here once, over that forward pass, for every backend; a backend with a faster
native path (a traced self-feeding draft loop on a device) overrides `propose` or `score`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from specdec.errors import InvalidArgument, check_token_ids
from specdec.sampling import Sampler, SamplingParams, wire_probs


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
    """Position bookkeeping of one session's KV cache; backends subclass it to hold the memory.

    `length` is the number of positions whose KV is valid. Rollback is `truncate`: it only moves
    the length, and later writes overwrite what lay beyond it.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
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


@dataclass
class Proposal:
    token_ids: list[int]  # [k]
    probs: torch.Tensor | None  # [k, vocab] wire dtype, None when greedy


@dataclass
class Scores:
    argmax_token_ids: list[int] | None  # [num_scored], greedy only
    probs: torch.Tensor | None  # [num_scored, vocab] wire dtype, sampling only


class Engine(ABC):
    info: ModelInfo

    @abstractmethod
    def new_session(self, capacity: int) -> KVSession:
        """Allocates a KV cache for `capacity` positions."""

    @abstractmethod
    def forward(self, session: KVSession, token_ids: list[int], num_logits: int) -> torch.Tensor:
        """Writes token_ids at positions session.length.. and advances the length; returns the
        logits after the last num_logits of them, [num_logits, vocab]."""

    def end_session(self, session: KVSession) -> None:
        """Returns the session's KV memory. Called on the device thread once its stream ends, so
        no step of it can still be running. Memory a backend frees by garbage collection needs nothing."""
        return None

    def close(self) -> None:
        """Releases the device (traces, the device itself) at shutdown."""
        return None

    def start_proposal(self, session: KVSession, start_position: int, token_ids: list[int], num_tokens: int) -> None:
        """Checks a propose command and rolls the session back to start_position."""
        if num_tokens > 0 and not token_ids:
            raise InvalidArgument("token_ids", "proposing needs at least one token to continue from")
        check_token_ids("token_ids", token_ids, self.info.vocab_size)
        session.truncate(start_position)
        session.check_room(len(token_ids) + max(num_tokens - 1, 0))

    def propose(
        self, session: KVSession, start_position: int, token_ids: list[int], num_tokens: int, sampler: Sampler
    ) -> Proposal:
        """Caches token_ids after rolling back to start_position, then drafts num_tokens tokens,
        feeding each back in. The last proposal is not fed: its KV is written next step, if kept."""
        self.start_proposal(session, start_position, token_ids, num_tokens)
        logits = self.forward(session, token_ids, 1 if num_tokens else 0)  # [1, vocab]
        proposed, rows = [], []
        for i in range(num_tokens):
            token, row = sampler.pick(logits)
            proposed.append(token)
            rows.append(row)
            if i + 1 < num_tokens:
                logits = self.forward(session, [token], 1)
        probs = torch.stack(rows) if rows and rows[0] is not None else None
        return Proposal(proposed, probs)

    def score(
        self, session: KVSession, start_position: int, token_ids: list[int], num_scored: int, params: SamplingParams
    ) -> Scores:
        """Caches token_ids after rolling back to start_position in one forward pass, and returns
        the next-token result after each of the last num_scored positions."""
        if not 1 <= num_scored <= len(token_ids):
            raise InvalidArgument("num_scored", f"must be in [1, {len(token_ids)}] (the tokens sent), got {num_scored}")
        check_token_ids("token_ids", token_ids, self.info.vocab_size)
        session.truncate(start_position)
        session.check_room(len(token_ids))
        if params.greedy:
            return Scores(self.greedy_next(session, token_ids, num_scored), None)
        logits = self.sampling_logits(session, token_ids, num_scored, params)  # [num_scored, vocab]
        return Scores(None, wire_probs(logits, params))

    def sampling_logits(
        self, session: KVSession, token_ids: list[int], num_scored: int, params: SamplingParams
    ) -> torch.Tensor:
        """forward, for a sampled score; a device backend overrides it to bring back only what
        `params` can sample (a top-k's candidates), -inf elsewhere."""
        return self.forward(session, token_ids, num_scored)

    def greedy_next(self, session: KVSession, token_ids: list[int], num_scored: int) -> list[int]:
        """forward + argmax over the last num_scored positions; a device backend overrides it to
        take the argmax on the device and bring back token ids only."""
        return self.forward(session, token_ids, num_scored).argmax(dim=-1).tolist()
