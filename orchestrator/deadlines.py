"""How long the orchestrator waits for a draft or target command before it counts the stream as
failed, so that nothing waits forever on a replica that hangs.

A command may take `factor` times the recent wall time of its kind (a session's first,
prefilling command, or a step; the other kind's until its own is timed), scaled up by its rows
when it carries more than that kind's recent average (a long prompt's prefill), and never less
than `minimum`. Before any command has been timed it may take `first` (a model warming caches).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Awaitable

from orchestrator.clients import DeadlineMissed
from orchestrator.load import moving_average


@dataclass
class CommandDeadlines:
    minimum: float
    first: float
    factor: float = 10.0
    seconds: dict[str, float] = field(default_factory=dict)  # kind -> recent wall time
    rows: dict[str, float] = field(default_factory=dict)  # kind -> recent rows per command

    def deadline(self, kind: str, rows: int = 1) -> float:
        """Seconds a command of this kind ("prefill" or "step") and size may take."""
        timed = kind if kind in self.seconds else next(iter(self.seconds), None)
        if timed is None:
            return self.first
        scale = max(1.0, rows / self.rows[timed])
        return max(self.minimum, self.factor * self.seconds[timed] * scale)

    def observe(self, kind: str, seconds: float, rows: int = 1) -> None:
        self.seconds[kind] = moving_average(self.seconds.get(kind), seconds)
        self.rows[kind] = moving_average(self.rows.get(kind), max(rows, 1))

    async def run(self, kind: str, rows: int, command: Awaitable, role: str, address: str):
        """The command's result within its deadline, which its time then teaches; DeadlineMissed
        (the command cancelled) if it does not answer in time."""
        deadline, start = self.deadline(kind, rows), time.perf_counter()
        try:
            result = await asyncio.wait_for(command, deadline)
        except asyncio.TimeoutError:
            raise DeadlineMissed(role, address, deadline) from None
        self.observe(kind, time.perf_counter() - start, rows)
        return result
