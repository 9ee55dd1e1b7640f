"""What tracing costs: tokens/s with every span and metric exported over OTLP, against the same
stack with telemetry off, measured side by side in one run.

    python -m specdec.tools.tracing_overhead [--rounds 5] [--max-tokens 64]

Two stacks of real processes (draft, target, orchestrator) serve the default model; one exports
to a local OTLP receiver. Requests alternate between them (ABBA order each round), so drift of the
machine hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from specdec import serve
from specdec.client import stream
from specdec.tools.otlp_sink import OtlpSink
from specdec.v1 import generate_pb2

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "List three uses of Python.",
    "What causes the seasons on Earth?",
]


def tokens_per_second(address: str, prompt: str, max_tokens: int, k: int) -> tuple[float, int]:
    request = generate_pb2.GenerateRequest(
        prompt=prompt, chat=True, max_tokens=max_tokens, num_draft_tokens=k, ignore_eos=True
    )
    start = time.perf_counter()
    with open("/dev/null", "w") as sink:
        last = stream(address, request, out=sink)
    return last.stats.completion_tokens / (time.perf_counter() - start), last.stats.completion_tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m specdec.tools.tracing_overhead", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--port", type=int, default=50071, help="first of six ports")
    args = parser.parse_args(argv)

    sink = OtlpSink()
    env_on = {**sink.env(), "OTEL_METRIC_EXPORT_INTERVAL": "5000"}  # export during the run, not after
    with tempfile.TemporaryFile("w+") as log:
        stacks = {
            "off": serve.start_all(serve.build_parser().parse_args(["--port", str(args.port)]), {}, log),
            "on": serve.start_all(serve.build_parser().parse_args(["--port", str(args.port + 3)]), env_on, log),
        }
        addresses = {"off": f"127.0.0.1:{args.port}", "on": f"127.0.0.1:{args.port + 3}"}
        try:
            for mode in ("off", "on"):  # warm-up
                tokens_per_second(addresses[mode], PROMPTS[0], 8, args.k)
            rates: dict[str, list[float]] = {"off": [], "on": []}
            for r in range(args.rounds):
                for prompt in PROMPTS:
                    for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                        rate, _ = tokens_per_second(addresses[mode], prompt, args.max_tokens, args.k)
                        rates[mode].append(rate)
                print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        finally:
            for procs in stacks.values():
                serve.stop_all(procs)  # the traced stack exports what it still holds
    sink.stop()
    off, on = statistics.mean(rates["off"]), statistics.mean(rates["on"])
    print(f"requests per mode: {len(rates['off'])} x {args.max_tokens} tokens, k = {args.k}, default model")
    print(f"tracing off: {off:.2f} tok/s   (median {statistics.median(rates['off']):.2f})")
    print(
        f"tracing on:  {on:.2f} tok/s   (median {statistics.median(rates['on']):.2f}), {sink.span_count()} spans exported"
    )
    print(f"on / off: {on / off:.3f}  (cost {100 * (1 - on / off):+.1f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
