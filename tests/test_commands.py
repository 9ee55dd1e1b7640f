"""The commands as users run them: real processes, flags from the environment, clean shutdown."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from tests.ttnn_emulator import process_env

PY = sys.executable


def run(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


@pytest.mark.parametrize(
    "module, variables",
    [
        (
            "draft_service",
            ["SPECDEC_DRAFT_MODEL", "SPECDEC_DRAFT_DTYPE", "SPECDEC_DRAFT_PORT", "SPECDEC_DRAFT_MAX_SESSIONS"],
        ),
        ("target_service", ["SPECDEC_TARGET_MODEL", "SPECDEC_TARGET_DTYPE", "SPECDEC_TARGET_PORT"]),
        ("orchestrator", ["SPECDEC_ORCHESTRATOR_DRAFT", "SPECDEC_ORCHESTRATOR_TARGET", "SPECDEC_ORCHESTRATOR_PORT"]),
    ],
)
def test_help_names_every_environment_variable(module, variables):
    result = run("-m", module, "--help")
    assert result.returncode == 0
    for variable in variables:
        assert variable in result.stdout


class Process:
    """A service process; learns its address from its 'listening on host:port' log line, and
    that it is ready from its 'ready: serving' one."""

    def __init__(self, args, env=None):
        self.proc = subprocess.Popen([PY, *args], stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.address = None
        self.listening = threading.Event()
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            match = re.search(r"listening on (\S+:\d+)", line)
            if match:
                self.address = match.group(1)
                self.listening.set()
            if "ready: serving on" in line:
                self.ready.set()
        self.listening.set()
        self.ready.set()

    def wait_listening(self, timeout=60) -> str:
        assert self.listening.wait(timeout) and self.address, "".join(self.lines)
        return self.address

    def wait_ready(self, timeout=120) -> str:
        assert self.ready.wait(timeout) and self.proc.poll() is None and self.address, "".join(self.lines)
        return self.address

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def test_three_processes_serve_a_generation_and_stop_cleanly(model_dirs):
    model = str(model_dirs["target"])
    # flags from the environment, as a container would set them
    target = Process(["-m", "target_service"], env={"SPECDEC_TARGET_MODEL": model, "SPECDEC_TARGET_DTYPE": "float64",
                                                    "SPECDEC_TARGET_PORT": "0", "SPECDEC_TARGET_HOST": "127.0.0.1"})  # fmt: skip
    draft = Process(["-m", "draft_service", "--model", str(model_dirs["layer_skip"]), "--dtype", "float64",
                     "--port", "0", "--host", "127.0.0.1"])  # fmt: skip
    processes = [target, draft]
    try:
        target_address, draft_address = target.wait_ready(), draft.wait_ready()
        orchestrator = Process(["-m", "orchestrator", "--target", target_address, "--draft", draft_address,
                                "--tokenizer", model, "--port", "0", "--host", "127.0.0.1"])  # fmt: skip
        processes.append(orchestrator)
        address = orchestrator.wait_ready()
        result = run("-m", "specdec.client", "--server", address, "--no-chat", "--max-tokens", "10", "w1 w2 w3")
        assert result.returncode == 0, result.stderr
        assert len(result.stdout.split()) >= 1  # the streamed words
        assert re.search(r"\[FINISH_REASON_(LENGTH|STOP)\] \d+ tokens", result.stderr), result.stderr
        assert any("session" in line and "closed; 0 active" in line for line in target.lines + draft.lines)
    finally:
        codes = [p.stop() for p in reversed(processes)]
    assert codes == [0] * len(processes)


def test_unknown_model_family_exits_with_a_clear_error(tmp_path, model_dirs):
    import shutil

    shutil.copytree(model_dirs["target"], tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    result = run("-m", "target_service", "--model", str(tmp_path / "m"), "--port", "0")
    assert result.returncode == 2
    assert "model_type 'gpt2' is not supported" in result.stderr


def test_the_ttnn_backend_without_ttnn_or_a_chip_exits_1_saying_why(model_dirs):
    result = run("-m", "draft_service", "--backend", "ttnn", "--device-id", "1", "--model", str(model_dirs["target"]),
                 "--port", "0")  # fmt: skip
    assert result.returncode == 1, result.stderr
    try:
        import ttnn  # noqa: F401  (on a TT-less host with ttnn: the device cannot be opened)

        assert "cannot open Tenstorrent device 1" in result.stderr
    except ImportError:
        assert "the ttnn backend needs the ttnn package: pip install ttnn==0.81.1" in result.stderr


def test_ttnn_services_on_two_emulated_devices_serve_greedy_equal_to_the_target_alone(tmp_path):
    """The README's TT commands as processes, on the ttnn emulator (tests/ttnn_emulator.py) with
    every chip hazard mode on: each service opens its own device, finds the leaky attention at
    start-up and takes the masked path, warms up, serves, and closes its device on SIGTERM."""
    from specdec.engine.torch_engine import TorchEngine
    from specdec.v1 import generate_pb2, generate_pb2_grpc
    from tests.tiny import greedy_reference, save_tile_sized_pair

    target_dir, draft_dir = save_tile_sized_pair(tmp_path)
    env = {**process_env(), "SPECDEC_CACHE": str(tmp_path / "cache")}
    common = ["--backend", "ttnn", "--max-seq-len", "128", "--max-sessions", "2", "--port", "0", "--host", "127.0.0.1"]
    target = Process(["-m", "target_service", "--device-id", "1", "--model", str(target_dir), *common], env)
    draft = Process(["-m", "draft_service", "--device-id", "0", "--model", str(draft_dir), *common], env)
    processes = [target, draft]
    try:
        target_address, draft_address = target.wait_ready(), draft.wait_ready()
        orchestrator = Process(["-m", "orchestrator", "--target", target_address, "--draft", draft_address,
                                "--tokenizer", str(target_dir), "--port", "0", "--host", "127.0.0.1"])  # fmt: skip
        processes.append(orchestrator)
        with grpc.insecure_channel(orchestrator.wait_ready()) as channel:
            request = generate_pb2.GenerateRequest(
                prompt_token_ids=[5, 3, 9, 2], max_tokens=24, num_draft_tokens=4, ignore_eos=True
            )
            responses = list(generate_pb2_grpc.GeneratorStub(channel).Generate(request, timeout=120))
        reference = TorchEngine.load(target_dir, dtype="float64")
        assert [t for r in responses for t in r.token_ids] == greedy_reference(reference, [5, 3, 9, 2], 24)
        assert responses[-1].stats.accepted_tokens > 0
    finally:
        codes = [p.stop() for p in reversed(processes)]
    assert codes == [0] * len(processes)
    for process, device in ((target, 1), (draft, 0)):
        log = "".join(process.lines)
        assert f"opened Tenstorrent device {device}" in log and "captured the draft and verify traces" in log
        assert "the causal kernel LEAKS past cur_pos" in log and "using the masked path" in log
        assert f"closed Tenstorrent device {device}" in log


def test_a_model_the_ttnn_ops_cannot_run_is_refused_with_exit_2(model_dirs):
    result = run("-m", "target_service", "--backend", "ttnn", "--model", str(model_dirs["target"]), "--port", "0",
                 env=process_env())  # fmt: skip
    assert result.returncode == 2
    assert "needs a head_dim that is a multiple of 32 (a tile), got 8" in result.stderr
    assert "closed Tenstorrent device 0" in result.stderr


def test_a_dtype_the_backend_cannot_run_is_refused_before_loading(model_dirs):
    result = run("-m", "target_service", "--backend", "ttnn", "--dtype", "float64", "--port", "0")
    assert result.returncode == 2
    assert "--dtype float64 is not one the ttnn backend runs: bfloat16, bfloat8_b" in result.stderr
    result = run("-m", "target_service", "--dtype", "bfloat8_b", "--port", "0")
    assert result.returncode == 2 and "not one the torch backend runs" in result.stderr


def test_started_in_any_order_on_one_unconverted_gguf_all_three_serve(tmp_path):
    """The orchestrator first (it waits: NOT_SERVING, Generate UNAVAILABLE naming the target), then
    the target and the draft at the same instant on one GGUF file not converted yet (they take
    turns converting it): all three reach SERVING, nothing crashes, and the output is the target's."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from specdec.engine.torch_engine import TorchEngine
    from specdec.v1 import generate_pb2, generate_pb2_grpc
    from tests.gguf_files import save_tiny_gguf
    from tests.servers import free_port
    from tests.tiny import greedy_reference

    gguf = str(save_tiny_gguf(tmp_path / "tiny.gguf", vocab_size=48))
    env = {"SPECDEC_CACHE": str(tmp_path / "cache")}
    target_port, draft_port = free_port(), free_port()
    common = ["--dtype", "float64", "--host", "127.0.0.1"]
    orchestrator = Process(["-m", "orchestrator", "--target", f"127.0.0.1:{target_port}", "--draft",
                            f"127.0.0.1:{draft_port}", "--tokenizer", gguf, "--port", "0", "--host", "127.0.0.1"], env)  # fmt: skip
    processes = [orchestrator]
    try:
        with grpc.insecure_channel(orchestrator.wait_listening()) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert (
                health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                == health_pb2.HealthCheckResponse.NOT_SERVING
            )
            generator = generate_pb2_grpc.GeneratorStub(channel)
            request = generate_pb2.GenerateRequest(prompt_token_ids=[3, 1, 4], max_tokens=12, ignore_eos=True)
            with pytest.raises(grpc.RpcError) as waiting:
                list(generator.Generate(request, timeout=10))
            assert waiting.value.code() == grpc.StatusCode.UNAVAILABLE
            assert waiting.value.details() == f"target service at 127.0.0.1:{target_port} is not reachable yet"

            processes += [
                Process(["-m", "target_service", "--model", gguf, "--port", str(target_port), *common], env),
                Process(["-m", "draft_service", "--model", gguf, "--port", str(draft_port), *common], env),
            ]
            for process in processes:
                process.wait_ready()
            deadline = time.monotonic() + 30
            while True:  # the draft is attached when it answers, maybe after the orchestrator is ready
                responses = list(generator.Generate(request, timeout=30))
                if responses[-1].stats.draft_tokens or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert responses[-1].stats.draft_tokens > 0
            assert (
                health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        # one conversion of the weights, one of the metadata (the orchestrator's tokenizer), no partials
        converted = sorted(p.name for p in (tmp_path / "cache" / "converted").iterdir())
        weights = converted[0]
        assert converted == sorted([weights, weights + ".lock", weights + "-metadata", weights + "-metadata.lock"])
        engine = TorchEngine.load(str(tmp_path / "cache" / "converted" / converted[0]), dtype="float64")
        assert [t for r in responses for t in r.token_ids] == greedy_reference(engine, [3, 1, 4], 12)
    finally:
        codes = [process.stop() if process.proc.poll() is None else process.proc.returncode for process in processes]
    assert codes == [0, 0, 0], "".join(line for p in processes for line in p.lines)
    assert not any("Traceback" in line for p in processes for line in p.lines)


def test_sigterm_drains_a_service_the_stream_in_flight_completes(model_dirs, engines):
    """SIGTERM to the target while a stream is in flight: health NOT_SERVING at once and new
    generations refused (UNAVAILABLE), the stream completes with the target-alone output, and
    the process exits 0 as soon as it has (well within --shutdown-grace)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from specdec.v1 import generate_pb2, generate_pb2_grpc
    from tests.tiny import greedy_reference

    model = str(model_dirs["target"])
    common = ["--dtype", "float64", "--port", "0", "--host", "127.0.0.1"]
    target = Process(["-m", "target_service", "--model", model, "--shutdown-grace", "60", *common])
    processes = [target]
    try:
        target_address = target.wait_ready()
        orchestrator = Process(["-m", "orchestrator", "--target", target_address, "--draft", "",
                                "--tokenizer", model, "--port", "0", "--host", "127.0.0.1"])  # fmt: skip
        processes.append(orchestrator)
        with grpc.insecure_channel(orchestrator.wait_ready()) as channel, grpc.insecure_channel(target_address) as t:
            generator = generate_pb2_grpc.GeneratorStub(channel)
            request = generate_pb2.GenerateRequest(prompt_token_ids=[3, 1, 4], max_tokens=1000, ignore_eos=True)
            stream = generator.Generate(request, timeout=120)
            output = list(next(stream).token_ids)
            signalled = time.monotonic()
            target.proc.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(t)
            deadline = time.monotonic() + 5
            while (
                health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                != health_pb2.HealthCheckResponse.NOT_SERVING
            ):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(grpc.RpcError) as refused:
                list(generator.Generate(generate_pb2.GenerateRequest(prompt_token_ids=[1], max_tokens=2), timeout=30))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "target service is shutting down" in refused.value.details()
            output += [t for r in stream for t in r.token_ids]
        assert output == greedy_reference(engines["target"], [3, 1, 4], 1000)
        assert target.proc.wait(30) == 0
        assert time.monotonic() - signalled < 30
    finally:
        for process in reversed(processes):
            if process.proc.poll() is None:
                process.stop()
