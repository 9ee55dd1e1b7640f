"""Tokens to streamed text: UTF-8 safe deltas, stop strings cut out, nothing shown that a stop
string might still claim."""

from __future__ import annotations

# Decoding output tokens after a few prompt tokens keeps tokenizers that drop a leading space at
# the start of a text (SentencePiece) from dropping the first output token's space.
PROMPT_CONTEXT_TOKENS = 6


class TextStream:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # Incremental decoding (as TGI and vLLM do): text is final once a token no longer changes
        # how the tokens before it decode, e.g. after a multi-byte character is complete.
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        # A stop string can straddle steps, so the last len(longest) - 1 characters wait.
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # output text so far, stop string excluded
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False

    def add(self, token_id: int) -> bool:
        """Appends one output token; returns True when it completes a stop string."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            searched_from = max(0, len(self.text) - self.hold_back)
            self.text += after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            hits = [i for i in (self.text.find(s, searched_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
        return self.stopped

    def take(self, final: bool = False) -> str:
        """The text that is safe to show now; everything that is left when final."""
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold_back)
        delta, self.sent = self.text[self.sent : end], end
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
