"""The replicas of one role (draft or target), what each is doing, and which one a new session
opens on.

Discovery (discovery.py): the address flag names the replicas: one address, a comma-separated list
(`host:port,host:port`, or gRPC's `ipv4:a:1,b:2`), or `dns:///name:port`, resolved again every
RESOLVE_SECONDS (a Kubernetes headless Service: one address per ready pod, so a scale-up is used
within seconds). Each replica has a channel of its own.

Watching: every POLL_SECONDS each replica is asked its GetInfo. The answer says whether it
serves (it answered and is not draining), its load (sessions, KV pool use) and its model, which
`check` (compatibility.py) accepts or refuses; an error or no answer within POLL_TIMEOUT is
NOT_SERVING.

Routing: a new session opens on the least-loaded SERVING replica that holds its capacity. Load is
the fuller of a replica's session slots and its KV pool, counting this orchestrator's sessions as
they open (sessions opened together spread at once) and other clients' as last polled; ties go
round robin. An open that a replica refuses (RESOURCE_EXHAUSTED: full; UNAVAILABLE: gone or
draining; no answer in time) moves on to the next, so the client hears an error only once every
replica has refused; a replica that failed a stream goes last for COOLDOWN_SECONDS. A session
stays on its replica for its life; only failover (verifier.py, drafter.py) moves it.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

import grpc
from opentelemetry.metrics import Observation

from orchestrator.clients import BackendError
from orchestrator.discovery import Discovery, socket_address
from specdec.serving.server import MODEL_SERVICE_MESSAGES
from specdec.telemetry import Telemetry
from specdec.v1 import session_pb2

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
POLL_TIMEOUT = 5.0
RESOLVE_SECONDS = 5.0
COOLDOWN_SECONDS = 10.0
WAIT_LOG_SECONDS = 30.0  # how often "still waiting" is logged
MAX_RECONNECT_BACKOFF_MS = 5000  # gRPC's default grows to two minutes

T = TypeVar("T")


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

    def serving(self) -> bool:
        return any(r.state == State.SERVING for r in self.replicas.values())

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


Check = Callable[[str, session_pb2.ServiceInfo], "str | None"]  # (role, info) -> why it cannot be used


class ReplicaSet:
    """One role's replicas, watched in the background from start() until close()."""

    def __init__(self, role: str, spec: str, stub_type, telemetry: Telemetry,
                 credentials: grpc.ChannelCredentials | None = None, clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.role, self.spec = role, spec
        self.discovery = Discovery.parse(spec)
        self.stub_type, self.telemetry, self.credentials, self.clock = stub_type, telemetry, credentials, clock
        self.replicas: dict[str, Replica] = {}
        self.check: Check = lambda role, info: None
        self.first: asyncio.Future | None = None  # the first compatible replica's info
        self.on_serving: Callable[[bool], Awaitable] | None = None  # told whenever any/none serves
        self._serving: bool | None = None
        self._turn = itertools.count()
        self._tasks: list[asyncio.Task] = []
        meter = telemetry.meter
        meter.create_observable_gauge(
            "specdec.replicas", callbacks=[self._observe], unit="{replica}",
            description="Draft and target replicas the orchestrator knows, by role and state",
        )  # fmt: skip
        meter.create_observable_gauge(
            "specdec.replica.sessions", callbacks=[self._observe_sessions], unit="{session}",
            description="Sessions this orchestrator holds on each replica (attributes role, address)",
        )  # fmt: skip
        self.incompatible = meter.create_counter(
            "specdec.replicas.incompatible", unit="{replica}",
            description="Replicas found serving a model the orchestrator cannot use (never given sessions)",
        )  # fmt: skip
        self.refusals = meter.create_counter(
            "specdec.replicas.open_refusals", unit="{open}",
            description="Session opens a replica refused or missed, retried on the next replica",
        )  # fmt: skip
        for address in self.discovery.addresses:
            self._add(address, address)

    # --- watching ---------------------------------------------------------------------------

    def start(self, check: Check) -> None:
        self.check = check
        self.first = asyncio.get_running_loop().create_future()
        if self.discovery.dns_host:
            self._tasks.append(asyncio.ensure_future(self._resolve_forever()))
        for replica in self.replicas.values():
            self._watch(replica)

    def close(self) -> None:
        """Stops watching (from any thread)."""
        for task in self._tasks + [r.poller for r in list(self.replicas.values()) if r.poller]:
            task.get_loop().call_soon_threadsafe(task.cancel)

    def recheck(self) -> None:
        """The requirements changed: every replica's last answer is judged again, now."""
        for replica in self.replicas.values():
            if replica.info is not None and replica.state != State.REMOVED:
                self._judge(replica, replica.info)

    async def wait_first(self) -> session_pb2.ServiceInfo:
        """The first compatible replica's info, waited for as long as it takes."""
        started = self.clock()
        while True:
            done, _ = await asyncio.wait({self.first}, timeout=WAIT_LOG_SECONDS)
            if done:
                return self.first.result()
            log.info("waiting for a %s replica at %s (%.0f s so far): %s",
                     self.role, self.spec, self.clock() - started, self.describe())  # fmt: skip

    def _add(self, address: str, target: str, tls_name: str = "") -> Replica:
        options = [
            *MODEL_SERVICE_MESSAGES.of_clients().options(),
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.min_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ]
        if tls_name and self.credentials is not None:  # a pod's certificate names its Service, not its IP
            options.append(("grpc.ssl_target_name_override", tls_name))
        interceptors = self.telemetry.client_interceptors()
        if self.credentials is None:
            channel = grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
        else:
            channel = grpc.aio.secure_channel(target, self.credentials, options=options, interceptors=interceptors)
        replica = Replica(address, channel, self.stub_type(channel), self.clock)
        self.replicas[address] = replica
        return replica

    def _watch(self, replica: Replica) -> None:
        replica.poller = asyncio.ensure_future(self._poll_forever(replica))

    async def _poll_forever(self, replica: Replica) -> None:
        while replica.state != State.REMOVED:
            await self.poll(replica)
            await asyncio.sleep(POLL_SECONDS)

    async def poll(self, replica: Replica) -> None:
        """One GetInfo of a replica, and what its answer (or none) means."""
        try:
            info = await replica.stub.GetInfo(session_pb2.GetInfoRequest(), timeout=POLL_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            self._set(replica, State.NOT_SERVING, e.details() or e.code().name)
        else:
            self._judge(replica, info)
        await self._report()

    def _judge(self, replica: Replica, info: session_pb2.ServiceInfo) -> None:
        before = replica.state
        replica.answered(info, self.check(self.role, info))
        if replica.state != before:
            self._log_change(replica)
            if replica.state == State.INCOMPATIBLE:
                self.incompatible.add(1, {"role": self.role})
        if replica.state == State.SERVING and self.first is not None and not self.first.done():
            self.first.set_result(info)

    def _set(self, replica: Replica, state: State, reason: str) -> None:
        if replica.state != state:
            replica.state, replica.reason = state, reason
            self._log_change(replica)

    def _log_change(self, replica: Replica) -> None:
        if replica.state == State.SERVING:
            info = replica.info
            log.info("%s replica %s: serving %s (%s, %s on %s)%s", self.role, replica.address, info.model_name,
                     info.dtype, info.backend, info.device,
                     "" if info.tokenizer_fingerprint else "; it gives no tokenizer fingerprint")  # fmt: skip
        elif replica.state == State.INCOMPATIBLE:
            log.error("%s replica %s is not used: %s", self.role, replica.address, replica.reason)
        else:
            log.warning("%s replica %s: %s (%s)", self.role, replica.address, replica.state.value, replica.reason)

    async def _report(self) -> None:
        serving = self.serving()
        if serving != self._serving:
            self._serving = serving
            if self.on_serving is not None:
                await self.on_serving(serving)

    async def _resolve_forever(self) -> None:
        host, port = self.discovery.dns_host, self.discovery.dns_port
        loop = asyncio.get_running_loop()
        while True:
            try:
                found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as e:  # no such name yet (a headless Service without ready pods): keep what we have
                log.debug("cannot resolve %s: %s", host, e)
            else:
                self._update({socket_address(family, sockaddr) for family, _, _, _, sockaddr in found})
            await asyncio.sleep(RESOLVE_SECONDS)

    def _update(self, addresses: set[str]) -> None:
        for address in addresses:
            replica = self.replicas.get(address)
            if replica is None:
                self._watch(self._add(address, address, self.discovery.dns_host))
            elif replica.state == State.REMOVED:  # back (a pod not ready for a while): watched again
                self._set(replica, State.UNKNOWN, "resolved again")
                self._watch(replica)
        for address, replica in list(self.replicas.items()):
            if address not in addresses and replica.state != State.REMOVED:
                self._set(replica, State.REMOVED, f"{self.discovery.dns_host} no longer resolves to it")
            if replica.state == State.REMOVED and replica.ours == 0:
                del self.replicas[address]
                asyncio.ensure_future(replica.channel.close())

    # --- routing ----------------------------------------------------------------------------

    def candidates(self, capacity: int, where: Callable[[session_pb2.ServiceInfo], bool] | None = None) -> list[Replica]:
        """SERVING replicas that hold `capacity` positions, best first: not cooling down, not
        known full, least loaded, and round robin among equals."""
        now = self.clock()
        usable = [r for r in self.replicas.values()
                  if r.state == State.SERVING and r.holds(capacity) and (where is None or where(r.info))]  # fmt: skip
        if not usable:
            return []
        turn = next(self._turn) % len(usable)
        rotated = usable[turn:] + usable[:turn]
        return sorted(rotated, key=lambda r: (r.cooldown_until > now, r.full or r.load() >= 1.0, r.load()))

    def serving(self) -> bool:
        return any(r.state == State.SERVING for r in self.replicas.values())

    def holds(self, capacity: int) -> bool:
        """Whether any replica that is not refused would hold a session of `capacity` positions."""
        return any(r.holds(capacity) and r.state not in (State.INCOMPATIBLE, State.REMOVED)
                   for r in self.replicas.values())  # fmt: skip

    async def open(self, open_on: Callable[[Replica, Callable[[], None]], Awaitable[T]], capacity: int,
                   where: Callable[[session_pb2.ServiceInfo], bool] | None = None) -> T:  # fmt: skip
        """open_on(replica, release) on each candidate in turn until one opens; `release` counts
        the session off the replica when it ends. -> what open_on returned; raises the most
        telling refusal (full before gone) when every replica refused, or UNAVAILABLE when none serves."""
        errors: list[BackendError] = []
        for replica in self.candidates(capacity, where):
            release = replica.lease()
            try:
                return await open_on(replica, release)
            except BackendError as e:
                release()
                if e.code == grpc.StatusCode.INVALID_ARGUMENT:  # the request itself: another replica would refuse it too
                    raise
                self.refusals.add(1, {"role": self.role, "code": e.code.name})
                log.warning("%s replica %s did not open a session (%s), next replica: %s",
                            self.role, replica.address, e.code.name, e)  # fmt: skip
                if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    replica.full = True
                else:  # the next poll tells whether it is gone; until then it goes last
                    replica.failed()
                errors.append(e)
        if errors:
            full = [e for e in errors if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
            raise (full or errors)[-1]
        raise BackendError(grpc.StatusCode.UNAVAILABLE, self.unavailable(capacity))

    def unavailable(self, capacity: int) -> str:
        """Why no replica can take a session of `capacity` positions."""
        if not self.replicas:
            return f"{self.role} service at {self.spec} is unavailable: it resolves to no address"
        too_short = [r for r in self.replicas.values() if r.state == State.SERVING and not r.holds(capacity)]
        if too_short:
            return (f"{self.role} service at {self.spec} is unavailable: no replica holds {capacity} positions "
                    f"(at most {max(r.info.max_seq_len for r in too_short)})")  # fmt: skip
        return "; ".join(f"{self.role} service at {r.address} is unavailable: {r.reason or r.state.value}"
                         for r in self.replicas.values())  # fmt: skip

    def describe(self) -> str:
        return ", ".join(f"{r.address} {r.state.value}" + (f" ({r.reason})" if r.reason else "")
                         for r in self.replicas.values()) or "no address yet"  # fmt: skip

    def _observe_sessions(self, options):
        for replica in list(self.replicas.values()):
            yield Observation(replica.ours, {"role": self.role, "address": replica.address})

    def _observe(self, options):
        counts = {state: 0 for state in State}
        for replica in list(self.replicas.values()):
            counts[replica.state] += 1
        for state, count in counts.items():
            yield Observation(count, {"role": self.role, "state": state.value})


def same_model(info: session_pb2.ServiceInfo | None) -> Callable[[session_pb2.ServiceInfo], bool] | None:
    """Replicas serving the model `info` describes (None: any): a failover re-prefills there, so
    the output is what it would have been."""
    if info is None:
        return None
    return lambda other: (other.model_name, other.dtype) == (info.model_name, info.dtype)
