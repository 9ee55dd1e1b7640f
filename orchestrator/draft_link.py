"""The orchestrator's link to the draft service: whether to try it now, and how long to wait on it.

The draft is an optimisation, so its failures are states, not errors. A session whose draft stream
fails goes on with target-only steps (drafter.py) and, at its next step, opens a new stream on
the least-loaded draft replica still serving (replicas.py); re-prefilled from the committed
tokens, which its empty cache mirror asks for by itself. A stream that cannot be
opened, or that hangs or breaks (drafter.py), puts the link into backoff (1 s, doubling to 30 s
until a command is answered again): meanwhile no session, new or old, tries the draft, so a dead
or hung draft costs nothing but speed and is never polled in a busy loop. When every replica
answers but refuses a stream (their KV pools full), that one session goes on target-only.

Deadlines (deadlines.py): a draft command that does not answer within ten times the recent wall
time of its kind, and at least MIN_DEADLINE, counts as a failure of that stream. A hung replica
then costs one deadline per stream, not a stuck generation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from orchestrator.clients import DraftSession
from orchestrator.deadlines import CommandDeadlines
from orchestrator.load import PassCosts
from orchestrator.replicas import ReplicaSet
from specdec.sampling import SamplingParams

INITIAL_BACKOFF, MAX_BACKOFF = 1.0, 30.0
MIN_DEADLINE = 2.0
FIRST_DEADLINE = 30.0  # before any command has been timed (a model still warming caches)
# Opening a stream waits for the pass under way on the replica: a step's deadline, but bounded, so
# that a draft hung before anything was timed delays a first token by this at most.
MAX_OPEN_DEADLINE = 10.0
MIN_OPEN_SECONDS = 0.2  # what a replica tried after others used up the open deadline still gets


@dataclass
class DraftLink:
    replicas: ReplicaSet | None
    vocab_size: int
    costs: PassCosts
    clock: Callable[[], float] = time.monotonic
    backoff: float = INITIAL_BACKOFF
    down_until: float = 0.0
    deadlines: CommandDeadlines = field(default_factory=lambda: CommandDeadlines(MIN_DEADLINE, FIRST_DEADLINE))

    def usable(self) -> bool:
        """Whether a session may try the draft now (not while the link backs off)."""
        return self.clock() >= self.down_until

    async def open_session(self, capacity: int, sampling: SamplingParams, timeout: float | None = None) -> DraftSession:
        """An open stream on a draft replica, which ends by itself after `timeout` seconds (the
        client's deadline); raises the BackendError of the last replica that refused. One open
        deadline covers every replica tried: the draft must not hold up a first token for long."""
        until = self.clock() + self.open_deadline()

        async def open_on(replica, release) -> DraftSession:
            session = DraftSession(replica.stub, replica.address, self.vocab_size, self.costs, timeout, release, replica)
            await session.open_within(capacity, sampling, max(until - self.clock(), MIN_OPEN_SECONDS))
            return session

        return await self.replicas.open(open_on, capacity)

    def unreachable(self) -> None:
        """A stream found no replica, or one that did not answer: back off, twice as long as the
        last time (sessions failing together back off once)."""
        if self.usable():
            self.down_until = self.clock() + self.backoff
            self.backoff = min(2 * self.backoff, MAX_BACKOFF)

    def reachable(self) -> None:
        """A command was answered: the next failure backs off from the start again."""
        self.backoff, self.down_until = INITIAL_BACKOFF, 0.0

    def open_deadline(self) -> float:
        return min(self.deadlines.deadline("step"), MAX_OPEN_DEADLINE)
