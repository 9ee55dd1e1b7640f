"""What the orchestrator reports about generations: metrics (vLLM's spec-decode counters, the
OpenTelemetry GenAI server histograms) and the GenAI attributes of a request's root span."""

from __future__ import annotations

from opentelemetry import metrics

from orchestrator.speculative import Step
from orchestrator.validation import Request
from specdec.tally import Tally
from specdec.v1 import generate_pb2

# Bucket boundaries the GenAI semantic conventions advise, in seconds.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]

FINISH_REASONS = {generate_pb2.FINISH_REASON_STOP: "stop", generate_pb2.FINISH_REASON_LENGTH: "length"}


class GenerationMetrics:
    def __init__(self, meter: metrics.Meter):
        self.num_drafts = meter.create_counter(
            "spec_decode.num_drafts", unit="{draft}", description="Steps in which the draft proposed tokens"
        )
        self.num_draft_tokens = meter.create_counter(
            "spec_decode.num_draft_tokens", unit="{token}", description="Proposed draft tokens"
        )
        self.num_accepted_tokens = meter.create_counter(
            "spec_decode.num_accepted_tokens", unit="{token}", description="Accepted draft tokens"
        )
        self.num_accepted_tokens_per_pos = meter.create_counter(
            "spec_decode.num_accepted_tokens_per_pos",
            unit="{token}",
            description="Accepted draft tokens by their position in the block (attribute position, from 0)",
        )
        self.time_to_first_token = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s", explicit_bucket_boundaries_advisory=TTFT_BUCKETS
        )
        self.time_per_output_token = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s", explicit_bucket_boundaries_advisory=TPOT_BUCKETS
        )
        self.request_duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS
        )
        self.failovers = {
            "draft": meter.create_counter(
                "specdec.draft.failovers",
                unit="{failover}",
                description="Draft streams lost or not opened; their sessions went on with target-only steps",
            ),
            "target": meter.create_counter(
                "specdec.target.failovers",
                unit="{failover}",
                description="Target streams lost and re-opened (re-prefilled) on a new stream",
            ),
        }
        self.step_duration = meter.create_histogram(
            "specdec.step.duration", unit="s", description="Wall time of one speculation step (draft, verify, accept)"
        )

    def record_step(self, step: Step, attributes: dict) -> None:
        self.step_duration.record(step.seconds, attributes)
        if step.proposed:
            self.num_drafts.add(1, attributes)
            self.num_draft_tokens.add(step.proposed, attributes)
            self.num_accepted_tokens.add(step.accepted, attributes)
            for position in range(step.accepted):
                self.num_accepted_tokens_per_pos.add(1, {**attributes, "position": position})

    def record_request(self, first_token_seconds: float, seconds: float, completion_tokens: int, attributes: dict):
        self.time_to_first_token.record(first_token_seconds, attributes)
        self.request_duration.record(seconds, attributes)
        if completion_tokens > 1:
            self.time_per_output_token.record((seconds - first_token_seconds) / (completion_tokens - 1), attributes)


def metric_attributes(chat: bool, model: str) -> dict:
    return {"gen_ai.operation.name": "chat" if chat else "text_completion", "gen_ai.request.model": model}


def request_span_attributes(request: Request, chat: bool, model: str, draft_model: str | None) -> dict:
    attributes = {
        **metric_attributes(chat, model),
        "gen_ai.request.max_tokens": request.max_tokens,
        "gen_ai.request.temperature": request.sampling.temperature,
        "gen_ai.request.top_p": request.sampling.top_p,
        "gen_ai.request.top_k": request.sampling.top_k,
        "gen_ai.usage.input_tokens": len(request.prompt_token_ids),
        "gen_ai.response.id": request.request_id,
        "specdec.num_draft_tokens": request.num_draft_tokens if draft_model else 0,
    }
    if request.sampling.seed is not None:
        attributes["gen_ai.request.seed"] = request.sampling.seed
    if draft_model:
        attributes["specdec.draft.model"] = draft_model
    return attributes


def response_span_attributes(tally: Tally, completion_tokens: int, finish_reason: int) -> dict:
    return {
        "gen_ai.usage.output_tokens": completion_tokens,
        "gen_ai.response.finish_reasons": [FINISH_REASONS[finish_reason]],
        "specdec.steps": tally.steps,
        "specdec.draft_tokens": tally.proposed,
        "specdec.accepted_tokens": tally.accepted,
        "specdec.acceptance_rate": tally.alpha or 0.0,  # alpha (specdec/tally.py)
        "specdec.tau": tally.tau or 0.0,  # tokens per target pass after the prefill
    }
