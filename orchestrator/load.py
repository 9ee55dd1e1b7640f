"""What the services' forward passes cost at the load they run at, learnt from their responses.

Every draft and target response says what the passes of its command were (BatchStats: rows,
sessions, device seconds, sessions open). PassCosts keeps, per service and across all
generations, the cost of a pass as a function of its rows (a moving average per power-of-two
bucket of rows, interpolated between buckets), the service's load (sessions open), and how many
sessions a speculative command's passes really shared: sessions that speculate drift apart (each
drafts on its own clock), so their verify passes carry fewer sessions than are open. Load adds
the orchestrator's own share of a step (gRPC, acceptance: a step's wall time minus the device time
of its commands). The k policy (draft_length.py) reads both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from specdec.v1 import session_pb2

DECAY = 0.9  # weight of the past per observation


def _bucket(rows: float) -> int:
    return int(math.log2(max(rows, 1.0)))


def moving_average(old: float | None, new: float) -> float:
    """The recent average: DECAY of the past, the rest of the new value (the new one alone at first)."""
    return new if old is None else DECAY * old + (1 - DECAY) * new


@dataclass
class PassCosts:
    """Seconds of one pass of a service as a function of its rows (every session's)."""

    points: dict[int, tuple[float, float]] = field(default_factory=dict)  # bucket -> (rows, seconds)
    sessions: float | None = None  # sessions open on the service, recent average: its load
    shared: float | None = None  # sessions per pass of speculative commands, recent average

    def observe(self, batch: session_pb2.BatchStats, speculative: bool = False) -> None:
        if batch.passes == 0:
            return
        rows, seconds = batch.rows / batch.passes, batch.device_seconds / batch.passes
        old = self.points.get(_bucket(rows))
        self.points[_bucket(rows)] = (
            (rows, seconds) if old is None else (moving_average(old[0], rows), moving_average(old[1], seconds))
        )
        self.sessions = moving_average(self.sessions, batch.open_sessions)
        if speculative:
            self.shared = moving_average(self.shared, batch.sessions / batch.passes)

    @property
    def known(self) -> bool:
        return bool(self.points)

    def measured(self, rows: float) -> bool:
        """Whether passes of about this many rows have been seen (else seconds() guesses)."""
        return _bucket(rows) in self.points

    def seconds(self, rows: float) -> float:
        """Interpolated between the measured buckets; past the last two, extended along their
        slope; with one bucket known, that bucket's cost (no slope to go by)."""
        points = sorted(self.points.values())
        if not points:
            raise ValueError("no pass has been measured yet")
        if len(points) == 1:
            return points[0][1]
        below = [p for p in points if p[0] <= rows]
        (x0, y0), (x1, y1) = (points[:2] if not below else
                              points[-2:] if len(below) == len(points) else
                              (below[-1], points[len(below)]))  # fmt: skip
        slope = max((y1 - y0) / (x1 - x0), 0.0) if x1 > x0 else 0.0  # a pass never gets cheaper with rows
        return max(y0 + slope * (rows - x0), min(y for _, y in points))


@dataclass
class Load:
    """Shared by every generation of an orchestrator: both services' pass costs and the step overhead."""

    target: PassCosts = field(default_factory=PassCosts)
    draft: PassCosts = field(default_factory=PassCosts)
    overhead: float = 0.0  # a step's seconds outside its commands' passes, recent average

    @property
    def sessions(self) -> float:
        """Sessions open on the target now, whether or not their steps share its passes (1 when
        nothing is known yet): the load a policy plans for."""
        return max(self.target.sessions or 1.0, 1.0)

    def observe_step(self, wall_seconds: float, device_seconds: float) -> None:
        self.overhead = moving_average(self.overhead or None, max(wall_seconds - device_seconds, 0.0))
