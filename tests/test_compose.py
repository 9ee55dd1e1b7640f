"""compose.yaml is valid (checked by Debian's docker-compose, which .ci/run installs) and wires the
services, health checks and Jaeger's OTLP port; the image build copies every package."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    if shutil.which("docker-compose") is None:
        if os.environ.get("SPECDEC_REQUIRE_COMPOSE"):
            pytest.fail("docker-compose is not installed (apt-get install docker-compose)")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose; .ci/run does)")
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose.yaml"), "config"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_names_the_services(compose):
    assert set(compose["services"]) == {"models", "draft", "target", "orchestrator", "jaeger"}


def test_model_services_scale_and_are_health_checked(compose):
    services = compose["services"]
    for role, port, service in (("draft", 50052, "DraftService"), ("target", 50053, "TargetService"),
                                ("orchestrator", 50051, "Generator")):  # fmt: skip
        spec = services[role]
        assert spec["command"] == ["python", "-m", role if role == "orchestrator" else f"{role}_service"]
        assert spec["healthcheck"]["test"] == ["CMD", "python", "-m", "specdec.healthcheck", f"localhost:{port}",
                                               f"specdec.v1.{service}"]  # fmt: skip
        assert spec["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        assert any(v.startswith("models:/models") for v in spec["volumes"])
    for role in ("draft", "target"):
        assert "ports" not in services[role]  # no fixed host port: `--scale` works
        assert services[role]["depends_on"]["models"]["condition"] == "service_completed_successfully"
    orchestrator = services["orchestrator"]
    assert orchestrator["environment"]["SPECDEC_ORCHESTRATOR_DRAFT"] == "dns:///draft:50052"
    assert orchestrator["environment"]["SPECDEC_ORCHESTRATOR_TARGET"] == "dns:///target:50053"
    assert {d: c["condition"] for d, c in orchestrator["depends_on"].items()} == {
        "draft": "service_healthy",
        "target": "service_healthy",
    }


def test_jaeger_takes_otlp(compose):
    jaeger = compose["services"]["jaeger"]
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert {p["target"] for p in jaeger["ports"]} >= {4317, 16686}


def test_health_check_command_tells_serving_from_down(stack):
    def check(*args):
        return subprocess.run([sys.executable, "-m", "specdec.healthcheck", *args], timeout=30).returncode

    assert check(stack.target.address, "specdec.v1.TargetService") == 0
    assert check(stack.orchestrator.address, "specdec.v1.Generator") == 0
    assert check(stack.target.address, "specdec.v1.NoSuchService") == 1
    assert check("127.0.0.1:1") == 1


def test_image_copies_every_package():
    (include,) = re.findall(r"^include = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), flags=re.M)
    packages = {p.strip(' "*') for p in include.split(",")}
    copied = set(re.findall(r"^COPY (\S+) ", (ROOT / "Dockerfile").read_text(), flags=re.M))
    assert packages and packages <= copied
