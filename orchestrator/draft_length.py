"""How many tokens to draft in the next step (k): fixed, or adapted to how the session is going.

The adaptive rule maximises the expected tokens per second of a step,

    tau(k) / T(k),   tau(k) = (1 - a^(k+1)) / (1 - a),   T(k) = T_verify(k) + k T_draft

where a is the probability that a proposal is accepted (each independently, until the first
rejection: then a step emits tau(k) tokens on average) and T(k) a step's time when drafting and
verifying take turns (max(T_verify, k T_draft) when they overlap). a is estimated as
accepted / (accepted + rejections) over recent steps, the maximum-likelihood estimate under that
model (a step accepted whole has no rejection); the costs are the session's own measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRIOR_ACCEPTANCE = 0.7  # before any evidence; weighed as PRIOR_STEPS steps
PRIOR_STEPS = 2.0
DECAY = 0.9  # weight of the past per step: about the last ten steps count


def expected_tokens(acceptance: float, k: int) -> float:
    """tau(k): expected tokens one step emits (accepted proposals plus the target's own)."""
    if acceptance >= 1.0:
        return k + 1.0
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


@dataclass
class FixedDraftLength:
    k: int

    def next(self) -> int:
        return self.k

    def update(self, proposed: int, accepted: int, draft_seconds: float | None, verify_seconds: float) -> None:
        pass


@dataclass
class AdaptiveDraftLength:
    max_k: int
    initial_k: int
    overlap: bool = False
    accepted: float = PRIOR_ACCEPTANCE * PRIOR_STEPS  # decayed counts
    rejected: float = (1 - PRIOR_ACCEPTANCE) * PRIOR_STEPS
    draft_seconds: float | None = None  # per proposed token, moving average
    verify_seconds: dict[int, float] = field(default_factory=dict)  # per k, moving average

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def step_seconds(self, k: int) -> float:
        known = self.verify_seconds
        verify = known.get(k, sum(known.values()) / len(known))  # an untried k: assume the average
        drafting = k * self.draft_seconds
        return max(verify, drafting) if self.overlap else verify + drafting

    def next(self) -> int:
        if self.draft_seconds is None or not self.verify_seconds:
            return self.initial_k
        a = self.acceptance
        return max(range(1, self.max_k + 1), key=lambda k: expected_tokens(a, k) / self.step_seconds(k))

    def update(self, proposed: int, accepted: int, draft_seconds: float | None, verify_seconds: float) -> None:
        """draft_seconds: None when the proposals were drafted ahead, during the previous verify."""
        if proposed == 0:
            return
        self.accepted = DECAY * self.accepted + accepted
        self.rejected = DECAY * self.rejected + (accepted < proposed)
        if draft_seconds is not None:
            per_token = draft_seconds / proposed
            self.draft_seconds = per_token if self.draft_seconds is None else _average(self.draft_seconds, per_token)
        previous = self.verify_seconds.get(proposed)
        self.verify_seconds[proposed] = verify_seconds if previous is None else _average(previous, verify_seconds)


def _average(old: float, new: float) -> float:
    return DECAY * old + (1 - DECAY) * new
