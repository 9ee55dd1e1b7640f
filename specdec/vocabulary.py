"""A model's vocabulary identity: what must agree between the orchestrator's tokenizer and every
draft and target replica for token ids to mean the same text.

The fingerprint hashes every token string at its id (added tokens included), so two models share
it exactly when their tokenizers map ids to the same strings: the Qwen2.5-Coder 0.5B and 1.5B
do, SmolLM2 and Qwen do not. The vocabulary size alone cannot tell those apart when the
embedding tables happen to have the same number of rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def fingerprint(tokenizer) -> str:
    """A transformers tokenizer's fingerprint: 16 hex digits of SHA-256 over its (id, token)
    pairs in id order."""
    return vocabulary_fingerprint(tokenizer.get_vocab())


def vocabulary_fingerprint(vocab: dict[str, int]) -> str:
    pairs = sorted((index, token) for token, index in vocab.items())
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def model_fingerprint(model: str | Path) -> str:
    """The fingerprint of a model's tokenizer (a registered name, an HF directory or a .gguf
    file); empty when the model has no tokenizer to read (weights only): nothing to compare."""
    try:
        from specdec.engine.loading import resolve_tokenizer_dir

        directory = resolve_tokenizer_dir(model)
        if (directory / "tokenizer.json").is_file():  # what a fast tokenizer's get_vocab reads, without transformers
            from tokenizers import Tokenizer  # (a 2 s import and load less at start-up)

            return vocabulary_fingerprint(Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab(True))
        from transformers import AutoTokenizer

        return fingerprint(AutoTokenizer.from_pretrained(directory))
    except Exception as e:  # noqa: BLE001 (no tokenizer files, or files transformers cannot read: no reason to stop)
        log.warning("no tokenizer fingerprint for %s (%s): replicas are matched by vocabulary size only", model, e)
        return ""
