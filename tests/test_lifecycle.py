"""Sessions end with their streams, however they end; full and unreachable services say so;
every service answers health checks and reflection."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from orchestrator.__main__ import build, parse_flags
from specdec.telemetry import Telemetry
from specdec.v1 import generate_pb2, generate_pb2_grpc, session_pb2, session_pb2_grpc
from tests.servers import GatedEngine, start_model_service, start_orchestrator, start_stack


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


def test_orchestrator_start_fails_clearly_without_a_target(loop, model_dirs):
    args = parse_flags(["--target", "127.0.0.1:1", "--draft", "", "--tokenizer", str(model_dirs["target"]),
                        "--connect-timeout", "1", "--port", "0"])  # fmt: skip
    with pytest.raises(ConnectionError, match="target service at 127.0.0.1:1 did not answer"):
        loop.run(build(args, Telemetry.disabled("orchestrator")))


def test_orchestrator_refuses_a_draft_with_another_vocabulary(loop, engines, model_dirs, tmp_path):
    from specdec.engine.torch_engine import TorchEngine
    from tests.tiny import save_tiny_model

    other = TorchEngine.load(save_tiny_model(tmp_path / "v64", vocab_size=64), dtype="float64")
    target = start_model_service(loop, "target", engines["target"])
    draft = start_model_service(loop, "draft", other)
    try:
        with pytest.raises(ValueError, match=r"draft vocabulary \(64\) differs from the target's \(32\)"):
            start_orchestrator(loop, target.address, draft.address, str(model_dirs["target"]))
    finally:
        loop.run(target.server.stop(0))
        loop.run(draft.server.stop(0))


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
