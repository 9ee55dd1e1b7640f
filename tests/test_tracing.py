"""One trace per Generate call across the three services, exported by OTLP to a receiver in the
test; metrics by OTLP; nothing when tracing is off."""

from __future__ import annotations

import re

import grpc
import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from specdec.telemetry import Telemetry, extract_context, inject_context
from specdec.v1 import generate_pb2, session_pb2
from tests.otlp import Collector
from tests.servers import start_stack
from tests.test_commands import Process, run

ROLES = ("orchestrator", "draft", "target")


@pytest.fixture
def traced(loop, engines, model_dirs):
    collector = Collector()
    telemetry = {role: collector.telemetry(role) for role in ROLES}
    stack = start_stack(loop, engines["target"], engines["layer_skip"], str(model_dirs["target"]), telemetry=telemetry)
    yield stack, collector, telemetry
    stack.stop()
    collector.stop()


def generate(stack, metadata=(), **fields):
    request = generate_pb2.GenerateRequest(
        **{"prompt_token_ids": [1, 2, 3], "max_tokens": 20, "num_draft_tokens": 3, **fields}
    )
    responses = list(stack.generator().Generate(request, metadata=metadata, timeout=30))
    return responses[-1]


def is_root(span) -> bool:
    return span.service == "orchestrator" and span.name == "/specdec.v1.Generator/Generate"


def test_one_trace_per_generation_with_a_step_span_per_step(traced):
    stack, collector, telemetry = traced
    last = generate(stack, ignore_eos=True)
    spans = collector.wait_for_span(is_root, flush=telemetry.values())
    assert len({s.trace_id for s in spans}) == 1
    by_id = {s.span_id: s for s in spans}
    (root,) = [s for s in spans if is_root(s)]
    assert root.kind == trace_pb2.Span.SPAN_KIND_SERVER and root.attributes["rpc.system"] == "grpc"

    steps = [s for s in spans if s.service == "orchestrator" and s.name == "step"]
    assert len(steps) == last.stats.steps
    assert all(by_id[s.parent_span_id] is root for s in steps)
    for role, name in (("draft", "draft"), ("target", "verify")):
        recorded = [s for s in spans if s.name == name]
        assert recorded and all(s.service == role for s in recorded)
        assert all(by_id[s.parent_span_id].name == "step" for s in recorded)  # recorded inside the service
    assert len([s for s in spans if s.name == "verify"]) == last.stats.steps
    accepts = [s for s in spans if s.name == "accept"]
    assert len(accepts) == len(steps) and all(s.service == "orchestrator" for s in accepts)

    # prefill: an orchestrator span with one child in each service
    (prefill,) = [s for s in spans if s.name == "prefill" and s.service == "orchestrator"]
    children = [s for s in spans if s.parent_span_id == prefill.span_id and s.name == "prefill"]
    assert sorted(s.service for s in children) == ["draft", "target"]

    # step attributes agree with each other and with the stats
    attrs = [s.attributes for s in steps]
    assert sum(a["specdec.step.accepted"] for a in attrs) == last.stats.accepted_tokens
    assert sum(a["specdec.step.proposed"] for a in attrs) == last.stats.draft_tokens
    for a in attrs:
        assert a["specdec.position.after"] - a["specdec.position.before"] == a["specdec.step.accepted"] + 1
        assert a["specdec.step.bonus"] == (a["specdec.step.accepted"] == a["specdec.step.proposed"] > 0)
        assert a["specdec.draft.rollback"] >= 0 and a["specdec.target.rollback"] >= 0
    chain = sorted(attrs, key=lambda a: a["specdec.position.before"])
    assert all(x["specdec.position.after"] == y["specdec.position.before"] for x, y in zip(chain, chain[1:]))
    # Each side rolls back exactly the positions the previous step's rejection left behind: the
    # target cached all k proposals, the draft all but the last.
    for before, after in zip(chain, chain[1:]):
        k, m = before["specdec.step.proposed"], before["specdec.step.accepted"]
        assert after["specdec.target.rollback"] == k - m
        if after["specdec.step.proposed"]:
            assert after["specdec.draft.rollback"] == max(k - 1 - m, 0)
    assert any(a["specdec.target.rollback"] for a in attrs)  # this pair does reject
    for span in (s for s in spans if s.name in ("draft", "verify")):
        assert span.attributes["specdec.queue.seconds"] >= 0 and span.attributes["specdec.session.id"]
        # the batch it ran in: this generation alone, so one session per pass, and its own rows
        a = span.attributes
        assert a["specdec.batch.sessions"] == 1
        if span.name == "verify":  # one pass over what the command carried
            assert a["specdec.batch.passes"] == 1 and a["specdec.batch.rows"] == a["specdec.input_tokens"]
        else:  # caching what it carried, then one pass per further proposal
            k = a["specdec.proposed"]
            assert a["specdec.batch.passes"] == k
            assert a["specdec.batch.rows"] * k == pytest.approx(a["specdec.input_tokens"] + k - 1)

    # GenAI conventions on the root, plus acceptance
    r = root.attributes
    assert r["gen_ai.operation.name"] == "text_completion"
    assert r["gen_ai.request.model"] == stack.info("target").model_name
    assert r["gen_ai.usage.input_tokens"] == 3 and r["gen_ai.usage.output_tokens"] == last.stats.completion_tokens
    assert r["gen_ai.response.finish_reasons"] == ["length"]
    assert r["specdec.acceptance_rate"] == pytest.approx(last.stats.accepted_tokens / last.stats.draft_tokens)
    assert r["specdec.tau"] == pytest.approx((last.stats.completion_tokens - 1) / last.stats.steps)

    # RPC spans of the session streams, client side in the orchestrator and server side in each service
    for role, service in (("draft", "DraftService"), ("target", "TargetService")):
        (server,) = [s for s in spans if s.service == role and s.name == f"/specdec.v1.{service}/Session"]
        client = by_id[server.parent_span_id]
        assert client.service == "orchestrator" and client.kind == trace_pb2.Span.SPAN_KIND_CLIENT
        assert server.status_code != trace_pb2.Status.STATUS_CODE_ERROR  # a finished session closes cleanly


def test_client_traceparent_is_continued(traced):
    stack, collector, telemetry = traced
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    generate(stack, metadata=[("traceparent", f"00-{trace_id}-{parent_id}-01")])
    spans = collector.wait_for_span(is_root, flush=telemetry.values())
    assert {s.trace_id for s in spans} == {trace_id}
    (root,) = [s for s in spans if is_root(s)]
    assert root.parent_span_id == parent_id


def test_failed_generation_is_traced_with_its_status(traced):
    stack, collector, telemetry = traced
    with pytest.raises(grpc.RpcError):
        generate(stack, max_tokens=0)
    spans = collector.wait_for_span(is_root, flush=telemetry.values())
    (root,) = [s for s in spans if is_root(s)]
    assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_metrics_are_exported(traced):
    stack, collector, telemetry = traced
    last = generate(stack, ignore_eos=True)
    collector.wait_for_span(is_root, flush=telemetry.values())
    for t in telemetry.values():
        t.flush()

    def total(name, service="orchestrator"):
        return sum(
            p.as_int if hasattr(p, "as_int") else p.count for s, _, p in collector.metric_points(name) if s == service
        )

    def count(name, service):
        return sum(p.count for s, _, p in collector.metric_points(name) if s == service)

    drafting_steps = last.stats.steps - 1 if last.stats.steps else 0  # the last step has k = 0 (1 token left)
    assert total("spec_decode.num_draft_tokens") == last.stats.draft_tokens
    assert total("spec_decode.num_accepted_tokens") == last.stats.accepted_tokens
    assert total("spec_decode.num_accepted_tokens_per_pos") == last.stats.accepted_tokens
    positions = {a["position"] for s, a, _ in collector.metric_points("spec_decode.num_accepted_tokens_per_pos")}
    assert positions <= {0, 1, 2}
    assert total("spec_decode.num_drafts") in (drafting_steps, last.stats.steps)
    assert count("specdec.step.duration", "orchestrator") == last.stats.steps
    assert count("gen_ai.server.time_to_first_token", "orchestrator") == 1
    assert count("gen_ai.server.time_per_output_token", "orchestrator") == 1
    assert count("gen_ai.server.request.duration", "orchestrator") == 1
    assert count("specdec.verify.duration", "target") == last.stats.steps
    assert count("specdec.prefill.duration", "target") == count("specdec.prefill.duration", "draft") == 1
    assert count("specdec.draft.duration", "draft") == total("spec_decode.num_drafts")
    # one queue wait per command; one pass for each target command (a prompt of 3 is one chunk)
    assert count("specdec.queue.duration", "target") == last.stats.steps + 1
    assert count("specdec.batch.rows", "target") == count("specdec.batch.sessions", "target") == last.stats.steps + 1
    assert count("specdec.pass.duration", "draft") >= total("spec_decode.num_drafts")
    ((_, _, ttft),) = collector.metric_points("gen_ai.server.time_to_first_token")
    ((_, _, duration),) = collector.metric_points("gen_ai.server.request.duration")
    assert 0 < ttft.sum <= duration.sum


def test_nothing_is_set_up_when_tracing_is_off():
    off = Telemetry.from_env("draft", {})
    assert not off.tracing and off.server_interceptors() == [] and off.client_interceptors() == []
    assert not Telemetry.from_env(
        "draft", {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}
    ).tracing
    metrics_only = Telemetry.from_env("draft", {"OTEL_METRICS_EXPORTER": "console", "OTEL_TRACES_EXPORTER": "none"})
    assert not metrics_only.tracing and hasattr(metrics_only.meter_provider, "force_flush")
    metrics_only.shutdown()
    collector = Collector()
    on = Telemetry.from_env("draft", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.endpoint})
    assert on.tracing and on.service_name == "draft"
    # with no recording span, commands carry no trace context
    request = session_pb2.TargetRequest()
    inject_context(request.trace_context)
    assert dict(request.trace_context) == {}
    with on.tracer.start_as_current_span("step") as span:
        inject_context(request.trace_context)
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[13]", request.trace_context["traceparent"])
    from opentelemetry import trace

    extracted = trace.get_current_span(extract_context(request.trace_context)).get_span_context()
    assert (extracted.trace_id, extracted.span_id) == (
        span.get_span_context().trace_id,
        span.get_span_context().span_id,
    )
    on.shutdown()
    collector.stop()


def test_processes_name_their_service_and_export_on_sigterm(model_dirs):
    """Real processes configured only by OTEL_* variables; the last spans leave at shutdown."""
    collector = Collector()
    env = {**collector.env(), "OTEL_BSP_SCHEDULE_DELAY": "60000"}  # nothing leaves before shutdown
    model = str(model_dirs["target"])
    target = Process(["-m", "target_service", "--model", model, "--dtype", "float64", "--port", "0", "--host", "127.0.0.1"],
                     env={**env, "OTEL_SERVICE_NAME": "big-model"})  # fmt: skip
    draft = Process(["-m", "draft_service", "--model", str(model_dirs["layer_skip"]), "--dtype", "float64",
                     "--port", "0", "--host", "127.0.0.1"], env=env)  # fmt: skip
    processes = [target, draft]
    try:
        orchestrator = Process(["-m", "orchestrator", "--target", target.wait_ready(), "--draft", draft.wait_ready(),
                                "--tokenizer", model, "--port", "0", "--host", "127.0.0.1"], env=env)  # fmt: skip
        processes.append(orchestrator)
        result = run("-m", "specdec.client", "--server", orchestrator.wait_ready(), "--no-chat", "--max-tokens", "6",
                     "w1 w2")  # fmt: skip
        assert result.returncode == 0, result.stderr
    finally:
        codes = [p.stop() for p in reversed(processes)]
        collector.stop()
    assert codes == [0, 0, 0]
    services = {s.service for s in collector.spans}
    assert services == {"orchestrator", "draft", "big-model"}
    assert len({s.trace_id for s in collector.spans}) == 1
