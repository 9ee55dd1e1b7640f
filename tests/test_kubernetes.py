"""deploy/kubernetes/: every manifest validates against the schemas of a current Kubernetes
release (kubernetes-validate bundles them), and the manifests agree with the services' own flags:
ports, health service names, drain grace, selectors, environment variables."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
KUBERNETES = "1.37.0"
ROLES = {  # component -> (module, env prefix, default port, health service)
    "draft": ("draft_service", "SPECDEC_DRAFT", 50052, "specdec.v1.DraftService"),
    "target": ("target_service", "SPECDEC_TARGET", 50053, "specdec.v1.TargetService"),
    "orchestrator": ("orchestrator", "SPECDEC_ORCHESTRATOR", 50051, "specdec.v1.Generator"),
}


def manifests() -> list[dict]:
    return [doc for path in sorted(DEPLOY.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def of_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["labels"]["app.kubernetes.io/component"]: doc for doc in manifests() if doc["kind"] == kind}


def merged(base, patch):
    """A strategic merge patch as kubectl applies it to these fields: maps merge, lists of named
    items merge by name, other lists and values are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merged(base[key], value) if key in base else value
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        names = {item["name"]: item for item in base}
        out = [merged(names[p["name"]], p) if p["name"] in names else p for p in patch]
        return [item for item in base if item["name"] not in {p["name"] for p in patch}] + out
    return patch


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_validates_against_the_kubernetes_schemas(doc):
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@pytest.mark.parametrize("device", sorted(p.stem for p in (DEPLOY / "devices").glob("*.yaml")))
def test_each_device_patch_gives_a_valid_target_deployment(device):
    patch = yaml.safe_load((DEPLOY / "devices" / f"{device}.yaml").read_text())
    deployment = merged(copy.deepcopy(of_kind("Deployment")["target"]), patch)
    kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"nvidia": "nvidia.com/gpu", "tenstorrent": "tenstorrent.com/n150"}[device] in container["resources"][
        "limits"
    ]


def flags_help(module: str) -> str:
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True).stdout
    return " ".join(out.split())  # argparse wraps lines


@pytest.mark.parametrize("role", list(ROLES))
def test_each_role_s_manifests_agree_with_its_flags(role):
    module, prefix, default_port, health = ROLES[role]
    deployment, service, budget = (
        of_kind("Deployment")[role],
        of_kind("Service")[role],
        of_kind("PodDisruptionBudget")[role],
    )
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}

    help_text = flags_help(module)
    for name in env:
        if name.startswith(prefix):
            assert f"[env {name}]" in help_text, f"{name} is no flag of {module}"
    port = int(env[f"{prefix}_PORT"])
    assert port == default_port and container["ports"] == [{"name": "grpc", "containerPort": port}]
    assert service["spec"]["ports"] == [{"name": "grpc", "port": port, "targetPort": "grpc"}]
    assert service["spec"].get("clusterIP") == (None if role == "orchestrator" else "None")  # headless replicas
    # probes: readiness on the role's gRPC health service, liveness only on the port (a draining or
    # waiting process is alive)
    assert container["readinessProbe"]["grpc"] == {"port": port, "service": health}
    assert container["livenessProbe"]["tcpSocket"] == {"port": port}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # a model loads in minutes
    if role != "orchestrator":  # (the orchestrator is started once it listens: it waits for its services)
        assert startup["grpc"] == container["readinessProbe"]["grpc"]
    # the init container waits for the very model the service loads (or the tokenizer it reads)
    (wait,) = pod["spec"]["initContainers"]
    wanted = env[f"{prefix}_TOKENIZER" if role == "orchestrator" else f"{prefix}_MODEL"]
    assert {"name": "MODEL", "value": wanted} in wait["env"] and '"$MODEL"' in wait["command"][-1]
    # drain: preStop, then --shutdown-grace, within the grace period the kubelet gives
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop + float(env[f"{prefix}_SHUTDOWN_GRACE"]) + 1
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels == service["spec"]["selector"]
    assert budget["spec"]["selector"]["matchLabels"] == labels
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert {"configMapRef": {"name": "specdec-telemetry", "optional": True}} in container["envFrom"]


def test_the_orchestrator_reaches_every_pod_of_the_headless_services():
    env = {
        e["name"]: e.get("value")
        for e in of_kind("Deployment")["orchestrator"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    services = of_kind("Service")
    for role in ("draft", "target"):
        port = services[role]["spec"]["ports"][0]["port"]
        assert env[f"SPECDEC_ORCHESTRATOR_{role.upper()}"] == f"dns:///{services[role]['metadata']['name']}:{port}"


def test_every_pod_mounts_the_models_volume_the_fetch_job_fills():
    (claim,) = [d for d in manifests() if d["kind"] == "PersistentVolumeClaim"]
    (job,) = [d for d in manifests() if d["kind"] == "Job"]
    for spec in [
        job["spec"]["template"]["spec"],
        *(d["spec"]["template"]["spec"] for d in of_kind("Deployment").values()),
    ]:
        assert {"name": "models", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}} in spec["volumes"]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][:4] == [
        "python",
        "-m",
        "specdec.models",
        "fetch",
    ]


# --- autoscaling --------------------------------------------------------------------------------

AUTOSCALING = DEPLOY / "autoscaling"


def autoscaling_manifests() -> list[dict]:
    return [doc for name in ("hpa.yaml", "collector.yaml")
            for doc in yaml.safe_load_all((AUTOSCALING / name).read_text()) if doc]  # fmt: skip


def adapter_rules() -> list[dict]:
    return yaml.safe_load((AUTOSCALING / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]


def container_env(role: str) -> dict[str, dict]:
    (container,) = of_kind("Deployment")[role]["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container["env"]}


@pytest.mark.parametrize("doc", autoscaling_manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_autoscaling_manifest_validates_against_the_kubernetes_schemas(doc):
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_each_model_role_scales_on_a_metric_the_adapter_serves_below_its_session_limit():
    served = {rule["name"]["as"] for rule in adapter_rules()}
    hpas = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in autoscaling_manifests()
            if d["kind"] == "HorizontalPodAutoscaler"}  # fmt: skip
    assert set(hpas) == {"draft", "target"}
    for role, hpa in hpas.items():
        deployment = of_kind("Deployment")[role]
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": deployment["metadata"]["name"]}  # fmt: skip
        (metric,) = hpa["spec"]["metrics"]
        assert metric["pods"]["metric"]["name"] in served
        limit = int(container_env(role)[f"{ROLES[role][1]}_MAX_SESSIONS"]["value"])
        assert 0 < float(metric["pods"]["target"]["averageValue"]) < limit  # scale up before pods refuse


def test_the_adapter_maps_the_labels_each_pod_s_metrics_carry_back_to_the_pod():
    expected = {"k8s_pod_name": {"resource": "pod"}, "k8s_namespace_name": {"resource": "namespace"}}
    for role in ROLES:
        env = container_env(role)
        attributes = dict(kv.split("=") for kv in env["OTEL_RESOURCE_ATTRIBUTES"]["value"].split(","))
        assert attributes == {"k8s.pod.name": "$(POD_NAME)", "k8s.namespace.name": "$(POD_NAMESPACE)"}
        assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
        names = list(env)  # $(VAR) expands only variables defined before it
        assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES") > names.index("POD_NAMESPACE")
        # the collector turns resource attributes into labels by replacing the dots
        assert {key.replace(".", "_") for key in attributes} == set(expected)
    for rule in adapter_rules():
        assert rule["resources"]["overrides"] == expected


def test_the_collector_listens_where_the_pods_send_and_exports_pod_labels():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in autoscaling_manifests()}
    config = yaml.safe_load(docs["ConfigMap", "otel-collector"]["data"]["config.yaml"])
    assert config["exporters"]["prometheus"]["resource_to_telemetry_conversion"] == {"enabled": True}
    assert "prometheus" in config["service"]["pipelines"]["metrics"]["exporters"]
    (telemetry,) = [d for d in manifests() if d["kind"] == "ConfigMap"]
    endpoint = telemetry["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    ports = {p["name"]: p["port"] for p in docs["Service", "otel-collector"]["spec"]["ports"]}
    assert endpoint == f"http://otel-collector:{ports['otlp']}"
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(f":{ports['otlp']}")
    annotations = docs["Deployment", "otel-collector"]["spec"]["template"]["metadata"]["annotations"]
    assert config["exporters"]["prometheus"]["endpoint"].endswith(f":{annotations['prometheus.io/port']}")


def prometheus_name(metric) -> str:
    """The name the collector's Prometheus exporter gives an OpenTelemetry metric (the translation
    rules of opentelemetry-collector-contrib pkg/translator/prometheus: dots to underscores; the unit
    appended, `{...}` annotations dropped, s -> seconds, 1 -> ratio on gauges; _total on counters)."""
    from opentelemetry.sdk.metrics.export import Gauge, Sum

    name = metric.name.replace(".", "_")
    unit = {"s": "seconds", "By": "bytes"}.get(metric.unit, "")
    if metric.unit == "1" and isinstance(metric.data, Gauge):
        unit = "ratio"
    if unit and not name.endswith(unit):
        name += f"_{unit}"
    if isinstance(metric.data, Sum) and metric.data.is_monotonic:
        name += "_total"
    return name


def test_the_adapter_rules_read_series_a_target_service_exports(loop, engines):
    """A real target service with an in-memory metric reader, one session prefilled: every series
    an adapter rule asks for exists under the name the collector gives it, with the load in it."""
    import queue

    import grpc
    from opentelemetry import trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from specdec.telemetry import Telemetry
    from specdec.v1 import session_pb2, session_pb2_grpc
    from tests.servers import start_model_service

    reader = InMemoryMetricReader()
    telemetry = Telemetry("target", trace.NoOpTracerProvider(), MeterProvider(metric_readers=[reader]), tracing=False)
    running = start_model_service(loop, "target", engines["target"], telemetry=telemetry)
    requests: queue.Queue = queue.Queue()
    try:
        with grpc.insecure_channel(running.address) as channel:
            call = session_pb2_grpc.TargetServiceStub(channel).Session(iter(requests.get, None))
            requests.put(session_pb2.TargetRequest(open=session_pb2.OpenSession(capacity=64)))
            next(call)
            requests.put(session_pb2.TargetRequest(score=session_pb2.ScoreCommand(token_ids=[1, 2, 3], num_scored=1)))
            next(call)
            exported = {prometheus_name(m): m for rm in reader.get_metrics_data().resource_metrics
                        for sm in rm.scope_metrics for m in sm.metrics}  # fmt: skip
            requests.put(None)
            call.cancel()
    finally:
        loop.run(running.server.stop(0))
        running.servicer.close()
    for rule in adapter_rules():
        series = rule["seriesQuery"].split("{")[0]
        base = series.removesuffix("_count")  # a histogram's count: the metric is the histogram
        assert series in exported or (base != series and base in exported), (series, sorted(exported))

    def value(name):
        return exported[name].data.data_points[0]

    assert value("specdec_sessions_active").value == 1
    assert 0 < value("specdec_kv_utilization_ratio").value <= 1
    assert value("specdec_tokens_total").value == 3
    assert value("specdec_queue_duration_seconds").count == 1
