"""A draft without a model: prompt lookup (n-gram) proposals, as vLLM's ngram proposer, llama.cpp's
lookup decoding and Hugging Face's prompt_lookup_num_tokens offer.

The next token after a session's tokens (prompt and output so far) is the one that followed the
most recent earlier occurrence of its last n tokens, for the largest n in [min_n, max_n] that
occurs before. The proposals after it copy on from that occurrence, token by token, and stop
where the copy reaches the tokens the command brought (never copying the draft's own proposals):
up to k proposals, fewer where the copy runs out, none when nothing matches (that step is a plain
target decode). So k follows the match length. Code edits, summaries and anything that copies
from its prompt match long runs.

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
from specdec.engine.loading import resolve_tokenizer_dir

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
        # The copy under way: the position of the token last proposed from, the position the copy
        # stops at (where the command's tokens ended), and the (position, token) of that proposal,
        # which a chunk feeding it back writes.
        self.source, self.anchor, self.proposed_at = 0, 0, None

    def write(self, position: int, token_ids: list[int]) -> None:
        del self.tokens[position:]
        for token in token_ids:
            self.tokens.append(token)
            end = len(self.tokens)
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self.starts.setdefault(tuple(self.tokens[end - n :]), []).append(end - n)

    def find(self, length: int) -> int | None:
        """The position of the token lookup(tokens[:length]) answers, in a few dict probes."""
        tokens = self.tokens
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = tokens[length - n : length]
            for start in reversed(self.starts.get(tuple(suffix), ())):
                if start + n < length and tokens[start : start + n] == suffix:  # earlier, and not stale
                    return start + n
        return None

    def lookup(self, length: int) -> int | None:
        found = self.find(length)
        return None if found is None else self.tokens[found]

    def next_proposal(self, position: int, written: list[int]) -> tuple[int, bool] | None:
        """After `written` was cached at `position`: (the next proposal, whether it is the last
        the copy has), or None when there is none."""
        if self.proposed_at == (position, written):  # the last proposal fed back: copy on
            source = self.source + 1
        else:  # a command's tokens: a new match, copying up to where they end
            source, self.anchor = self.find(len(self.tokens)), len(self.tokens)
        self.proposed_at = None
        if source is None or source >= self.anchor:
            return None
        self.source, self.proposed_at = source, (len(self.tokens), [self.tokens[source]])
        return self.tokens[source], source + 1 >= self.anchor


class NgramEngine(Engine):
    def __init__(self, info: ModelInfo, max_positions: int, min_n: int = MIN_N, max_n: int = MAX_N):
        self.info = info
        self.pool = BlockPool(-(-max_positions // BLOCK_SIZE), BLOCK_SIZE)
        self.min_n, self.max_n = min_n, max_n
        self.sessions: dict[int, SessionTokens] = {}  # by id(session)

    @classmethod
    def load(cls, model: str | Path, max_seq_len: int, max_sessions: int) -> "NgramEngine":
        """Proposes in `model`'s vocabulary (its config only: no weights are read)."""
        config = ModelConfig.from_model_dir(resolve_tokenizer_dir(model))  # a .gguf: its metadata only
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
            position = session.length  # where the session was rolled back to
            tokens.write(position, chunk.token_ids)
            session.length += len(chunk.token_ids)
            if chunk.num_outputs == 0:
                empty = torch.empty(0, self.info.vocab_size)
                results.append(ChunkResult([], None) if chunk.sampling.greedy else ChunkResult(None, empty))
                continue
            assert chunk.num_outputs == 1, "a draft asks for the next token only"
            proposal = tokens.next_proposal(position, chunk.token_ids)
            pick, last = proposal if proposal else (0, True)  # no proposal: the pick is never used
            if chunk.sampling.greedy:
                result = ChunkResult([pick], None)
            else:
                result = ChunkResult(None, torch.full((1, self.info.vocab_size), float("-inf")))
                result.logits[0, pick] = 0.0
            result.exhausted, result.last = proposal is None, last
            results.append(result)
        return results
