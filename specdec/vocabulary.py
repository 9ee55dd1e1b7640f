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
    """16 hex digits of SHA-256 over the (id, token) pairs in id order."""
    pairs = sorted((index, token) for token, index in tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def model_fingerprint(model: str | Path) -> str:
    """The fingerprint of a model's tokenizer (a registered name, an HF directory or a .gguf
    file); empty when the model has no tokenizer to read (weights only): nothing to compare."""
    try:
        from transformers import AutoTokenizer

        from specdec.engine.loading import resolve_tokenizer_dir

        return fingerprint(AutoTokenizer.from_pretrained(resolve_tokenizer_dir(model)))
    except Exception as e:  # noqa: BLE001 (no tokenizer files, or files transformers cannot read: no reason to stop)
        log.warning("no tokenizer fingerprint for %s (%s): replicas are matched by vocabulary size only", model, e)
        return ""
