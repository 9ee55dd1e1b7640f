"""The target side of the loop: a session on a target replica, re-opened on another replica when
its own fails.

Unlike the draft, the target cannot be done without: its passes are the output. But any replica
will do. When a command fails because the replica died, reset, broke or did not answer within its
deadline (deadlines.py; not because the command was refused), a new stream is opened on the same
channel, whose round robin skips a replica that is gone, and the command is sent again: the new
stream's empty cache mirror makes it re-prefill the committed tokens first (clients.py), so the
step's scores, and the output, are what they would have been. If no new stream opens, the client
gets the original UNAVAILABLE at once.
"""

from __future__ import annotations

from typing import Callable

from orchestrator.clients import REFUSALS, BackendError, TargetSession, failure_reason
from orchestrator.deadlines import CommandDeadlines
from orchestrator.load import PassCosts
from specdec.sampling import SamplingParams

# A target command is a pass every session of a replica shares, and a false alarm costs a
# re-prefill: its deadlines are looser than the draft's.
MIN_DEADLINE = 10.0
FIRST_DEADLINE = 300.0  # before any command has been timed: a first long prompt on a slow host


def target_deadlines() -> CommandDeadlines:
    return CommandDeadlines(MIN_DEADLINE, FIRST_DEADLINE)


class Verifier:
    def __init__(self, stub, address: str, vocab_size: int, costs: PassCosts, deadlines: CommandDeadlines,
                 on_failover: Callable[[str, str], None], remaining: Callable[[], float | None] = lambda: None):  # fmt: skip
        """remaining(): seconds left before the client's deadline (None: no deadline)."""
        self.address = address
        self.new_session = lambda: TargetSession(stub, address, vocab_size, costs, remaining())
        self.deadlines = deadlines
        self.on_failover = on_failover
        self.session = self.new_session()
        self.opened: tuple[int, SamplingParams] | None = None

    @property
    def last_batch(self):
        return self.session.last_batch

    async def open(self, capacity: int, sampling: SamplingParams) -> None:
        self.opened = (capacity, sampling)
        try:
            await self.session.open_within(capacity, sampling, self.deadlines.deadline("step"))
        except BackendError as e:
            await self._reopen(e)

    async def score(self, committed: list[int], proposed: list[int]):
        try:
            return await self._score(committed, proposed)
        except BackendError as e:
            await self._reopen(e)
        return await self._score(committed, proposed)  # re-prefills: its mirror is empty

    async def _score(self, committed: list[int], proposed: list[int]):
        session = self.session
        kind = "step" if session.cached else "prefill"
        rows = max(1, len(committed) - len(session.cached)) + len(proposed)
        return await self.deadlines.run(kind, rows, session.score(committed, proposed), "target", self.address)

    async def _reopen(self, error: BackendError) -> None:
        """A new stream in place of the failed one; the error itself if none opens (or if the
        replica refused: another would refuse too)."""
        self.session.cancel()
        if error.code in REFUSALS:
            raise error
        replacement = self.new_session()
        try:
            await replacement.open_within(*self.opened, self.deadlines.deadline("step"))
        except BackendError:
            raise error from None
        self.session = replacement
        self.on_failover(failure_reason(error), f"target stream lost, re-prefilled on a new one: {error}")

    async def finish(self) -> None:
        await self.session.finish()

    def cancel(self) -> None:
        self.session.cancel()
