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
    env = {e["name"]: e["value"] for e in container["env"]}

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
        e["name"]: e["value"]
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
