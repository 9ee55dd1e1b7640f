"""Acceptance statistics, defined once: counted per step, merged over generations, read by the
orchestrator (GenerationStats, span attributes, metrics), the client and the benchmark.

    alpha  = accepted / proposed                          (acceptance rate)
    tau    = emitted / steps                              (tokens per target pass after the prefill,
                                                           the target's own token included)
    acceptance at draft position i = accepted_i / proposed_i

A step is one target verify pass after the prefill; it emits accepted + 1 tokens (fewer when a
stop cuts it). Steps with k = 0 count: tau is what the target's passes produced, whatever k was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specdec.v1 import generate_pb2


@dataclass
class Tally:
    steps: int = 0
    drafting_steps: int = 0  # steps that proposed at least one token
    proposed: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens the steps emitted (the prefill's first token is not a step's)
    proposed_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)

    def add_step(self, proposed: int, accepted: int, emitted: int) -> None:
        self.steps += 1
        self.drafting_steps += proposed > 0
        self.proposed += proposed
        self.accepted += accepted
        self.emitted += emitted
        while len(self.proposed_per_position) < proposed:
            self.proposed_per_position.append(0)
            self.accepted_per_position.append(0)
        for position in range(proposed):
            self.proposed_per_position[position] += 1
            self.accepted_per_position[position] += position < accepted

    def merge(self, other: "Tally") -> "Tally":
        out = Tally(
            self.steps + other.steps, self.drafting_steps + other.drafting_steps, self.proposed + other.proposed,
            self.accepted + other.accepted, self.emitted + other.emitted,
        )  # fmt: skip
        for counts in (self, other):
            for i, (p, a) in enumerate(zip(counts.proposed_per_position, counts.accepted_per_position)):
                if i == len(out.proposed_per_position):
                    out.proposed_per_position.append(0)
                    out.accepted_per_position.append(0)
                out.proposed_per_position[i] += p
                out.accepted_per_position[i] += a
        return out

    @property
    def alpha(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    @property
    def tau(self) -> float | None:
        return self.emitted / self.steps if self.steps else None

    @property
    def mean_k(self) -> float | None:
        return self.proposed / self.drafting_steps if self.drafting_steps else None

    def acceptance_per_position(self) -> list[float]:
        return [a / p for p, a in zip(self.proposed_per_position, self.accepted_per_position) if p]

    def fill(self, stats: generate_pb2.GenerationStats) -> None:
        """Writes the counts into a response's stats (prompt and completion tokens are the caller's)."""
        stats.draft_tokens, stats.accepted_tokens, stats.steps = self.proposed, self.accepted, self.steps
        del stats.proposed_per_position[:], stats.accepted_per_position[:]
        stats.proposed_per_position.extend(self.proposed_per_position)
        stats.accepted_per_position.extend(self.accepted_per_position)

    @classmethod
    def from_stats(cls, stats: generate_pb2.GenerationStats) -> "Tally":
        """A finished generation's counts, as a client sees them; drafting steps are the steps
        that proposed at position 0, and every token after the first came from a step."""
        per_position = list(stats.proposed_per_position)
        return cls(
            steps=stats.steps,
            drafting_steps=per_position[0] if per_position else 0,
            proposed=stats.draft_tokens,
            accepted=stats.accepted_tokens,
            emitted=max(stats.completion_tokens - 1, 0),
            proposed_per_position=per_position,
            accepted_per_position=list(stats.accepted_per_position),
        )
