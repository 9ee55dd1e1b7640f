"""What crosses from the device when sampling: a row's top logits, not the whole row.

A step's logits row is vocabulary-wide (128k to 152k entries). When a request's top-k is at most
CANDIDATES, its processed distribution lives on the row's CANDIDATES largest logits, so the step
also runs a top-k on the device and the host reads [ROWS, CANDIDATES] values and indices. The
host rebuilds a vocabulary-wide row with -inf elsewhere and processes it exactly as the torch
backend does (temperature, top-k, top-p), so q and p are the same distributions. Requests
without a top-k (or above CANDIDATES) read the whole row.

Sampling stays on the host: the draft's token must be drawn from exactly the q it sends, with
the session's seeded generator, and a device sampler (ttnn.sampling) draws from its own bf16
softmax with a seed fixed at trace capture.
"""

from __future__ import annotations

import math

import torch

from specdec.sampling import SamplingParams

CANDIDATES = 32  # ttnn.sampling's own top-k limit; ttnn.topk runs multi-core for k <= 64


def samples_from_candidates(params: SamplingParams) -> bool:
    return not params.greedy and 0 < params.top_k <= CANDIDATES


def logits_from_candidates(values: torch.Tensor, indices: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[n, C] top values and their token ids -> [n, vocab_size] float32 logits, -inf elsewhere.
    Ids past the vocabulary (a tile-padded LM head's columns) are dropped."""
    indices = indices.long()
    width = max(vocab_size, int(indices.max()) + 1) if indices.numel() else vocab_size
    rows = torch.full((values.shape[0], width), -math.inf)
    return rows.scatter_(1, indices, values.float())[:, :vocab_size]
