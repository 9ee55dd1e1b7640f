"""Replica-aware routing (orchestrator/replicas.py) and per-replica compatibility
(orchestrator/compatibility.py, specdec/vocabulary.py): on replicas whose GetInfo answers the
tests write, then on in-process services; tests/test_replicas_loopback.py runs real processes."""

from __future__ import annotations

import asyncio
import logging
import threading

import grpc
import pytest

from orchestrator.clients import BackendError
from orchestrator.compatibility import Requirements
from orchestrator.discovery import Discovery
from orchestrator.replica import COOLDOWN_SECONDS, State
from orchestrator.replicas import ReplicaSet, same_model
from specdec.telemetry import Telemetry
from specdec.v1 import generate_pb2, generate_pb2_grpc, session_pb2, session_pb2_grpc
from specdec.vocabulary import fingerprint, model_fingerprint
from tests.servers import HeldSessions, start_model_service, start_orchestrator
from tests.tiny import greedy_reference, save_tiny_model, save_tiny_tokenizer

FINGERPRINT = "0123456789abcdef"


def info(**fields) -> session_pb2.ServiceInfo:
    defaults = dict(role="target", model_name="m", dtype="float64", vocab_size=32, max_seq_len=512, max_sessions=4,
                    max_draft_tokens=16, kv_blocks_total=100, tokenizer_fingerprint=FINGERPRINT)  # fmt: skip
    return session_pb2.ServiceInfo(**{**defaults, **fields})


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def replica_set(loop, *answers, role: str = "target", check=None, clock=None) -> ReplicaSet:
    """A ReplicaSet over len(answers) addresses r0:1, r1:1, ..., each judged on its answer (None: it
    did not answer). Built on the loop, which grpc.aio channels need."""

    async def build() -> ReplicaSet:
        addresses = ",".join(f"r{i}:1" for i in range(len(answers)))
        replicas = ReplicaSet(role, addresses, session_pb2_grpc.TargetServiceStub, Telemetry.disabled("orchestrator"),
                              clock=clock or Clock())  # fmt: skip
        if check is not None:
            replicas.check = check
        for replica, answer in zip(replicas.replicas.values(), answers):
            if answer is not None:
                replicas._judge(replica, answer)
        return replicas

    return loop.run(build())


def opener(opened: list[str], refusals: dict[str, grpc.StatusCode] | None = None):
    """An open_on that records where it opened, refusing on the replicas `refusals` names."""

    async def open_on(replica, release):
        await asyncio.sleep(0)  # opens run concurrently, as real ones do
        if replica.address in (refusals or {}):
            raise BackendError(refusals[replica.address], f"{replica.address} refused")
        opened.append(replica.address)
        return release

    return open_on


# --- discovery ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, addresses, dns",
    [
        ("localhost:50053", ("localhost:50053",), ("", 0)),
        ("a:1, b:2", ("a:1", "b:2"), ("", 0)),
        ("ipv4:127.0.0.1:1,127.0.0.1:2", ("ipv4:127.0.0.1:1", "ipv4:127.0.0.1:2"), ("", 0)),
        ("unix:/run/target.sock", ("unix:/run/target.sock",), ("", 0)),
        ("dns:///specdec-target:50053", (), ("specdec-target", 50053)),
        ("dns:specdec-target:50053", (), ("specdec-target", 50053)),
        ("dns:///[fd00::1]:50053", (), ("fd00::1", 50053)),
    ],
)
def test_the_address_flag_names_fixed_replicas_or_a_name_to_resolve(spec, addresses, dns):
    discovery = Discovery.parse(spec)
    assert discovery.addresses == addresses and (discovery.dns_host, discovery.dns_port) == dns


@pytest.mark.parametrize("spec", ["", " , ", "dns:///specdec-target", "dns://8.8.8.8/specdec-target:50053"])
def test_an_address_flag_that_names_nothing_usable_is_refused(spec):
    with pytest.raises(ValueError):
        Discovery.parse(spec)


def test_a_name_that_stops_resolving_to_a_replica_keeps_it_until_its_sessions_end(loop):
    async def run():
        replicas = ReplicaSet("target", "dns:///specdec-target:50053", session_pb2_grpc.TargetServiceStub,
                              Telemetry.disabled("orchestrator"))  # fmt: skip
        replicas.start(lambda role, i: None)
        try:
            replicas._update({"10.0.0.1:50053", "10.0.0.2:50053"})
            first, second = replicas.replicas["10.0.0.1:50053"], replicas.replicas["10.0.0.2:50053"]
            for replica in (first, second):
                replicas._judge(replica, info())
            release = first.lease()  # a session of ours on the first
            replicas._update({"10.0.0.2:50053", "10.0.0.3:50053"})  # a scale-up and a pod gone
            assert first.state == State.REMOVED and "10.0.0.3:50053" in replicas.replicas
            assert [r.address for r in replicas.candidates(10)] == ["10.0.0.2:50053"]  # the new one not polled yet
            release()
            replicas._update({"10.0.0.2:50053", "10.0.0.3:50053"})
            assert set(replicas.replicas) == {"10.0.0.2:50053", "10.0.0.3:50053"}
        finally:
            replicas.close()

    loop.run(run())


# --- routing ------------------------------------------------------------------------------------


def test_a_new_session_opens_on_the_least_loaded_serving_replica_that_holds_it(loop):
    replicas = replica_set(
        loop,
        info(active_sessions=2),  # half its slots
        info(kv_blocks_used=75),  # no sessions, but its KV pool three quarters full
        info(),
        info(draining=True),
        info(max_seq_len=64),  # too short for this session
        None,  # has not answered
    )
    assert [r.address for r in replicas.candidates(100)] == ["r2:1", "r0:1", "r1:1"]
    opened: list[str] = []
    loop.run(replicas.open(opener(opened), 100))
    assert opened == ["r2:1"] and replicas.replicas["r2:1"].ours == 1


def test_sessions_opened_together_spread_over_the_replicas_at_once(loop):
    replicas = replica_set(loop, info(max_sessions=8), info(max_sessions=8))
    opened: list[str] = []

    async def eight():
        return await asyncio.gather(*(replicas.open(opener(opened), 10) for _ in range(8)))

    releases = loop.run(eight())
    assert sorted(opened) == ["r0:1"] * 4 + ["r1:1"] * 4
    for release in releases + releases:  # counted off once, however often a stream says it ended
        release()
    assert [r.ours for r in replicas.replicas.values()] == [0, 0]


def test_sessions_that_come_one_at_a_time_alternate_between_equal_replicas(loop):
    replicas = replica_set(loop, info(), info())
    opened: list[str] = []
    for _ in range(4):
        loop.run(replicas.open(opener(opened), 10))()  # opened, and ended before the next one
    assert sorted(opened) == ["r0:1", "r0:1", "r1:1", "r1:1"]


def test_a_full_replica_s_refusal_is_retried_on_the_next_and_it_goes_last(loop):
    replicas = replica_set(loop, info(), info(active_sessions=1))  # r0 looks emptier: other clients filled it since
    opened: list[str] = []
    loop.run(replicas.open(opener(opened, {"r0:1": grpc.StatusCode.RESOURCE_EXHAUSTED}), 10))
    assert opened == ["r1:1"]
    r0 = replicas.replicas["r0:1"]
    assert r0.full and r0.ours == 0
    assert [r.address for r in replicas.candidates(10)] == ["r1:1", "r0:1"]  # until its next answer
    replicas._judge(r0, info())
    assert not r0.full


def test_when_every_replica_refuses_the_client_hears_full_before_gone(loop):
    replicas = replica_set(loop, info(), info())
    refusals = {"r0:1": grpc.StatusCode.RESOURCE_EXHAUSTED, "r1:1": grpc.StatusCode.UNAVAILABLE}
    with pytest.raises(BackendError) as e:
        loop.run(replicas.open(opener([], refusals), 10))
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and str(e.value) == "r0:1 refused"
    assert [r.ours for r in replicas.replicas.values()] == [0, 0]


def test_a_refused_request_is_not_tried_on_another_replica(loop):
    replicas = replica_set(loop, info(), info())
    tried: list[str] = []

    async def invalid(replica, release):
        tried.append(replica.address)
        raise BackendError(grpc.StatusCode.INVALID_ARGUMENT, "capacity out of range")

    with pytest.raises(BackendError) as e:
        loop.run(replicas.open(invalid, 10))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and len(tried) == 1


def test_with_no_replica_serving_the_client_hears_each_one_s_state(loop):
    replicas = replica_set(loop, info(draining=True), None)
    replicas._set(replicas.replicas["r1:1"], State.NOT_SERVING, "connection refused")
    with pytest.raises(BackendError) as e:
        loop.run(replicas.open(opener([]), 10))
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert str(e.value) == (
        "target service at r0:1 is unavailable: it is draining; "
        "target service at r1:1 is unavailable: connection refused"
    )


def test_a_replica_whose_stream_failed_goes_last_for_a_while(loop):
    clock = Clock()
    replicas = replica_set(loop, info(), info(active_sessions=3), clock=clock)
    replicas.replicas["r0:1"].failed()
    assert [r.address for r in replicas.candidates(10)] == ["r1:1", "r0:1"]
    clock.now += COOLDOWN_SECONDS
    assert [r.address for r in replicas.candidates(10)] == ["r0:1", "r1:1"]


def test_a_failover_stays_on_replicas_of_the_same_model(loop):
    replicas = replica_set(loop, info(model_name="v2"), info(model_name="v1", active_sessions=3))
    assert [r.address for r in replicas.candidates(10, same_model(info(model_name="v1")))] == ["r1:1"]


def test_an_incompatible_replica_is_never_a_candidate_and_recheck_applies_new_requirements(loop):
    requirements = Requirements(FINGERPRINT, tokenizer_size=32)
    replicas = replica_set(loop, info(), info(tokenizer_fingerprint="fedcba9876543210"), info(max_draft_tokens=4),
                           check=requirements.problem)  # fmt: skip
    assert [r.address for r in replicas.candidates(10)] == ["r0:1", "r2:1"]
    requirements.max_draft_tokens = 8  # the first target's limit arrived
    replicas.recheck()
    assert [r.address for r in replicas.candidates(10)] == ["r0:1"]
    states = [r.state for r in replicas.replicas.values()]
    assert states == [State.SERVING, State.INCOMPATIBLE, State.INCOMPATIBLE]


# --- compatibility ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({}, None),
        ({"tokenizer_fingerprint": ""}, None),  # a replica without tokenizer files: judged by its vocabulary
        ({"model_name": "other-model"}, None),  # a new version with the same tokenizer: a rolling update
        ({"role": "draft"}, "it is a draft service, not a target service"),
        ({"tokenizer_fingerprint": "fedcba9876543210", "model_name": "x"},
         f"its model x has another tokenizer (fingerprint fedcba9876543210, the orchestrator's is {FINGERPRINT})"),
        ({"vocab_size": 30}, "its vocabulary (30) is smaller than the tokenizer's (31)"),
        ({"vocab_size": 40}, "its vocabulary (40) differs from the target's (32)"),
        ({"max_draft_tokens": 4}, "it takes blocks of up to 4 tokens; requests may carry 8"),
    ],
)  # fmt: skip
def test_a_replica_is_compatible_when_its_vocabulary_and_limits_match(fields, problem):
    requirements = Requirements(FINGERPRINT, tokenizer_size=31, vocab_size=32, max_draft_tokens=8)
    assert requirements.problem("target", info(**fields)) == problem


def test_a_draft_that_takes_smaller_blocks_is_used_and_asked_for_fewer_tokens(loop):
    from orchestrator.clients import DraftSession

    requirements = Requirements(FINGERPRINT, tokenizer_size=31, vocab_size=32, max_draft_tokens=8)
    small = info(role="draft", max_draft_tokens=4)
    assert requirements.problem("draft", small) is None
    replicas = replica_set(loop, small, role="draft", check=requirements.problem)
    (replica,) = replicas.replicas.values()
    asked = []

    class Call:  # the stream: records the command, answers 4 proposals
        async def write(self, request):
            asked.append(request.propose.num_tokens)

        async def read(self):
            return session_pb2.DraftResponse(proposal=session_pb2.Proposal(token_ids=[1, 2, 3, 4]))

    class Stub:
        def Session(self, timeout=None):
            return Call()

    async def propose():
        session = DraftSession(Stub(), replica.address, 32, replica=replica)
        return await session.propose([5, 6], 8)

    proposed, _, _ = loop.run(propose())
    assert asked == [4] and proposed == [1, 2, 3, 4]


def test_the_fingerprint_tells_tokenizers_apart_and_not_copies(tmp_path):
    from transformers import AutoTokenizer

    for name, word in (("a", "w"), ("b", "w"), ("c", "v")):
        save_tiny_tokenizer(tmp_path / name, 32, word=word)
    a, b, c = (fingerprint(AutoTokenizer.from_pretrained(tmp_path / name)) for name in "abc")
    assert a == b != c and len(a) == 16
    model = save_tiny_model(tmp_path / "model", vocab_size=32)
    assert model_fingerprint(model) == a  # what a service reports is what the orchestrator computes
    (model / "tokenizer.json").unlink()
    (model / "tokenizer_config.json").unlink()
    assert model_fingerprint(model) == ""  # weights only: nothing to compare


def test_a_dns_name_resolves_to_the_replicas_sessions_open_on(loop, engines, model_dirs):
    target = start_model_service(loop, "target", engines["target"])
    port = target.address.rsplit(":", 1)[1]
    orchestrator = start_orchestrator(loop, f"dns:///localhost:{port}", "", str(model_dirs["target"]))
    try:
        assert f"127.0.0.1:{port}" in orchestrator.servicer.targets.replicas
        request = generate_pb2.GenerateRequest(prompt_token_ids=[1, 2, 3], max_tokens=8, ignore_eos=True)
        with grpc.insecure_channel(orchestrator.address) as channel:
            tokens = [t for r in generate_pb2_grpc.GeneratorStub(channel).Generate(request, timeout=30)
                      for t in r.token_ids]  # fmt: skip
        assert tokens == greedy_reference(engines["target"], [1, 2, 3], 8)
    finally:
        for running in (orchestrator, target):
            loop.run(running.server.stop(0))
            running.servicer.close()


def test_a_recheck_leaves_a_replica_whose_last_poll_failed_as_it_is(loop):
    replicas = replica_set(loop, info())
    (replica,) = replicas.replicas.values()
    replicas._set(replica, State.NOT_SERVING, "connection refused")
    replicas.recheck()
    assert replica.state == State.NOT_SERVING and replicas.candidates(10) == []


def test_an_answer_that_arrives_after_its_replica_was_removed_does_not_bring_it_back(loop):
    replicas = replica_set(loop, info())
    (replica,) = replicas.replicas.values()
    answer = asyncio.Event()

    class SlowStub:
        async def GetInfo(self, request, timeout=None):
            await answer.wait()
            return info()

    async def run():
        replica.stub = SlowStub()
        polling = asyncio.ensure_future(replicas.poll(replica))
        await asyncio.sleep(0)
        replicas._update(set())  # the name no longer resolves to it (our session keeps it listed)
        answer.set()
        await polling

    release = replica.lease()
    loop.run(run())
    assert replica.state == State.REMOVED and replicas.candidates(10) == []
    release()


def test_both_roles_replicas_are_exported_on_one_set_of_instruments(loop):
    from opentelemetry import trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from orchestrator.replicas import ReplicaMetrics

    reader = InMemoryMetricReader()
    telemetry = Telemetry("orchestrator", trace.NoOpTracerProvider(), MeterProvider(metric_readers=[reader]), False)

    async def build():
        metrics = ReplicaMetrics(telemetry.meter)
        for role, stub in (("target", session_pb2_grpc.TargetServiceStub), ("draft", session_pb2_grpc.DraftServiceStub)):
            replicas = ReplicaSet(role, f"{role}:1", stub, telemetry, metrics=metrics)
            replicas._judge(replicas.replicas[f"{role}:1"], info(role=role))
            replicas.replicas[f"{role}:1"].lease()

    loop.run(build())
    points = {m.name: m.data.data_points for rm in reader.get_metrics_data().resource_metrics
              for sm in rm.scope_metrics for m in sm.metrics}  # fmt: skip
    serving = {p.attributes["role"] for p in points["specdec.replicas"] if p.attributes["state"] == "serving" and p.value}
    assert serving == {"target", "draft"}
    sessions = {(p.attributes["role"], p.attributes["address"], p.value) for p in points["specdec.replica.sessions"]}
    assert sessions == {("target", "target:1", 1), ("draft", "draft:1", 1)}


# --- on real services: a replica's refusal, retried ---------------------------------------------


@pytest.fixture
def no_polls_after_the_first(monkeypatch):
    """The orchestrator learns of its replicas once, at start: what they do afterwards it hears
    only from their answers to opens."""
    import orchestrator.replicas

    monkeypatch.setattr(orchestrator.replicas, "POLL_SECONDS", 3600.0)


@pytest.mark.parametrize("how", ["full", "draining"])
def test_an_open_a_replica_refuses_goes_to_the_other_before_the_client_hears(
    loop, engines, model_dirs, caplog, no_polls_after_the_first, how
):
    """Two generations at once over two targets that look empty: one tries the replica that has
    since filled up (or begun to drain), is refused, and opens on the other."""
    refusing, other = (start_model_service(loop, "target", engines["target"], max_sessions=2) for _ in range(2))
    orchestrator = start_orchestrator(loop, f"{refusing.address},{other.address}", "", str(model_dirs["target"]))
    held = None
    try:
        if how == "full":  # another client takes its two slots
            held = HeldSessions(refusing.address, 2)
        else:
            refusing.servicer.draining = True  # what SIGTERM does (Server.drain)
        request = generate_pb2.GenerateRequest(prompt_token_ids=[1, 2, 3], max_tokens=8, ignore_eos=True)
        outputs = [None, None]

        def one(i):
            with grpc.insecure_channel(orchestrator.address) as channel:
                generator = generate_pb2_grpc.GeneratorStub(channel)
                outputs[i] = [t for r in generator.Generate(request, timeout=30) for t in r.token_ids]

        with caplog.at_level(logging.WARNING, logger="orchestrator.replicas"):
            threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(40)
        assert outputs == [greedy_reference(engines["target"], [1, 2, 3], 8)] * 2
        code = "RESOURCE_EXHAUSTED" if how == "full" else "UNAVAILABLE"
        assert f"target replica {refusing.address} did not open a session ({code})" in caplog.text
        assert len(refusing.servicer.sessions) == (2 if how == "full" else 0)  # none of ours
    finally:
        if held is not None:
            held.end()
        for running in (orchestrator, refusing, other):
            loop.run(running.server.stop(0))
            running.servicer.close()


def test_start_up_waits_a_moment_for_every_replica_s_first_answer(loop):
    """So that the first sessions spread over every replica already up, not the first to answer."""

    class Stub:
        def __init__(self, delay):
            self.delay = delay

        async def GetInfo(self, request, timeout=None):
            await asyncio.sleep(self.delay)
            return info()

    async def run():
        replicas = ReplicaSet("target", "a:1,b:1", session_pb2_grpc.TargetServiceStub, Telemetry.disabled("o"))
        replicas.replicas["a:1"].stub, replicas.replicas["b:1"].stub = Stub(0.0), Stub(0.3)
        replicas.start(lambda role, i: None)
        try:
            await replicas.wait_first()
            return [r.state for r in replicas.replicas.values()]
        finally:
            replicas.close()

    assert loop.run(run()) == [State.SERVING, State.SERVING]
