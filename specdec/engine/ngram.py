"""A draft without a model: prompt lookup (n-gram) proposals, as vLLM's ngram proposer, llama.cpp's
lookup decoding and Hugging Face's prompt_lookup_num_tokens offer.

The next token after a session's tokens (prompt and output so far) is the one that followed the
most recent earlier occurrence of its last n tokens, for the largest n in [min_n, max_n] that
occurs before. Each proposal is fed back like a model draft's, so the next lookup usually goes on
along the same match, and drafting stops where the match ends (fewer than k proposals, none when
nothing matches: that step is a plain target decode). So k follows the match length. Code edits,
summaries and anything that copies from its prompt match long runs.

As an engine its "KV" is each session's tokens by position, so rollback, batching, drafting one
token per pass and the session protocol are the model draft's. A greedy chunk gets the token; a
sampled one gets logits that are 0 at the token and -inf elsewhere, so whatever the sampling
settings the draft's q is one-hot: rejection sampling accepts the token with probability p(token)
and otherwise samples from p without it, which is exact.
"""

from __future__ import annotations

from pathlib import Path

import torch

from specdec.engine.base import Chunk, ChunkResult, Engine, KVSession, ModelInfo
from specdec.engine.blocks import BlockPool
from specdec.engine.config import ModelConfig
from specdec.engine.loading import resolve_model_dir

BLOCK_SIZE = 64  # positions are only bookkeeping here: the pool bounds sessions x length
# A single repeated token is weak evidence (it repeats by chance in any text); two or more start a
# match worth a verify row.
MIN_N, MAX_N = 2, 4


def lookup(tokens: list[int], min_n: int = MIN_N, max_n: int = MAX_N) -> int | None:
    """The rule, by a scan (SessionTokens answers it from an index): the token that followed the most recent earlier occurrence of the longest suffix of
    `tokens` of min_n..max_n tokens; None when no such suffix occurred before."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # the suffix itself starts at len - n
            if tokens[start : start + n] == suffix:
                return tokens[start + n]
    return None


class SessionTokens:
    """One session's tokens by position, and where each n-gram starts, so a lookup costs a dict
    probe, not a scan of the sequence. Rolled-back positions leave stale starts behind; a lookup
    checks a start still holds its n-gram before it trusts it."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self.starts: dict[tuple[int, ...], list[int]] = {}

    def write(self, position: int, token_ids: list[int]) -> None:
        del self.tokens[position:]
        for token in token_ids:
            self.tokens.append(token)
            end = len(self.tokens)
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self.starts.setdefault(tuple(self.tokens[end - n :]), []).append(end - n)

    def lookup(self, length: int) -> int | None:
        """lookup(tokens[:length]) in a few dict probes."""
        tokens = self.tokens
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = tokens[length - n : length]
            for start in reversed(self.starts.get(tuple(suffix), ())):
                if start + n < length and tokens[start : start + n] == suffix:  # earlier, and not stale
                    return tokens[start + n]
        return None


class NgramEngine(Engine):
    def __init__(self, info: ModelInfo, max_positions: int, min_n: int = MIN_N, max_n: int = MAX_N):
        self.info = info
        self.pool = BlockPool(-(-max_positions // BLOCK_SIZE), BLOCK_SIZE)
        self.min_n, self.max_n = min_n, max_n
        self.sessions: dict[int, SessionTokens] = {}  # by id(session)

    @classmethod
    def load(cls, model: str | Path, max_seq_len: int, max_sessions: int) -> "NgramEngine":
        """Proposes in `model`'s vocabulary (its config only: no weights are read)."""
        config = ModelConfig.from_model_dir(resolve_model_dir(model))
        length = min(max_seq_len, config.max_position_embeddings) if max_seq_len else config.max_position_embeddings
        info = ModelInfo(
            name=f"ngram:{Path(str(model)).name}", family=config.family, vocab_size=config.vocab_size,
            max_seq_len=length, eos_token_ids=config.eos_token_ids, dtype="none", device="none", backend="ngram",
        )  # fmt: skip
        return cls(info, max_sessions * length)

    def new_session(self, capacity: int) -> KVSession:
        session = super().new_session(capacity)
        self.sessions[id(session)] = SessionTokens(self.min_n, self.max_n)
        return session

    def end_session(self, session: KVSession) -> None:
        self.sessions.pop(id(session), None)
        super().end_session(session)

    def run(self, chunks: list[Chunk]) -> list[ChunkResult]:
        results = []
        for chunk in chunks:
            session = chunk.session
            tokens = self.sessions[id(session)]
            tokens.write(session.length, chunk.token_ids)  # from where the session was rolled back to
            session.length += len(chunk.token_ids)
            found = [tokens.lookup(session.length - i) for i in reversed(range(chunk.num_outputs))]
            exhausted = bool(found) and found[-1] is None
            picks = [tokens.tokens[0] if token is None else token for token in found]  # None: never used
            if chunk.sampling.greedy:
                results.append(ChunkResult(picks, None, exhausted))
            else:
                logits = torch.full((len(picks), self.info.vocab_size), float("-inf"))
                logits[torch.arange(len(picks)), torch.tensor(picks, dtype=torch.long)] = 0.0
                results.append(ChunkResult(None, logits, exhausted))
        return results
