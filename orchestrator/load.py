"""What the services' forward passes cost at the load they run at, learnt from their responses.

Every draft and target response says what the passes of its command were (BatchStats: rows,
sessions, device seconds). PassCosts keeps, per service and across all generations, the cost of
a pass as a function of its rows: a moving average per power-of-two bucket of rows, interpolated
between buckets. Load adds the orchestrator's own share of a step (gRPC, acceptance: a step's
wall time minus the device time of its commands). The k policy (draft_length.py) reads both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from specdec.v1 import session_pb2

DECAY = 0.9  # weight of the past per observation


def _average(old: float | None, new: float) -> float:
    return new if old is None else DECAY * old + (1 - DECAY) * new


@dataclass
class PassCosts:
    """Seconds of one pass of a service as a function of its rows (every session's)."""

    points: dict[int, tuple[float, float]] = field(default_factory=dict)  # bucket -> (rows, seconds)
    sessions: float | None = None  # sessions per pass, recent average

    def observe(self, batch: session_pb2.BatchStats) -> None:
        if batch.passes == 0:
            return
        rows, seconds = batch.rows / batch.passes, batch.device_seconds / batch.passes
        bucket = int(math.log2(max(rows, 1.0)))
        old = self.points.get(bucket)
        self.points[bucket] = (rows, seconds) if old is None else (_average(old[0], rows), _average(old[1], seconds))
        self.sessions = _average(self.sessions, batch.sessions / batch.passes)

    @property
    def known(self) -> bool:
        return bool(self.points)

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
        """Sessions sharing a target pass now (1 when nothing is known yet)."""
        return max(self.target.sessions or 1.0, 1.0)

    def observe_step(self, wall_seconds: float, device_seconds: float) -> None:
        self.overhead = _average(self.overhead or None, max(wall_seconds - device_seconds, 0.0))
