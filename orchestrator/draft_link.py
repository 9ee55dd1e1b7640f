"""The orchestrator's link to the draft service: whether to try it now, and how long to wait on it.

The draft is an optimisation, so its failures are states, not errors. A session whose draft stream
fails goes on with target-only steps (drafter.py) and, at its next step, opens a new stream: on a
channel over several replicas (round robin), one that is still reachable; re-prefilled from the
committed tokens, which its empty cache mirror asks for by itself. A stream that cannot be
opened, or that hangs or breaks (drafter.py), puts the link into backoff (1 s, doubling to 30 s
until a command is answered again): meanwhile no session, new or old, tries the draft, so a dead
or hung draft costs nothing but speed and is never polled in a busy loop. A replica that answers
but refuses a stream (its KV pool full) leaves that one session target-only.

Deadlines: a draft command that does not answer within DEADLINE_FACTOR times the recent wall time
of its kind (a session's first, prefilling command, or a step; the other kind's until its own is
timed), and at least MIN_DEADLINE, counts as a failure of that stream. A hung replica then costs
one deadline per stream, not a stuck generation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from orchestrator.clients import DraftSession
from orchestrator.load import PassCosts, moving_average

INITIAL_BACKOFF, MAX_BACKOFF = 1.0, 30.0
MIN_DEADLINE = 2.0
DEADLINE_FACTOR = 10.0
FIRST_DEADLINE = 30.0  # before any command has been timed (a model still warming caches)


@dataclass
class DraftLink:
    stub: object
    address: str
    vocab_size: int
    costs: PassCosts
    clock: Callable[[], float] = time.monotonic
    backoff: float = INITIAL_BACKOFF
    down_until: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)  # command kind -> recent wall time

    def usable(self) -> bool:
        """Whether a session may try the draft now (not while the link backs off)."""
        return self.clock() >= self.down_until

    def new_session(self) -> DraftSession:
        return DraftSession(self.stub, self.address, self.vocab_size, self.costs)

    def unreachable(self) -> None:
        """A stream found no replica, or one that did not answer: back off, twice as long as the
        last time (sessions failing together back off once)."""
        if self.usable():
            self.down_until = self.clock() + self.backoff
            self.backoff = min(2 * self.backoff, MAX_BACKOFF)

    def reachable(self) -> None:
        """A command was answered: the next failure backs off from the start again."""
        self.backoff, self.down_until = INITIAL_BACKOFF, 0.0

    def deadline(self, kind: str) -> float:
        """Seconds a command of this kind ("prefill" or "step") may take before its stream counts
        as failed."""
        seconds = self.seconds.get(kind, max(self.seconds.values(), default=None))  # else the other kind's
        return FIRST_DEADLINE if seconds is None else max(MIN_DEADLINE, DEADLINE_FACTOR * seconds)

    def observe(self, kind: str, seconds: float) -> None:
        self.seconds[kind] = moving_average(self.seconds.get(kind), seconds)
