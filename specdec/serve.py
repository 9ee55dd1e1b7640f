"""Starts the draft, target and orchestrator services locally, each in its own process.

    python -m specdec.serve                          # serve until Ctrl-C
    python -m specdec.serve --prompt "Hello"         # serve, stream one generation, stop

Defaults: target = the default model in float32, draft = the same weights in bfloat16.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from specdec import client
from specdec.healthcheck import is_serving
from specdec.models import DEFAULT_MODEL
from specdec.v1 import generate_pb2


def wait_serving(address: str, process: subprocess.Popen, timeout: float) -> None:
    """Waits until the gRPC health service at `address` answers SERVING."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the process serving {address} exited with code {process.returncode}")
        if is_serving(address, timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{address} was not serving after {timeout:.0f} s")


def launch(module: str, port: int, flags: list[str], env: dict[str, str] | None = None, log=None,
           timeout: float = 300.0, cpus: str | None = None) -> subprocess.Popen:  # fmt: skip
    """Starts `python -m module` on 127.0.0.1:port, with `env` added to this process's
    environment and its logs in `log` (a file; default this process's stderr), pinned to `cpus`
    (taskset's list syntax) if given; waits until it serves."""
    command = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port), *flags]
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    proc = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=log, stderr=log)
    wait_serving(f"127.0.0.1:{port}", proc, timeout)
    return proc


def start_all(args, env: dict[str, str] | None = None, log=None) -> list[subprocess.Popen]:
    """Starts draft, target and orchestrator on args.port + 1, + 2 and args.port."""
    draft_port, target_port = args.port + 1, args.port + 2
    seq = ["--max-seq-len", str(args.max_seq_len)]
    procs = []
    try:
        procs.append(launch("draft_service", draft_port, ["--model", args.draft_model, "--dtype", args.draft_dtype, *seq],
                            env, log, args.start_timeout))  # fmt: skip
        procs.append(launch("target_service", target_port, ["--model", args.target_model, "--dtype", args.target_dtype,
                            *seq], env, log, args.start_timeout))  # fmt: skip
        draft = "" if args.no_draft else f"127.0.0.1:{draft_port}"
        flags = ["--target", f"127.0.0.1:{target_port}", "--draft", draft, "--tokenizer", args.target_model]
        procs.append(launch("orchestrator", args.port, flags, env, log, args.start_timeout))
    except BaseException:
        stop_all(procs)
        raise
    return procs


def stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m specdec.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", help="stream one generation of this prompt, then stop")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--num-draft-tokens", "-k", type=int, default=0, help="0 = the orchestrator's default")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--target-model", default=DEFAULT_MODEL)
    parser.add_argument("--target-dtype", default="float32")
    parser.add_argument("--draft-model", default=DEFAULT_MODEL)
    parser.add_argument("--draft-dtype", default="bfloat16")
    parser.add_argument("--no-draft", action="store_true", help="target alone, no speculation")
    parser.add_argument("--port", type=int, default=50051, help="orchestrator port; draft and target take the next two")
    parser.add_argument("--max-seq-len", type=int, default=4096)
    parser.add_argument("--start-timeout", type=float, default=300.0)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    procs = start_all(args)
    try:
        if args.prompt is None:
            print(f"serving Generate on 127.0.0.1:{args.port}; Ctrl-C stops", file=sys.stderr)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            while all(proc.poll() is None for proc in procs):
                time.sleep(0.5)
            return 1  # a service died
        request = generate_pb2.GenerateRequest(
            prompt=args.prompt, chat=True, max_tokens=args.max_tokens, num_draft_tokens=args.num_draft_tokens,
            sampling=generate_pb2.SamplingParams(temperature=args.temperature),
        )  # fmt: skip
        start = time.perf_counter()
        last = client.stream(f"127.0.0.1:{args.port}", request)
        client.print_summary(last, time.perf_counter() - start)
        return 0
    finally:
        stop_all(procs)


if __name__ == "__main__":
    raise SystemExit(main())
