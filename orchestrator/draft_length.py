"""How many tokens to draft in the next step (k): fixed, or adapted to the session and the load.

The adaptive rule picks k in 0..max_k for the most tokens per second of the session's steps,

    tau(k) / T(k),   tau(k) = (1 - a^(k+1)) / (1 - a),
    T(k) = k T_draft(N) + T_target(N (k + 1)) + O,   T(0) = T_target(N) + O

where a is the probability that a proposal is accepted (each independently, until the first
rejection: then a step emits tau(k) tokens on average), N the sessions sharing a pass now, T_x(r)
what a pass of r rows costs on service x at this load (load.py: measured from every response,
every session), and O the step's time outside the passes. Everyone at the load is assumed to
choose like this session, so a verify pass carries N (k + 1) rows: as the batch grows, verifying
k + 1 rows per session costs more, and k = 0 (plain decode) wins when speculation cannot pay.
With overlap, drafting hides behind verifying: max(k T_draft, T_target) instead of their sum.
Speculation must beat plain decoding by SPECULATION_MARGIN on these numbers: its costs are
measured while the draft shares caches (and, on one host, cores) with the target, and the draft's
own prefill is in none of them.
a is estimated as accepted / (accepted + rejections) over recent steps, the maximum-likelihood
estimate under that model (a step accepted whole has no rejection).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.load import Load

PRIOR_ACCEPTANCE = 0.7  # before any evidence; weighed as PRIOR_STEPS steps
PRIOR_STEPS = 2.0
DECAY = 0.9  # weight of the past per step: about the last ten steps count
SPECULATION_MARGIN = 1.1


def expected_tokens(acceptance: float, k: int) -> float:
    """tau(k): expected tokens one step emits (accepted proposals plus the target's own)."""
    if acceptance >= 1.0:
        return k + 1.0
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def step_seconds(k: int, load: Load, overlap: bool) -> float:
    n = load.sessions
    verify = load.target.seconds(n * (k + 1))
    if k == 0:
        return verify + load.overhead
    drafting = k * load.draft.seconds(n)
    return (max(verify, drafting) if overlap else verify + drafting) + load.overhead


def best_draft_length(acceptance: float, max_k: int, load: Load, overlap: bool = False) -> int:
    """The k in 0..max_k with the most expected tokens per second at this load; 0 unless the
    best k > 0 beats it by SPECULATION_MARGIN."""
    rate = {k: expected_tokens(acceptance, k) / step_seconds(k, load, overlap) for k in range(max_k + 1)}
    best = max(range(1, max_k + 1), key=rate.__getitem__, default=0)
    return best if best and rate[best] >= SPECULATION_MARGIN * rate[0] else 0


@dataclass
class FixedDraftLength:
    k: int

    def next(self) -> int:
        return self.k

    def update(self, proposed: int, accepted: int) -> None:
        pass


@dataclass
class AdaptiveDraftLength:
    max_k: int
    initial_k: int
    load: Load = field(default_factory=Load)
    overlap: bool = False
    accepted: float = PRIOR_ACCEPTANCE * PRIOR_STEPS  # decayed counts
    rejected: float = (1 - PRIOR_ACCEPTANCE) * PRIOR_STEPS

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def next(self) -> int:
        if not (self.load.draft.known and self.load.target.known):
            return self.initial_k  # measure first
        return best_draft_length(self.acceptance, self.max_k, self.load, self.overlap)

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        self.accepted = DECAY * self.accepted + accepted
        self.rejected = DECAY * self.rejected + (accepted < proposed)
