"""What a draft or target replica must serve for this orchestrator to use it: a pure check of its
GetInfo against what the orchestrator needs, run on every answer of every replica (replicas.py).

Token ids mean text only through a tokenizer, so every replica must share the orchestrator's
(the fingerprint, specdec/vocabulary.py), and have the vocabulary size the first target had
(probability rows are that wide, draft and target alike). The first target also sets how large a
block requests may carry, and the first draft may lower it: every later target must verify blocks
that large (a draft with a smaller limit is asked for fewer tokens: clients.py). A replica that
fails is never used while it does; a rolling update of the target to another model with the same
tokenizer passes.
"""

from __future__ import annotations

from dataclasses import dataclass

from specdec.v1 import session_pb2


@dataclass
class Requirements:
    tokenizer_fingerprint: str  # empty: the orchestrator's tokenizer could not be fingerprinted
    tokenizer_size: int  # ids the tokenizer may produce
    vocab_size: int | None = None  # the first compatible target's, once it has answered
    max_draft_tokens: int = 0  # the largest block requests may carry (0 until the first target answers)

    def problem(self, role: str, info: session_pb2.ServiceInfo) -> str | None:
        """Why a replica that answered `info` cannot serve `role` sessions here, or None."""
        if info.role != role:
            return f"it is a {info.role or 'unknown'} service, not a {role} service"
        if (
            self.tokenizer_fingerprint
            and info.tokenizer_fingerprint
            and info.tokenizer_fingerprint != self.tokenizer_fingerprint
        ):
            return (
                f"its model {info.model_name} has another tokenizer (fingerprint {info.tokenizer_fingerprint}, "
                f"the orchestrator's is {self.tokenizer_fingerprint})"
            )
        if info.vocab_size < self.tokenizer_size:
            return f"its vocabulary ({info.vocab_size}) is smaller than the tokenizer's ({self.tokenizer_size})"
        if self.vocab_size is not None and info.vocab_size != self.vocab_size:
            return f"its vocabulary ({info.vocab_size}) differs from the target's ({self.vocab_size})"
        if role == "target" and info.max_draft_tokens < self.max_draft_tokens:
            return f"it takes blocks of up to {info.max_draft_tokens} tokens; requests may carry {self.max_draft_tokens}"
        return None
