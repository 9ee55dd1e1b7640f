"""A minimal OTLP/gRPC receiver that keeps what it is sent: for measuring the cost of export and
for tests, where no collector runs."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def any_value(value):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def attributes(key_values) -> dict:
    return {kv.key: any_value(kv.value) for kv in key_values}


@dataclass
class Span:
    service: str  # the exporting process's service.name
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict
    status_code: int
    start_ns: int
    end_ns: int

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


class OtlpSink(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, host: str = "127.0.0.1"):
        self.trace_requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.lock = threading.Lock()
        self.server = grpc.server(ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"{host}:0")
        self.host = host
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """The OTEL_* variables that make a process export here."""
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true"}

    def Export(self, request, context):
        with self.lock:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                self.trace_requests.append(request)
                return trace_service_pb2.ExportTraceServiceResponse()
            self.metric_requests.append(request)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    def span_count(self) -> int:
        with self.lock:
            return sum(len(s.spans) for r in self.trace_requests for rs in r.resource_spans for s in rs.scope_spans)

    @property
    def spans(self) -> list[Span]:
        with self.lock:
            requests = list(self.trace_requests)
        return [
            Span(attributes(rs.resource.attributes)["service.name"], s.name, s.trace_id.hex(), s.span_id.hex(),
                 s.parent_span_id.hex(), s.kind, attributes(s.attributes), s.status.code, s.start_time_unix_nano,
                 s.end_time_unix_nano)
            for request in requests for rs in request.resource_spans for scope in rs.scope_spans for s in scope.spans
        ]  # fmt: skip

    def stop(self) -> None:
        self.server.stop(0)
