"""Logits to the processed distribution that both the draft and the target use.

Temperature, top-k and top-p are applied to the target's p and the draft's q alike, before
acceptance, so speculative output follows the target's *processed* distribution. The
distributions cross the wire in float16; the draft draws its proposals from exactly the float16
row it sends, so what the orchestrator sees as q is what the draft sampled from.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from specdec.errors import InvalidArgument

WIRE_DTYPE = torch.float16


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> "SamplingParams":
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument("sampling.temperature", f"must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):  # also false for NaN
            raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument("sampling.top_k", f"must be >= 0, got {self.top_k}")
        return self


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[n, vocab] logits -> [n, vocab] float32 probabilities after temperature, top-k, top-p."""
    assert logits.dim() == 2, f"logits must be [n, vocab], got {tuple(logits.shape)}"
    assert not params.greedy, "greedy decoding has no distribution to process"
    scaled = logits.float() / params.temperature
    vocab = scaled.shape[-1]
    if 0 < params.top_k < vocab:
        kth_largest = torch.topk(scaled, params.top_k, dim=-1).values[:, -1:]  # [n, 1]
        scaled = scaled.masked_fill(scaled < kth_largest, -math.inf)
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        # Keep the smallest most-likely set whose mass reaches top_p: drop a token when the mass
        # before it (in descending order) already reaches top_p. The most likely token always stays.
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def wire_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The processed distribution as it crosses the wire: [n, vocab] float16."""
    return processed_probs(logits, params).to(WIRE_DTYPE)


class Sampler:
    """One session's sampling settings and random stream."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))

    def pick(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """[1, vocab] logits -> (token, its wire-precision distribution [vocab], None when greedy)."""
        if self.params.greedy:
            return int(logits[0].argmax()), None
        row = wire_probs(logits, self.params)[0]  # [vocab] float16
        token = torch.multinomial(row.float().cpu(), 1, generator=self.generator)
        return int(token), row
