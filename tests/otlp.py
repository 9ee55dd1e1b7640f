"""The OTLP receiver the tests read spans and metrics from."""

from __future__ import annotations

import time

from specdec.telemetry import Telemetry
from specdec.tools.otlp_sink import OtlpSink, Span, attributes


class Collector(OtlpSink):
    def telemetry(self, role: str) -> Telemetry:
        return Telemetry.from_env(role, self.env())

    def wait_for_span(self, predicate, flush=(), timeout: float = 10.0) -> list[Span]:
        """Flushes the given telemetry until a span satisfying predicate has arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for telemetry in flush:
                telemetry.flush()
            spans = self.spans
            if any(predicate(s) for s in spans):
                return spans
            time.sleep(0.05)
        raise AssertionError(f"no such span among {[(s.service, s.name) for s in self.spans]}")

    def metric_points(self, name: str) -> list[tuple[str, dict, object]]:
        """(service, attributes, data point) from each service's latest export of metric `name`
        (cumulative, so the latest holds the totals)."""
        latest = {}
        with self.lock:
            requests = list(self.metric_requests)
        for request in requests:
            for resource_metrics in request.resource_metrics:
                service = attributes(resource_metrics.resource.attributes)["service.name"]
                for scope in resource_metrics.scope_metrics:
                    for metric in scope.metrics:
                        if metric.name == name:
                            data = getattr(metric, metric.WhichOneof("data"))
                            latest[service] = [(service, attributes(p.attributes), p) for p in data.data_points]
        return [point for points in latest.values() for point in points]
