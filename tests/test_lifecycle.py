"""Sessions end with their streams, however they end; full and unreachable services say so;
every service answers health checks and reflection."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from orchestrator.__main__ import build, parse_flags
from specdec.telemetry import Telemetry
from specdec.v1 import generate_pb2, generate_pb2_grpc, session_pb2, session_pb2_grpc
from tests.servers import GatedEngine, free_port, start_model_service, start_orchestrator, start_stack
from tests.tiny import greedy_reference


def read_in_background(responses) -> None:
    """Waits for the first response in a thread (the call blocks while the target is frozen)."""

    def read():
        try:
            next(responses, None)
        except grpc.RpcError:  # cancelled by the test
            pass

    threading.Thread(target=read, daemon=True).start()


def long_request(**fields) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(prompt_token_ids=[1, 2, 3], max_tokens=4000, ignore_eos=True, **fields)


@pytest.fixture
def gated_stack(loop, engines, model_dirs):
    """A stack whose target can be frozen mid-pass, and whose orchestrator takes 2 generations."""
    target = GatedEngine(engines["target"])
    stack = start_stack(loop, target, engines["layer_skip"], str(model_dirs["target"]), "--max-sessions", "2")
    yield stack, target
    target.gate.set()
    stack.stop()


def test_cancel_mid_generation_frees_both_sessions(stack):
    responses = stack.generator().Generate(long_request(), timeout=60)
    for _ in range(3):
        next(responses)
    assert stack.wait_sessions(1) == {"target": 1, "draft": 1}
    responses.cancel()
    assert stack.wait_sessions(0) == {"target": 0, "draft": 0}


def test_client_disconnect_frees_both_sessions(stack):
    channel = grpc.insecure_channel(stack.orchestrator.address)
    responses = generate_pb2_grpc.GeneratorStub(channel).Generate(long_request(), timeout=60)
    next(responses)
    channel.close()  # the client goes away without cancelling
    assert stack.wait_sessions(0) == {"target": 0, "draft": 0}


@pytest.mark.parametrize("sampling", [generate_pb2.SamplingParams(), generate_pb2.SamplingParams(temperature=1.0)])
def test_sessions_end_when_generation_finishes(stack, sampling):
    list(
        stack.generator().Generate(generate_pb2.GenerateRequest(prompt_token_ids=[1], max_tokens=8, sampling=sampling))
    )
    assert stack.wait_sessions(0) == {"target": 0, "draft": 0}


def test_cancel_while_the_target_is_busy(gated_stack):
    stack, target = gated_stack
    target.gate.clear()
    responses = stack.generator().Generate(long_request(), timeout=60)
    read_in_background(responses)
    assert target.blocked.wait(10)
    assert stack.wait_sessions(1) == {"target": 1, "draft": 1}
    responses.cancel()
    assert stack.wait_sessions(0) == {"target": 0, "draft": 0}


def test_a_client_deadline_frees_both_services_kv_within_a_second(stack, monkeypatch):
    """The deadline passes mid-generation: the client gets DEADLINE_EXCEEDED, both services have
    their KV blocks back within a second, and every backend stream carried the deadline (so a
    replica ends the session itself even if the orchestrator cannot)."""
    import orchestrator.clients

    timeouts = []
    opened = orchestrator.clients.RemoteSession.__init__

    def recording(self, stub, address, vocab_size, costs=None, timeout=None, *rest):
        timeouts.append(timeout)
        opened(self, stub, address, vocab_size, costs, timeout, *rest)

    monkeypatch.setattr(orchestrator.clients.RemoteSession, "__init__", recording)

    def used() -> list[int]:  # the engines are shared with other tests' stacks: compare with before
        return [stack.info(role).kv_blocks_used for role in ("target", "draft")]

    before = used()
    with pytest.raises(grpc.RpcError) as e:
        list(stack.generator().Generate(long_request(), timeout=1.0))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 1.0
    while used() != before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert used() == before
    assert len(timeouts) == 2 and all(t is not None and 1.0 < t < 1.6 for t in timeouts), timeouts  # 1 s + the margin


def test_a_target_that_stops_answering_costs_its_deadline_then_unavailable(gated_stack):
    """No client deadline: a frozen target is given up on after its command deadline (measured
    command time x 10, at least 10 s; here 1 s), and the client hears UNAVAILABLE saying so."""
    stack, target = gated_stack
    deadlines = stack.orchestrator.servicer.target_deadlines
    deadlines.minimum, deadlines.factor = 1.0, 0.0  # every target command: 1 s
    list(stack.generator().Generate(generate_pb2.GenerateRequest(prompt_token_ids=[1], max_tokens=4)))  # timed
    target.gate.clear()
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        list(stack.generator().Generate(long_request()))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert e.value.details() == f"target service at {stack.target.address} did not answer within 1.0 s"
    assert time.monotonic() - start < 10  # a deadline and a failed reopen, no more
    assert stack.wait_sessions(0) == {"target": 0, "draft": 0}
    target.gate.set()
    assert list(stack.generator().Generate(generate_pb2.GenerateRequest(prompt_token_ids=[1], max_tokens=2)))


def test_orchestrator_full_gets_resource_exhausted(gated_stack):
    stack, target = gated_stack
    target.gate.clear()
    held = [stack.generator().Generate(long_request(), timeout=60) for _ in range(2)]
    for responses in held:
        read_in_background(responses)
    assert stack.wait_sessions(2) == {"target": 2, "draft": 2}
    with pytest.raises(grpc.RpcError) as e:
        list(stack.generator().Generate(long_request(), timeout=30))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 generation slots" in e.value.details()
    for r in held:
        r.cancel()
    target.gate.set()
    assert stack.wait_sessions(0) == {"target": 0, "draft": 0}
    assert len(list(stack.generator().Generate(generate_pb2.GenerateRequest(prompt_token_ids=[1], max_tokens=2)))) >= 1


def test_target_full_gets_resource_exhausted_and_frees_the_draft(loop, engines, model_dirs):
    stack = start_stack(loop, engines["target"], engines["layer_skip"], str(model_dirs["target"]), max_sessions=1)
    try:
        # keep the target's only session open from outside the orchestrator
        release = threading.Event()

        def requests():
            yield session_pb2.TargetRequest(open=session_pb2.OpenSession(capacity=8))
            release.wait(30)

        holder = session_pb2_grpc.TargetServiceStub(stack.channel(stack.target.address)).Session(requests())
        next(holder)
        with pytest.raises(grpc.RpcError) as e:
            list(stack.generator().Generate(long_request(), timeout=30))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "target service at" in e.value.details() and "sessions are in use" in e.value.details()
        assert stack.wait_sessions(0, roles=("draft",)) == {"draft": 0}
        release.set()
        holder.cancel()
        assert stack.wait_sessions(0) == {"target": 0, "draft": 0}
    finally:
        stack.stop()


@pytest.mark.parametrize("dead", ["target"])  # a dead draft costs nothing but speed: test_failover.py
def test_unreachable_service_gets_unavailable_naming_it(loop, engines, model_dirs, dead):
    stack = start_stack(loop, engines["target"], engines["layer_skip"], str(model_dirs["target"]))
    try:
        running = stack.draft if dead == "draft" else stack.target
        loop.run(running.server.stop(0))
        with pytest.raises(grpc.RpcError) as e:
            list(stack.generator().Generate(long_request(), timeout=30))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert e.value.details().startswith(f"{dead} service at {running.address} is unavailable"), e.value.details()
    finally:
        stack.stop()


def health_status(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def wait_health(channel, status: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while (seen := health_status(channel)) != status and time.monotonic() < deadline:
        time.sleep(0.05)
    return seen


def test_the_orchestrator_started_first_waits_for_its_services(loop, engines, model_dirs):
    """Before its target answers it listens, says NOT_SERVING and answers Generate with
    UNAVAILABLE naming the target; then it serves, target-only until the draft answers; it goes
    NOT_SERVING while the target is unreachable, and never exits."""
    target_port, draft_port = free_port(), free_port()
    args = parse_flags(["--host", "127.0.0.1", "--port", "0", "--target", f"127.0.0.1:{target_port}",
                        "--draft", f"127.0.0.1:{draft_port}", "--tokenizer", str(model_dirs["target"])])  # fmt: skip

    async def start():
        server, startup = build(args, Telemetry.disabled("orchestrator"))
        return server, await server.start(serving=False), asyncio.ensure_future(startup())

    server, port, starting = loop.run(start())
    services = []
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        generator = generate_pb2_grpc.GeneratorStub(channel)
        assert health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            list(generator.Generate(long_request(), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert e.value.details() == f"target service at 127.0.0.1:{target_port} is not reachable yet"

        services.append(target := start_model_service(loop, "target", engines["target"], port=target_port))
        servicer = loop.run(asyncio.wait_for(asyncio.shield(starting), 15))
        assert wait_health(channel, health_pb2.HealthCheckResponse.SERVING) == health_pb2.HealthCheckResponse.SERVING
        request = generate_pb2.GenerateRequest(prompt_token_ids=[1, 2, 3], max_tokens=6, ignore_eos=True)
        alone = [t for r in generator.Generate(request, timeout=30) for t in r.token_ids]
        assert alone == greedy_reference(engines["target"], [1, 2, 3], 6)

        services.append(start_model_service(loop, "draft", engines["layer_skip"], port=draft_port))
        deadline = time.monotonic() + 15
        while not servicer.drafting(1) and time.monotonic() < deadline:
            time.sleep(0.05)
        last = list(generator.Generate(request, timeout=30))[-1]
        assert last.stats.draft_tokens > 0  # drafted on the draft that came up
        assert [t for r in generator.Generate(request, timeout=30) for t in r.token_ids] == alone

        loop.run(target.server.stop(0))
        services.remove(target)
        assert (
            wait_health(channel, health_pb2.HealthCheckResponse.NOT_SERVING)
            == health_pb2.HealthCheckResponse.NOT_SERVING
        )
    finally:
        starting.get_loop().call_soon_threadsafe(starting.cancel)
        if starting.done() and not starting.cancelled() and starting.exception() is None:
            starting.result().close()
        loop.run(server.stop(0))
        for running in services:
            loop.run(running.server.stop(0))
            running.servicer.close()


def test_a_draft_with_another_vocabulary_is_never_used(loop, engines, model_dirs, tmp_path, caplog):
    from specdec.engine.torch_engine import TorchEngine
    from tests.tiny import save_tiny_model

    other = TorchEngine.load(save_tiny_model(tmp_path / "v64", vocab_size=64), dtype="float64")
    target = start_model_service(loop, "target", engines["target"])
    draft = start_model_service(loop, "draft", other)
    orchestrator = start_orchestrator(loop, target.address, draft.address, str(model_dirs["target"]), wait_draft=False)
    try:
        deadline = time.monotonic() + 10
        while "differs from the target's" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"draft replica {draft.address} is not used: its vocabulary (64) differs from the target's (32)" in (
            caplog.text
        )
        with grpc.insecure_channel(orchestrator.address) as channel:
            request = generate_pb2.GenerateRequest(prompt_token_ids=[1, 2], max_tokens=4, ignore_eos=True)
            responses = list(generate_pb2_grpc.GeneratorStub(channel).Generate(request, timeout=30))
        assert responses[-1].stats.draft_tokens == 0 and draft.servicer.in_flight() == 0
    finally:
        for running in (orchestrator, target, draft):
            loop.run(running.server.stop(0))
            running.servicer.close()


# --- health and reflection ----------------------------------------------------------------------

SERVICES = {
    "orchestrator": "specdec.v1.Generator",
    "draft": "specdec.v1.DraftService",
    "target": "specdec.v1.TargetService",
}


@pytest.mark.parametrize("role", list(SERVICES))
def test_health_and_reflection(stack, role):
    address = getattr(stack, role).address
    channel = stack.channel(address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICES[role]):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    reflected = ProtoReflectionDescriptorDatabase(channel)
    services = set(reflected.get_services())
    assert {SERVICES[role], "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    # a client without this repository's code can learn the methods and messages
    descriptor = reflected.FindFileContainingSymbol(SERVICES[role])
    assert descriptor.package == "specdec.v1"


def test_a_bug_in_the_loop_is_internal_and_frees_the_sessions(stack, monkeypatch):
    import orchestrator.speculative

    def broken(*args):
        raise RuntimeError("acceptance broke")

    monkeypatch.setattr(orchestrator.speculative, "accept_greedy", broken)
    with pytest.raises(grpc.RpcError) as e:
        list(stack.generator().Generate(long_request(), timeout=30))
    assert e.value.code() == grpc.StatusCode.INTERNAL and "acceptance broke" in e.value.details()
    assert stack.wait_sessions(0) == {"target": 0, "draft": 0}
    monkeypatch.undo()
    assert list(stack.generator().Generate(generate_pb2.GenerateRequest(prompt_token_ids=[1], max_tokens=2)))
