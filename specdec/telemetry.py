"""OpenTelemetry for the three services: traces and metrics exported by OTLP/gRPC.

Configured by the standard variables: OTEL_EXPORTER_OTLP_ENDPOINT (or the _TRACES_ / _METRICS_
ones) turns export on, OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER choose otlp, console or none,
OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES name the process (service.name defaults to its
role), OTEL_TRACES_SAMPLER(_ARG) sample, OTEL_BSP_* and OTEL_METRIC_EXPORT_INTERVAL pace export,
OTEL_SDK_DISABLED turns everything off. With no endpoint and no exporter chosen nothing is
exported: no-op providers, no gRPC interceptors, no trace context on the wire.

Each service gets its own providers (not the global ones), so several can share a process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context

TRACER_NAME = "specdec"
# Health checks, reflection and GetInfo are polled by probes and clients: not worth a trace each.
UNTRACED_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/specdec.v1.DraftService/GetInfo",
                    "/specdec.v1.TargetService/GetInfo")  # fmt: skip


def _exporter(kind: str, env: Mapping[str, str]) -> str:
    """'otlp', 'console' or 'none' for kind 'traces' or 'metrics'."""
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return "none"
    explicit = env.get(f"OTEL_{kind.upper()}_EXPORTER")
    if explicit:
        return explicit.split(",")[0].strip().lower()
    return "otlp" if _endpoint(kind, env) else "none"


def _endpoint(kind: str, env: Mapping[str, str]) -> str | None:
    return env.get(f"OTEL_EXPORTER_OTLP_{kind.upper()}_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")


def _insecure(kind: str, env: Mapping[str, str]) -> bool | None:
    value = env.get(f"OTEL_EXPORTER_OTLP_{kind.upper()}_INSECURE") or env.get("OTEL_EXPORTER_OTLP_INSECURE")
    if value is not None:
        return value.lower() == "true"
    endpoint = _endpoint(kind, env) or ""
    return True if endpoint.startswith("http://") else None


@dataclass
class Telemetry:
    service_name: str
    tracer_provider: trace.TracerProvider
    meter_provider: metrics.MeterProvider
    tracing: bool

    @property
    def tracer(self) -> trace.Tracer:
        return self.tracer_provider.get_tracer(TRACER_NAME)

    @property
    def meter(self) -> metrics.Meter:
        return self.meter_provider.get_meter(TRACER_NAME)

    @classmethod
    def disabled(cls, role: str) -> "Telemetry":
        return cls(role, trace.NoOpTracerProvider(), metrics.NoOpMeterProvider(), tracing=False)

    @classmethod
    def from_env(cls, role: str, env: Mapping[str, str] | None = None) -> "Telemetry":
        """Providers as the environment asks; `env` (default os.environ) decides the exporters and
        endpoints, so in-process tests can give each service its own."""
        env = os.environ if env is None else env
        traces, metrics_kind = _exporter("traces", env), _exporter("metrics", env)
        if traces == "none" and metrics_kind == "none":
            return cls.disabled(role)
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        resource = Resource.create()  # reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": role}))
        name = str(resource.attributes["service.name"])

        tracer_provider: trace.TracerProvider = trace.NoOpTracerProvider()
        if traces != "none":
            if traces == "console":
                span_exporter = ConsoleSpanExporter()
            else:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

                span_exporter = OTLPSpanExporter(endpoint=_endpoint("traces", env), insecure=_insecure("traces", env))
            delay = env.get("OTEL_BSP_SCHEDULE_DELAY")
            tracer_provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
            tracer_provider.add_span_processor(
                BatchSpanProcessor(span_exporter, schedule_delay_millis=float(delay) if delay else None)
            )
        meter_provider: metrics.MeterProvider = metrics.NoOpMeterProvider()
        if metrics_kind != "none":
            if metrics_kind == "console":
                metric_exporter = ConsoleMetricExporter()
            else:
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

                metric_exporter = OTLPMetricExporter(
                    endpoint=_endpoint("metrics", env), insecure=_insecure("metrics", env)
                )
            interval = env.get("OTEL_METRIC_EXPORT_INTERVAL")
            reader = PeriodicExportingMetricReader(metric_exporter, float(interval) if interval else None)
            meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        return cls(name, tracer_provider, meter_provider, tracing=traces != "none")

    def server_interceptors(self) -> list:
        if not self.tracing:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return [aio_server_interceptor(tracer_provider=self.tracer_provider, filter_=_traced)]

    def client_interceptors(self) -> list:
        if not self.tracing:
            return []
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        return aio_client_interceptors(tracer_provider=self.tracer_provider, filter_=_traced)

    def flush(self) -> None:
        for provider in (self.tracer_provider, self.meter_provider):
            if hasattr(provider, "force_flush"):
                provider.force_flush()

    def shutdown(self) -> None:
        for provider in (self.tracer_provider, self.meter_provider):
            if hasattr(provider, "shutdown"):
                provider.shutdown()


def _traced(call_details) -> bool:
    method = call_details.method
    method = method.decode() if isinstance(method, bytes) else method
    return not method.startswith(UNTRACED_METHODS)


def inject_context(carrier) -> None:
    """Writes the current span's W3C trace context into a message's trace_context map (nothing
    when no span is recording)."""
    propagate.inject(carrier)


def extract_context(carrier) -> Context:
    return propagate.extract(carrier)
