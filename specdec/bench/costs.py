"""Step costs, measured inside the services: the spans every request of the run exported.

The target's verify span and the draft's draft span time the work on each device; the
orchestrator's step span times the whole step. What a step spends outside draft, verify and
accept is gRPC and orchestration.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from specdec.tools.otlp_sink import Span


@dataclass
class Costs:
    """Medians, in seconds, for one target dtype."""

    decode: float  # a target pass over one new token (verify with k = 0)
    verify: dict[int, float]  # k -> a target pass over k proposals (k + 1 rows)
    draft_token: float  # one draft token
    prefill_target: float
    samples: dict[str, int] = field(default_factory=dict)

    def c(self) -> float:
        """Draft cost per token over the target's decode cost."""
        return self.draft_token / self.decode

    def verify_cost(self, k: float) -> float:
        """Verify time for k proposals; a fractional k (adaptive) interpolates the measured ones."""
        known = sorted(self.verify)
        if not known:
            return self.decode
        below = [x for x in known if x <= k] or known[:1]
        above = [x for x in known if x >= k] or known[-1:]
        lo, hi = below[-1], above[0]
        if lo == hi:
            return self.verify[lo]
        return self.verify[lo] + (self.verify[hi] - self.verify[lo]) * (k - lo) / (hi - lo)

    def bound_turns(self, tau: float, k: float, token_seconds: float) -> float:
        """Speedup if a step cost only its device time, drafting and verifying in turns.
        token_seconds: what the target alone spends per token, all included."""
        return tau * token_seconds / (self.verify_cost(k) + k * self.draft_token)

    def bound_overlap(self, tau: float, k: float, token_seconds: float) -> float:
        """The same, with drafting hidden entirely behind verification."""
        return tau * token_seconds / max(self.verify_cost(k), k * self.draft_token)

    def draft_replicas_per_target(self, k: float) -> float:
        """Draft replicas that keep one target replica busy at block size k: per step a draft
        works k tokens and the target one verify, whatever the acceptance (which picks k)."""
        return k * self.draft_token / self.verify_cost(k)

    def as_dict(self) -> dict:
        ratios = {k: self.draft_replicas_per_target(k) for k in sorted(self.verify) if k > 0}
        return {**asdict(self), "c": self.c(), "draft_replicas_per_target": ratios}


def spans_by_request(spans: list[Span]) -> dict[str, list[Span]]:
    """request_id -> the spans of its trace (the root span carries gen_ai.response.id)."""
    by_trace = defaultdict(list)
    for span in spans:
        by_trace[span.trace_id].append(span)
    out = {}
    for trace_spans in by_trace.values():
        ids = [s.attributes.get("gen_ai.response.id") for s in trace_spans if "gen_ai.response.id" in s.attributes]
        if ids:
            out[ids[0]] = trace_spans
    return out


def measure_costs(spans: list[Span]) -> Costs:
    """Costs from the spans of one target dtype's requests."""
    verify, draft_token, prefill = defaultdict(list), [], []
    for span in spans:
        if span.service == "target" and span.name == "verify":
            verify[span.attributes["specdec.scored"] - 1].append(span.seconds)
        elif span.service == "target" and span.name == "prefill":
            prefill.append(span.seconds)
        elif span.service == "draft" and span.name == "draft" and span.attributes.get("specdec.proposed"):
            draft_token.append(span.seconds / span.attributes["specdec.proposed"])
    if not verify.get(0) or not draft_token:
        raise ValueError("the run has no target-alone decode or no draft span to measure costs from")
    return Costs(
        decode=statistics.median(verify[0]),
        verify={k: statistics.median(v) for k, v in sorted(verify.items()) if k > 0},
        draft_token=statistics.median(draft_token),
        prefill_target=statistics.median(prefill) if prefill else 0.0,
        samples={
            "decode": len(verify[0]),
            "draft": len(draft_token),
            **{f"verify_k{k}": len(v) for k, v in verify.items() if k},
        },
    )


def step_overhead(spans: list[Span]) -> dict[str, float]:
    """Per step, medians: its wall time and what it spent outside draft, verify and accept."""
    children = defaultdict(float)
    for span in spans:
        if span.name in ("draft", "verify", "accept"):
            children[span.parent_span_id] += span.seconds
    steps = [s for s in spans if s.service == "orchestrator" and s.name == "step"]
    if not steps:
        return {}
    outside = [s.seconds - children[s.span_id] for s in steps]
    return {
        "step_seconds": statistics.median(s.seconds for s in steps),
        "outside_seconds": statistics.median(outside),
        "outside_share": statistics.median(o / s.seconds for o, s in zip(outside, steps)),
    }
