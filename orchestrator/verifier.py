"""The target side of the loop: a session on a target replica, re-opened on another replica when
its own fails.

Unlike the draft, the target cannot be done without: its passes are the output. But any replica
serving the same model will do. When a command fails because the replica died, reset, broke or
did not answer within its deadline (deadlines.py; not because the command was refused), a new
stream is opened on the least-loaded other replica of that model (replicas.py; the failed one goes
last) and the command is sent again: the new stream's empty cache mirror makes it re-prefill the
committed tokens first (clients.py), so the step's scores, and the output, are what they would
have been. If no new stream opens, the client gets the original UNAVAILABLE at once.
"""

from __future__ import annotations

from typing import Callable

from orchestrator.clients import REFUSALS, BackendError, TargetSession, failure_reason
from orchestrator.deadlines import CommandDeadlines
from orchestrator.load import PassCosts
from orchestrator.replicas import ReplicaSet, same_model
from specdec.sampling import SamplingParams

# A target command is a pass every session of a replica shares, and a false alarm costs a
# re-prefill: its deadlines are looser than the draft's.
MIN_DEADLINE = 10.0
FIRST_DEADLINE = 300.0  # before any command has been timed: a first long prompt on a slow host


def target_deadlines() -> CommandDeadlines:
    return CommandDeadlines(MIN_DEADLINE, FIRST_DEADLINE)


class Verifier:
    def __init__(self, replicas: ReplicaSet, vocab_size: int, costs: PassCosts, deadlines: CommandDeadlines,
                 on_failover: Callable[[str, str], None], remaining: Callable[[], float | None] = lambda: None):  # fmt: skip
        """remaining(): seconds left before the client's deadline (None: no deadline)."""
        self.replicas = replicas
        self.vocab_size = vocab_size
        self.costs = costs
        self.remaining = remaining
        self.deadlines = deadlines
        self.on_failover = on_failover
        self.session: TargetSession | None = None
        self.opened: tuple[int, SamplingParams] | None = None

    @property
    def last_batch(self):
        return self.session.last_batch

    @property
    def model_name(self) -> str:
        """The model of the replica the session runs on."""
        return self.session.replica_info.model_name

    async def open(self, capacity: int, sampling: SamplingParams) -> None:
        self.opened = (capacity, sampling)
        self.session = await self._open_session()

    async def _open_session(self, where=None) -> TargetSession:
        deadline = self.deadlines.deadline("step")

        async def open_on(replica, release) -> TargetSession:
            session = TargetSession(replica.stub, replica.address, self.vocab_size, self.costs, self.remaining(),
                                    release, replica)  # fmt: skip
            await session.open_within(*self.opened, deadline)
            return session

        return await self.replicas.open(open_on, self.opened[0], where)

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
        return await self.deadlines.run(kind, rows, session.score(committed, proposed), "target", session.address)

    async def _reopen(self, error: BackendError) -> None:
        """A new stream in place of the failed one; the error itself if none opens (or if the
        replica refused: another would refuse too)."""
        failed = self.session
        if error.code in REFUSALS:
            failed.cancel()
            raise error
        failed.failed()
        try:
            self.session = await self._open_session(same_model(failed.replica_info))
        except BackendError:
            raise error from None
        self.on_failover(failure_reason(error), f"target stream lost, re-prefilled on a new one: {error}")

    async def finish(self) -> None:
        await self.session.finish()

    def cancel(self) -> None:
        if self.session is not None:
            self.session.cancel()
