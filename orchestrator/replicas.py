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
import itertools
import logging
import socket
import time
from typing import Awaitable, Callable, TypeVar

import grpc
from opentelemetry.metrics import Observation

from orchestrator.clients import BackendError
from orchestrator.discovery import Discovery, socket_address
from orchestrator.replica import Replica, State
from specdec.serving.server import MODEL_SERVICE_MESSAGES
from specdec.telemetry import Telemetry
from specdec.v1 import session_pb2

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
POLL_TIMEOUT = 5.0
RESOLVE_SECONDS = 5.0
WAIT_LOG_SECONDS = 30.0  # how often "still waiting" is logged
FIRST_ROUND_SECONDS = 1.0  # at start-up, how long the first answer waits for the others'
MAX_RECONNECT_BACKOFF_MS = 5000  # gRPC's default grows to two minutes

T = TypeVar("T")


Check = Callable[[str, session_pb2.ServiceInfo], "str | None"]  # (role, info) -> why it cannot be used


class ReplicaMetrics:
    """What the orchestrator reports of its replicas, both roles on one set of instruments (an
    instrument's name can be registered once per meter)."""

    def __init__(self, meter):
        self.sets: list[ReplicaSet] = []
        meter.create_observable_gauge(
            "specdec.replicas", callbacks=[self._observe_states], unit="{replica}",
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

    def _observe_states(self, options):
        for replicas in self.sets:
            counts = {state: 0 for state in State}
            for replica in list(replicas.replicas.values()):
                counts[replica.state] += 1
            for state, count in counts.items():
                yield Observation(count, {"role": replicas.role, "state": state.value})

    def _observe_sessions(self, options):
        for replicas in self.sets:
            for replica in list(replicas.replicas.values()):
                yield Observation(replica.ours, {"role": replicas.role, "address": replica.address})


class ReplicaSet:
    """One role's replicas, watched in the background from start() until close()."""

    def __init__(self, role: str, spec: str, stub_type, telemetry: Telemetry,
                 credentials: grpc.ChannelCredentials | None = None, metrics: ReplicaMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.role, self.spec = role, spec
        self.discovery = Discovery.parse(spec)
        self.stub_type, self.telemetry, self.credentials, self.clock = stub_type, telemetry, credentials, clock
        self.replicas: dict[str, Replica] = {}
        self.check: Check = lambda role, info: None
        self.first: asyncio.Future | None = None  # the first compatible replica's info
        self.on_serving: Callable[[bool], Awaitable] | None = None  # told whenever any/none serves
        self._serving: bool | None = None
        self._turn = itertools.count()
        self._tasks: set[asyncio.Task] = set()  # the resolver, channels being closed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resolve_failing = False
        self.metrics = metrics or ReplicaMetrics(telemetry.meter)
        self.metrics.sets.append(self)
        for address in self.discovery.addresses:
            self._add(address, address)

    # --- watching ---------------------------------------------------------------------------

    def start(self, check: Check) -> None:
        self.check = check
        self._loop = asyncio.get_running_loop()
        self.first = self._loop.create_future()
        if self.discovery.dns_host:
            self._spawn(self._resolve_forever())
        for replica in self.replicas.values():
            self._watch(replica)

    def close(self) -> None:
        """Stops watching and closes the channels (from any thread)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._close)

    def _close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for replica in self.replicas.values():
            if replica.poller is not None:
                replica.poller.cancel()
            self._spawn(replica.channel.close())

    def _spawn(self, coro) -> None:
        """A background task, referenced until it ends."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def report_next(self) -> None:
        """on_serving hears the state at the next poll even if it has not changed (someone else
        may have set health meanwhile)."""
        self._serving = None

    def recheck(self) -> None:
        """The requirements changed: every replica's last answer is judged again, now (a replica
        whose last poll failed stays as it is: its answer is out of date)."""
        for replica in self.replicas.values():
            if replica.state in (State.SERVING, State.DRAINING, State.INCOMPATIBLE):
                self._judge(replica, replica.info)

    async def wait_first(self) -> session_pb2.ServiceInfo:
        """The first compatible replica's info, waited for as long as it takes; then, for up to
        FIRST_ROUND_SECONDS, the first answer of every other replica, so that the first sessions
        spread over all those up already."""
        started = self.clock()
        while True:
            done, _ = await asyncio.wait({self.first}, timeout=WAIT_LOG_SECONDS)
            if done:
                until = time.monotonic() + FIRST_ROUND_SECONDS
                while any(r.state == State.UNKNOWN for r in self.replicas.values()) and time.monotonic() < until:
                    await asyncio.sleep(0.01)
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
        if replica.poller is not None:
            replica.poller.cancel()
        replica.poller = asyncio.ensure_future(self._poll_forever(replica))

    async def _poll_forever(self, replica: Replica) -> None:
        while replica.state != State.REMOVED:
            await self.poll(replica)
            try:
                await self._report()
            except Exception:  # noqa: BLE001 (health could not be set: the next round tries again)
                log.exception("reporting the %s replicas' health failed", self.role)
            await asyncio.sleep(POLL_SECONDS)

    async def poll(self, replica: Replica) -> None:
        """One GetInfo of a replica, and what its answer (or none) means."""
        try:
            info = await replica.stub.GetInfo(session_pb2.GetInfoRequest(), timeout=POLL_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            error = e.details() or e.code().name
        except Exception as e:  # noqa: BLE001 (a closed channel, say: a state, not the end of watching)
            error = f"{type(e).__name__}: {e}"
        else:
            if replica.state != State.REMOVED:  # removed while the answer was on its way: it stays removed
                self._judge(replica, info)
            return
        if replica.state != State.REMOVED:
            self._set(replica, State.NOT_SERVING, error)

    def _judge(self, replica: Replica, info: session_pb2.ServiceInfo) -> None:
        before = replica.state
        replica.answered(info, self.check(self.role, info))
        if replica.state != before:
            self._log_change(replica)
            if replica.state == State.INCOMPATIBLE:
                self.metrics.incompatible.add(1, {"role": self.role})
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
            except Exception as e:  # noqa: BLE001 (no such name yet: a headless Service without ready pods)
                if not self._resolve_failing:  # once per outage: it may last
                    log.warning("cannot resolve %s (keeping the %d replicas known): %s", host, len(self.replicas), e)
                self._resolve_failing = True
            else:
                self._resolve_failing = False
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
                self._spawn(replica.channel.close())

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
                self.metrics.refusals.add(1, {"role": self.role, "code": e.code.name})
                log.warning("%s replica %s did not open a session (%s), next replica: %s",
                            self.role, replica.address, e.code.name, e)  # fmt: skip
                if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    replica.full = True
                else:  # the next poll tells whether it is gone; until then it goes last
                    replica.failed()
                errors.append(e)
            except BaseException:  # cancelled (the client went away) or a bug: not counted as ours
                release()
                raise
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



def same_model(info: session_pb2.ServiceInfo | None) -> Callable[[session_pb2.ServiceInfo], bool] | None:
    """Replicas serving the model `info` describes the way it does (None: any): a failover
    re-prefills there, so the output is what it would have been. The backend and the kind of
    device count too: float32 on a CPU and on a GPU may break a near-tie differently."""
    if info is None:
        return None

    def identity(i: session_pb2.ServiceInfo) -> tuple:
        return i.model_name, i.dtype, i.backend, i.device.split(":")[0], i.tokenizer_fingerprint

    return lambda other: identity(other) == identity(info)
