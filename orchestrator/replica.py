"""One draft or target replica as the orchestrator knows it: its channel, what its last GetInfo
said (state, load, model), and the sessions this orchestrator holds on it. replicas.py watches
and chooses among them."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

from specdec.v1 import session_pb2

COOLDOWN_SECONDS = 10.0  # a replica whose stream failed goes last for new sessions this long


class State(enum.Enum):
    UNKNOWN = "unknown"  # not answered yet
    SERVING = "serving"
    NOT_SERVING = "not_serving"  # loading, unreachable, or did not answer
    DRAINING = "draining"
    INCOMPATIBLE = "incompatible"
    REMOVED = "removed"  # no longer resolved: serves its sessions to their end, gets no new ones


@dataclass(eq=False)
class Replica:
    address: str
    channel: grpc.aio.Channel
    stub: object
    clock: Callable[[], float] = time.monotonic
    state: State = State.UNKNOWN
    reason: str = ""  # why it is not SERVING
    info: session_pb2.ServiceInfo | None = None  # its last GetInfo answer
    ours: int = 0  # sessions this orchestrator holds on it (or is opening)
    others: int = 0  # sessions other clients held at the last poll
    full: bool = False  # refused an open as full since the last poll
    cooldown_until: float = 0.0
    poller: asyncio.Task | None = field(default=None, repr=False)

    def lease(self) -> Callable[[], None]:
        """Counts one more session of ours; the returned function (idempotent) counts it off."""
        self.ours += 1
        held = [True]

        def release() -> None:
            if held[0]:
                held[0] = False
                self.ours -= 1

        return release

    def load(self) -> float:
        """The fuller of its session slots and its KV pool, 0 to 1."""
        info = self.info
        sessions = (self.ours + self.others) / max(info.max_sessions, 1)
        kv = info.kv_blocks_used / info.kv_blocks_total if info.kv_blocks_total else 0.0
        return max(sessions, kv)

    def failed(self) -> None:
        """A stream on it failed or hung: it goes last for new sessions for a while."""
        self.cooldown_until = self.clock() + COOLDOWN_SECONDS

    def holds(self, capacity: int) -> bool:
        return self.info is not None and capacity <= self.info.max_seq_len

    def answered(self, info: session_pb2.ServiceInfo, problem: str | None) -> None:
        self.info, self.full = info, False
        self.others = max(info.active_sessions - self.ours, 0)
        if problem:
            self.state, self.reason = State.INCOMPATIBLE, problem
        elif info.draining:
            self.state, self.reason = State.DRAINING, "it is draining"
        else:
            self.state, self.reason = State.SERVING, ""
