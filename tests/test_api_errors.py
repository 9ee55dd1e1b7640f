"""Bad input gets a precise status naming the field, and costs no session and no process."""

from __future__ import annotations

import grpc
import pytest

from specdec.v1 import generate_pb2, generate_pb2_grpc, session_pb2, session_pb2_grpc
from tests.conftest import VOCAB
from tests.servers import start_orchestrator

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def request(**fields) -> generate_pb2.GenerateRequest:
    fields.setdefault("prompt_token_ids", [1, 2, 3])
    fields.setdefault("max_tokens", 4)
    return generate_pb2.GenerateRequest(**fields)


def status_of(stub, req) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(req, timeout=30))
    return e.value


@pytest.mark.parametrize(
    "req, field",
    [
        (generate_pb2.GenerateRequest(max_tokens=4), "prompt"),
        (request(prompt_token_ids=[], prompt="   "), "prompt"),  # tokenizes to nothing
        (request(max_tokens=0), "max_tokens"),
        (request(max_tokens=4097), "max_tokens"),
        (request(num_draft_tokens=17), "num_draft_tokens"),
        (request(sampling=generate_pb2.SamplingParams(temperature=-0.5)), "sampling.temperature"),
        (request(sampling=generate_pb2.SamplingParams(temperature=float("nan"))), "sampling.temperature"),
        (request(sampling=generate_pb2.SamplingParams(temperature=1, top_p=0.0)), "sampling.top_p"),
        (request(sampling=generate_pb2.SamplingParams(temperature=1, top_p=1.01)), "sampling.top_p"),
        (request(prompt_token_ids=[1, VOCAB]), "prompt_token_ids[1]"),
        (request(prompt_token_ids=[-3, 1]), "prompt_token_ids[0]"),
        (request(stop_token_ids=[5, 1000]), "stop_token_ids[1]"),
        (request(stop=["w1", ""]), "stop[1]"),
        (request(stop=["x" * 257]), "stop[0]"),
        (request(chat=True), "chat"),  # chat needs a text prompt
    ],
)
def test_bad_request_gets_invalid_argument_naming_the_field(stack, req, field):
    error = status_of(stack.generator(), req)
    assert error.code() == INVALID
    assert error.details().startswith(f"{field}:"), error.details()


def test_prompt_longer_than_the_context(loop, stack, model_dirs):
    small = start_orchestrator(
        loop, stack.target.address, stack.draft.address, str(model_dirs["target"]), "--max-seq-len", "16"
    )
    try:
        stub = generate_pb2_grpc.GeneratorStub(stack.channel(small.address))
        error = status_of(stub, request(prompt_token_ids=[1] * 16))
        assert error.code() == INVALID and error.details().startswith("prompt:") and "16" in error.details()
        # a prompt that fits is cut at the context: finish_reason LENGTH
        responses = list(stub.Generate(request(prompt_token_ids=[1] * 12, max_tokens=100, ignore_eos=True), timeout=30))
        assert sum(len(r.token_ids) for r in responses) == 4
        assert responses[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
    finally:
        loop.run(small.server.stop(0))


def test_bad_requests_leave_the_services_healthy(stack):
    stub = stack.generator()
    for bad in (request(max_tokens=0), request(prompt_token_ids=[VOCAB * 3])):
        with pytest.raises(grpc.RpcError):
            list(stub.Generate(bad, timeout=30))
    assert stack.wait_sessions(0) == {"target": 0, "draft": 0}
    responses = list(stub.Generate(request(), timeout=30))
    assert sum(len(r.token_ids) for r in responses) == 4


# --- the draft and target services' own contract -----------------------------------------------


def session_status(stub_type, address, messages) -> grpc.RpcError | None:
    with grpc.insecure_channel(address) as channel:
        try:
            list(stub_type(channel).Session(iter(messages), timeout=30))
        except grpc.RpcError as e:
            return e
    return None


T = session_pb2.TargetRequest
D = session_pb2.DraftRequest
OPEN = session_pb2.OpenSession(capacity=16)


@pytest.mark.parametrize(
    "role, messages, field",
    [
        ("target", [T(score=session_pb2.ScoreCommand(token_ids=[1], num_scored=1))], "score"),  # no open
        ("target", [T(open=OPEN), T(open=OPEN)], "open"),
        ("target", [T(open=session_pb2.OpenSession(capacity=0))], "open.capacity"),
        ("target", [T(open=session_pb2.OpenSession(capacity=10**6))], "open.capacity"),
        (
            "target",
            [T(open=session_pb2.OpenSession(capacity=4, sampling=generate_pb2.SamplingParams(temperature=-1)))],
            "sampling.temperature",
        ),
        ("target", [T(open=OPEN), T()], "command"),
        (
            "target",
            [T(open=OPEN), T(score=session_pb2.ScoreCommand(start_position=2, token_ids=[1], num_scored=1))],
            "start_position",
        ),
        (
            "target",
            [T(open=OPEN), T(score=session_pb2.ScoreCommand(token_ids=[1, 2], num_scored=18))],
            "score.num_scored",
        ),
        ("target", [T(open=OPEN), T(score=session_pb2.ScoreCommand(token_ids=[1, 999], num_scored=1))], "token_ids[1]"),
        ("target", [T(open=OPEN), T(score=session_pb2.ScoreCommand(token_ids=[1] * 17, num_scored=1))], "token_ids"),
        (
            "draft",
            [D(open=OPEN), D(propose=session_pb2.ProposeCommand(token_ids=[1], num_tokens=17))],
            "propose.num_tokens",
        ),
        ("draft", [D(open=OPEN), D(propose=session_pb2.ProposeCommand(token_ids=[], num_tokens=2))], "token_ids"),
        (
            "draft",
            [D(open=OPEN), D(propose=session_pb2.ProposeCommand(start_position=5, token_ids=[1], num_tokens=1))],
            "start_position",
        ),
        ("draft", [D(open=OPEN), D(open=OPEN)], "open"),
        ("draft", [D(open=OPEN), D()], "command"),
        ("draft", [D(propose=session_pb2.ProposeCommand(token_ids=[1], num_tokens=1))], "propose"),  # no open
        ("target", [T(open=OPEN), T(score=session_pb2.ScoreCommand(token_ids=[1], num_scored=0))], "num_scored"),
        ("target", [T(open=OPEN), T(score=session_pb2.ScoreCommand(token_ids=[1] * 17, num_scored=1))], "token_ids"),
    ],
)
def test_service_rejects_bad_commands_and_frees_the_session(stack, role, messages, field):
    running = stack.target if role == "target" else stack.draft
    stub_type = session_pb2_grpc.TargetServiceStub if role == "target" else session_pb2_grpc.DraftServiceStub
    error = session_status(stub_type, running.address, messages)
    assert error is not None and error.code() == INVALID
    assert error.details().startswith(f"{role}: {field}:"), error.details()
    assert stack.wait_sessions(0, roles=(role,)) == {role: 0}


def test_service_session_round_trip(stack):
    """A well-formed target session: prefill, then verify a block, then roll back and verify again."""
    messages = [
        T(open=OPEN),
        T(score=session_pb2.ScoreCommand(start_position=0, token_ids=[1, 2, 3], num_scored=1)),
        T(score=session_pb2.ScoreCommand(start_position=3, token_ids=[4, 5, 6], num_scored=3)),
        T(score=session_pb2.ScoreCommand(start_position=3, token_ids=[4, 5, 6], num_scored=3)),  # idempotent
    ]
    with grpc.insecure_channel(stack.target.address) as channel:
        responses = list(session_pb2_grpc.TargetServiceStub(channel).Session(iter(messages), timeout=30))
    assert responses[0].opened.session_id
    assert len(responses[1].scores.argmax_token_ids) == 1
    assert responses[2].scores.argmax_token_ids == responses[3].scores.argmax_token_ids
    assert len(responses[2].scores.argmax_token_ids) == 3


# --- hostile bytes: garbage and oversize messages -------------------------------------------------

GARBAGE = b"\xff\xff\xff\xff"  # not a protobuf message of any type (a field number of 0x1fffffff... truncated)


@pytest.mark.parametrize(
    "role, method, streaming",
    [
        ("target", "/specdec.v1.TargetService/Session", True),
        ("draft", "/specdec.v1.DraftService/Session", True),
        ("target", "/specdec.v1.TargetService/GetInfo", False),
        ("orchestrator", "/specdec.v1.Generator/Generate", False),
    ],
)
def test_garbage_bytes_get_invalid_argument_and_cost_nothing(stack, role, method, streaming):
    """grpc's own answer to bytes that do not parse is UNKNOWN; ours names the problem."""
    address = getattr(stack, role).address
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as e:
            if streaming:
                list(channel.stream_stream(method)(iter([GARBAGE]), timeout=10))
            elif role == "orchestrator":
                list(channel.unary_stream(method)(GARBAGE, timeout=10))
            else:
                channel.unary_unary(method)(GARBAGE, timeout=10)
    assert e.value.code() == INVALID, e.value.details()
    assert "malformed" in e.value.details()
    assert stack.wait_sessions(0) == {"target": 0, "draft": 0}
    assert list(stack.generator().Generate(request(), timeout=30))  # still serves


@pytest.mark.parametrize("role", ["target", "draft", "orchestrator"])
def test_an_oversize_message_is_refused_before_it_costs_memory(stack, role):
    """Every server sets its receive limit (4 MiB): a larger message gets RESOURCE_EXHAUSTED."""
    huge = [1] * (5 * 2**20)  # 5M token ids of one byte each: 5 MiB on the wire
    address = getattr(stack, role).address
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as e:
        if role == "orchestrator":
            list(generate_pb2_grpc.GeneratorStub(channel).Generate(request(prompt_token_ids=huge), timeout=30))
        else:
            message = T if role == "target" else D
            command = (
                {"score": session_pb2.ScoreCommand(token_ids=huge, num_scored=1)}
                if role == "target"
                else {"propose": session_pb2.ProposeCommand(token_ids=huge, num_tokens=1)}
            )
            stub_type = session_pb2_grpc.TargetServiceStub if role == "target" else session_pb2_grpc.DraftServiceStub
            list(stub_type(channel).Session(iter([message(open=OPEN), message(**command)]), timeout=30))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert "larger than max" in e.value.details()
    assert stack.wait_sessions(0) == {"target": 0, "draft": 0}
    assert list(stack.generator().Generate(request(), timeout=30))
