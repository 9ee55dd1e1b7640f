"""The device thread of a service: it gathers every session's waiting work into one forward pass.

Commands arrive from many streams at once (the event loop thread); each becomes a job (jobs.py).
While the device runs a pass, new jobs wait; the next pass then carries a chunk of every active
job, oldest first, up to --max-batch-tokens rows: a verify block whole, a draft job's next token,
a prompt in --prefill-chunk pieces, so a long prompt shares its passes with everyone else's steps
instead of stalling them. Opening and ending sessions run between passes, on this thread, so a
session's KV is never freed under a pass that reads it.

Starvation-free: the oldest job always gets its rows (the budget is at least one chunk), and a job
only ever has older jobs ahead of it, each of which needs a bounded number of passes.

Between passes the scheduler may hold the device for a moment: a session whose command just
finished comes back after a gap of its own (the orchestrator's round trip, a few ms, or the other
service's work), learnt per session (Returns). When sessions are due back before a short deadline
(half a recent pass, at most MAX_GATHER_SECONDS), the next pass waits for them, so sessions that
step together stay in one pass instead of alternating between passes of one session each.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from specdec.engine.base import Chunk, Engine, KVSession
from specdec.serving.jobs import Job

log = logging.getLogger(__name__)


GATHER_SHARE = 0.5  # of a recent pass's time, the longest the device waits for sessions due back
MAX_GATHER_SECONDS = 0.05
DECAY = 0.8


class Returns:
    """When each idle session is due to send its next command: when its last one finished plus
    its own recent gap between a response and the next command."""

    def __init__(self):
        self._idle: dict[int, float] = {}  # session -> when its last command finished
        self._gap: dict[int, float] = {}  # session -> recent gap, seconds

    def finished(self, session: KVSession, now: float) -> None:
        self._idle[id(session)] = now

    def arrived(self, session: KVSession, now: float) -> None:
        done = self._idle.pop(id(session), None)
        if done is not None:
            old = self._gap.get(id(session))
            self._gap[id(session)] = now - done if old is None else DECAY * old + (1 - DECAY) * (now - done)

    def ended(self, session: KVSession) -> None:
        self._idle.pop(id(session), None)
        self._gap.pop(id(session), None)

    def due_by(self, now: float, deadline: float) -> int:
        """Idle sessions due back before the deadline: never one not seen coming back before, nor
        one overdue by more than its gap (it is busy elsewhere, or done)."""
        return sum(
            1 for s, done in self._idle.items()
            if s in self._gap and done + self._gap[s] <= deadline and done + 2 * self._gap[s] >= now
        )  # fmt: skip


class SessionEnded(RuntimeError):
    """A job dropped because its session (or the whole service) ended first."""


@dataclass(frozen=True)
class PassStats:
    rows: int
    sessions: int
    seconds: float
    prefill_rows: int  # rows of jobs that were caching a prompt


def plan_pass(jobs: list[Job], max_rows: int, prefill_chunk: int, block_rows: int) -> list[tuple[Job, Chunk]]:
    """Each job's chunk for the next pass, oldest job first, within max_rows rows. A chunk that
    does not fit whole is cut to what is left if it is a prompt piece; a block (at most
    block_rows rows: a verify block, a draft token) waits for the next pass, where it is older
    than anything new."""
    plan, left = [], max_rows
    for job in jobs:
        want = job.rows_wanted(prefill_chunk, block_rows)
        if want > left and (want <= block_rows or left == 0):
            continue
        rows = min(want, left)
        plan.append((job, job.next_chunk(rows)))
        left -= rows
    return plan


class Scheduler:
    def __init__(self, engine: Engine, max_batch_tokens: int, prefill_chunk: int, block_rows: int, name: str,
                 on_pass: Callable[[PassStats], None] | None = None):  # fmt: skip
        """block_rows: the most rows one command's block takes (k + 1 for the largest k)."""
        if prefill_chunk < 1 or max_batch_tokens < max(prefill_chunk, block_rows):
            raise ValueError(
                f"--max-batch-tokens ({max_batch_tokens}) must hold a prefill chunk (--prefill-chunk "
                f"{prefill_chunk}, at least 1) and a whole block ({block_rows} rows)"
            )
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk = prefill_chunk
        self.block_rows = block_rows
        self.on_pass = on_pass
        self._cond = threading.Condition()
        self._incoming: deque[tuple[Callable[[], object], Future, bool]] = deque()  # (build, future, is_job)
        self._active: list[tuple[Job, Future]] = []
        self._closed = False
        self.returns = Returns()
        self._pass_seconds = 0.0  # recent average
        self._thread = threading.Thread(target=self._loop, name=f"{name}-device", daemon=True)
        self._thread.start()

    # --- from any thread -------------------------------------------------------------------------

    def submit(self, session: KVSession, build: Callable[[], Job]) -> Future:
        """Builds the session's job on the device thread (checks and rollback run there) and runs
        it; the future gets the finished job, or the error that the command or its passes raised."""
        with self._cond:
            self.returns.arrived(session, time.perf_counter())
        return self._put(build, is_job=True)

    def call(self, fn: Callable[[], object]) -> Future:
        """Runs fn between passes (open a session, end one)."""
        return self._put(fn, is_job=False)

    def end_session(self, session: KVSession) -> Future:
        """Drops the session's job, if one is still running (its stream is gone), and frees its KV."""

        def end():
            for job, future in [(j, f) for j, f in self._active if j.session is session]:
                self._active.remove((job, future))
                future.set_exception(SessionEnded("the session's stream ended"))
            with self._cond:
                self.returns.ended(session)
            self.engine.end_session(session)

        return self.call(end)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(30)

    def _put(self, fn, is_job: bool) -> Future:
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._incoming.append((fn, future, is_job))
            self._cond.notify()
        return future

    # --- the device thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._incoming and not self._active and not self._closed:
                    self._cond.wait()
                if self._closed and not self._incoming:
                    break
            self._take_incoming()
            if self._active:
                self._gather()
                self._run_pass()
        for _, future in self._active:
            future.set_exception(SessionEnded("the service is stopping"))

    def _take_incoming(self) -> None:
        with self._cond:
            incoming, self._incoming = self._incoming, deque()
        for fn, future, is_job in incoming:
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as e:  # a bad command costs that command only
                future.set_exception(e)
                continue
            if is_job and not result.done:
                self._active.append((result, future))
            else:
                future.set_result(result)

    def _gather(self) -> None:
        """Holds the device until the sessions due back soon have sent their commands."""
        deadline = time.perf_counter() + min(GATHER_SHARE * self._pass_seconds, MAX_GATHER_SECONDS)
        while True:
            with self._cond:
                now = time.perf_counter()
                if self._closed or now >= deadline or not self.returns.due_by(now, deadline):
                    return
                if not self._incoming:
                    self._cond.wait(deadline - now)
            self._take_incoming()

    def _run_pass(self) -> None:
        jobs = [job for job, _ in self._active]
        plan = plan_pass(jobs, self.max_batch_tokens, self.prefill_chunk, self.block_rows)
        chunks = [chunk for _, chunk in plan]
        rows = sum(len(c.token_ids) for c in chunks)
        started, start_ns = time.perf_counter(), time.time_ns()
        try:
            results = self.engine.run(chunks)
        except BaseException as e:  # a failed pass fails the commands in it, not the process
            log.exception("a pass of %d sessions (%d rows) failed", len(chunks), rows)
            planned = {id(job) for job, _ in plan}
            for job, future in [(j, f) for j, f in self._active if id(j) in planned]:
                self._active.remove((job, future))
                future.set_exception(e)
            return
        seconds, end_ns = time.perf_counter() - started, time.time_ns()
        self._pass_seconds = seconds if not self._pass_seconds else DECAY * self._pass_seconds + (1 - DECAY) * seconds
        finished = []
        for (job, _), result in zip(plan, results):
            job.record.add(rows, len(chunks), seconds, start_ns, end_ns, job.received, started)
            try:
                job.take(result)
            except BaseException as e:
                finished.append((job, e))
                continue
            if job.done:
                finished.append((job, None))
        now = time.perf_counter()
        for job, error in finished:
            future = next(f for j, f in self._active if j is job)
            self._active.remove((job, future))
            with self._cond:
                self.returns.finished(job.session, now)
            if error is None:
                future.set_result(job)
            else:
                future.set_exception(error)
        if self.on_pass:
            prefill_rows = sum(len(c.token_ids) for (job, _), c in zip(plan, chunks) if job.prefill)
            self.on_pass(PassStats(rows, len(chunks), seconds, prefill_rows))
