"""How many tokens to draft in the next step (k): fixed, or adapted to the session and the load.

The adaptive rule picks k in 0..max_k for the most tokens per second of the session's steps,

    tau(k) / T(k),   tau(k) = (1 - a^(k+1)) / (1 - a),
    T(k) = k (N / s_d) T_draft(s_d) + (N / s_t) T_target(s_t (k + 1)) + O,   T(0) = T_target(N) + O

where a is the probability that a proposal is accepted (each independently, until the first
rejection: then a step emits tau(k) tokens on average), N the sessions open on the target now, T_x(r)
what a pass of r rows costs on service x (load.py: measured from every response, every session),
and O the step's time outside the passes. Everyone at the load is assumed to choose like this
session. Plain decodes step together, one pass of N rows per token; speculating sessions drift
apart, so a round of every session's step takes N / s passes of s sessions each, where s_t and
s_d are the sessions that speculative passes have really shared (N until measured). As the load
grows, verifying k + 1 rows per session costs more, and k = 0 (plain decode) wins when
speculation cannot pay. With overlap, drafting hides behind verifying: the max instead of the sum.
Speculation must beat plain decoding by SPECULATION_MARGIN on these numbers: its costs are
measured while the draft shares caches (and, on one host, cores) with the target, and the draft's
own prefill is in none of them.
a is estimated as accepted / (accepted + rejections) over recent steps, the maximum-likelihood
estimate under that model (a step accepted whole has no rejection). Until a plain decode has been
measured at the current load the policy takes k = 0 (that pass is what every k is weighed against,
and guessing it from bigger passes flatters speculation); then, until the draft's cost is known,
the requested k.
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
    if k == 0:
        return load.target.seconds(n) + load.overhead
    s_t, s_d = (min(costs.shared or n, n) for costs in (load.target, load.draft))
    verify = n / s_t * load.target.seconds(s_t * (k + 1))
    drafting = k * n / s_d * load.draft.seconds(s_d)
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
        if not self.load.target.measured(self.load.sessions):
            return 0  # first measure a plain decode at this load: the baseline every k is weighed against
        if not self.load.draft.known:
            return self.initial_k  # then what drafting costs
        return best_draft_length(self.acceptance, self.max_k, self.load, self.overlap)

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        self.accepted = DECAY * self.accepted + accepted
        self.rejected = DECAY * self.rejected + (accepted < proposed)
