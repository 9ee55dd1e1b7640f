"""Soak test: many concurrent clients against the three services as real processes, for minutes.

    python -m specdec.tools.soak --streams 50 --minutes 5 [--out soak.json]

The draft, target and orchestrator start with specdec.serve's launcher (logs to a file, named in
the report), with room for every stream. First, each prompt's greedy output from the target alone
is recorded, one request at a time. Then N client loops share one channel until the time is up,
each picking at random (seeded) among: a greedy request, a sampled one (t=0.8, top_p 0.95, a seed),
one it cancels after a few responses, and a bad input that must get INVALID_ARGUMENT. Greedy
outputs are compared with the reference; any status other than the expected one is "unexpected".

The target alone: the orchestrator is started with default k 0, so a request that leaves
num_draft_tokens at 0 runs plain target decodes and opens no draft stream; load requests ask for
k explicitly (--num-draft-tokens, default 4, the orchestrator's usual default).

RSS (VmRSS of each process) is sampled every second. Warm-up is the first 20 % of the run: by then
the KV pool, allocator arenas and gRPC buffers have reached their working size, and a 5-minute
run keeps 4 minutes to show a leak. Growth = mean RSS over the last
10 % of the run / RSS at the end of warm-up - 1; flat is growth < 5 %. In runs under a couple of
minutes warm-up noise dominates: --no-rss-check leaves the RSS condition out (the growth is still
reported).

Exit 0 only if no status was unexpected, no greedy output differed, both services were back to 0
sessions at the end and (unless --no-rss-check) every process's RSS was flat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from subprocess import Popen

import grpc

from specdec import serve
from specdec.v1 import generate_pb2, generate_pb2_grpc, session_pb2, session_pb2_grpc

PROMPTS = [
    "Write a haiku about rivers.",
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that reverses a linked list.",
    "List three uses of a hash table.",
    "What is the capital of France, and why is it famous?",
    "Translate 'good morning, friends' into Spanish and German.",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "Give me a SQL query that counts orders per customer.",
]
KINDS = ("greedy", "sampled", "cancelled", "bad_input")
EXPECTED = {"greedy": "OK", "sampled": "OK", "cancelled": "CANCELLED", "bad_input": "INVALID_ARGUMENT"}
SERVICES = ("draft_service", "target_service", "orchestrator")
MAX_TOKENS_LIMIT = 4096  # set on the orchestrator, so that one more is a known bad input
RSS_FLAT = 0.05
KEPT_EXAMPLES = 10
# A hung request becomes DEADLINE_EXCEEDED (unexpected) instead of a hung soak. Generous: at 50
# streams on 2 cores a request waits its turn in passes shared by all (~90 s for 32 tokens).
REQUEST_TIMEOUT = 600.0
SESSIONS_WAIT = 5.0


@dataclass
class Report:
    streams: int
    log_path: str
    rss_check: bool
    drafting: bool = True  # the load's requests ask for k > 0
    seconds: float = 0.0  # the load: from its start until the last request in flight ended
    # kind -> status name -> requests
    outcomes: dict[str, dict[str, int]] = field(default_factory=lambda: {kind: {} for kind in KINDS})
    unexpected: int = 0
    unexpected_examples: list[dict] = field(default_factory=list)
    greedy_checked: int = 0
    greedy_mismatched: int = 0
    mismatch_examples: list[dict] = field(default_factory=list)
    tokens: int = 0  # streamed to the clients, cancelled requests' included
    drafted: int = 0  # draft tokens proposed in completed requests: 0 would mean the draft silently dropped out
    accepted: int = 0
    rss: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: {s: [] for s in SERVICES})
    sessions_at_end: dict[str, int] = field(default_factory=dict)
    exited: dict[str, int] = field(default_factory=dict)  # service -> exit code, for one that died mid-run

    def completed(self, kind: str) -> int:
        return self.outcomes[kind].get(EXPECTED[kind], 0)

    @property
    def requests(self) -> int:
        return sum(sum(counts.values()) for counts in self.outcomes.values())

    @property
    def rss_growth(self) -> dict[str, float | None]:
        return {service: rss_growth(series, self.seconds) for service, series in self.rss.items()}

    def failures(self) -> list[str]:
        failed = [f"{service} exited with code {code}" for service, code in self.exited.items()]
        if self.unexpected:
            failed.append(f"{self.unexpected} unexpected statuses")
        if self.drafting and not self.drafted and self.completed("greedy") + self.completed("sampled"):
            failed.append("no request drafted: the draft was never used")
        if self.greedy_mismatched:
            failed.append(f"{self.greedy_mismatched} greedy outputs differ from the target alone")
        if any(self.sessions_at_end.get(role) != 0 for role in ("draft", "target")):
            failed.append(f"sessions still open at the end: {self.sessions_at_end}")
        for service, growth in self.rss_growth.items() if self.rss_check else ():
            if growth is None or growth >= RSS_FLAT:
                failed.append(f"{service} RSS grew {'?' if growth is None else f'{growth:.1%}'}")
        return failed

    def as_dict(self) -> dict:
        return {**asdict(self), "rss_growth": self.rss_growth, "failures": self.failures()}

    def text(self) -> str:
        lines = [f"soak: {self.streams} streams for {self.seconds:.1f} s; service logs in {self.log_path}"]
        for kind in KINDS:
            others = ", ".join(f"{code} {n}" for code, n in self.outcomes[kind].items() if code != EXPECTED[kind])
            lines.append(
                f"  {kind:<10} {self.completed(kind):>6} {EXPECTED[kind]}" + (f" ({others})" if others else "")
            )
        lines.append(f"  unexpected statuses: {self.unexpected}")
        lines += [f"    {e['kind']}: {e['code']}: {e['details']}" for e in self.unexpected_examples]
        lines.append(f"  greedy outputs checked {self.greedy_checked}, mismatched {self.greedy_mismatched}")
        lines.append(f"  draft tokens proposed {self.drafted}, accepted {self.accepted}")
        lines.append(f"  RSS MiB        {'start':>8} {'warm':>8} {'end':>8}  growth  MiB/min in each fifth of the run")
        for service, series in self.rss.items():
            growth = self.rss_growth[service]
            values = [series[0][1], warm_rss(series, self.seconds) or 0, series[-1][1]] if series else [0, 0, 0]
            mib = " ".join(f"{v / 2**20:8.1f}" for v in values)
            slopes = " ".join(f"{v:+.0f}" for v in rss_slopes(series, self.seconds))
            lines.append(f"  {service:<14} {mib}  {'-' if growth is None else f'{growth:+.1%}'}  {slopes}")
        lines.append(f"  sessions at the end: {self.sessions_at_end}")
        seconds = self.seconds or 1.0
        lines.append(f"  {self.requests / seconds:.2f} requests/s, {self.tokens / seconds:.1f} tokens/s")
        failed = self.failures()
        lines.append("PASS" if not failed else "FAIL: " + "; ".join(failed))
        return "\n".join(lines)


def warm_rss(series: list[tuple[float, int]], seconds: float) -> int | None:
    """RSS at the end of warm-up: the first sample at or after 20 % of the run."""
    return next((rss for t, rss in series if t >= 0.2 * seconds), None)


def rss_growth(series: list[tuple[float, int]], seconds: float) -> float | None:
    warm, tail = warm_rss(series, seconds), [rss for t, rss in series if t >= 0.9 * seconds]
    return statistics.mean(tail) / warm - 1 if warm and tail else None


def rss_slopes(series: list[tuple[float, int]], seconds: float, parts: int = 5) -> list[float]:
    """MiB per minute between the first and last sample of each fifth of the run: a leak keeps its
    slope, a working set still filling up (caches, allocator pools) flattens."""
    slopes = []
    for i in range(parts):
        window = [(t, rss) for t, rss in series if i * seconds / parts <= t <= (i + 1) * seconds / parts]
        if len(window) >= 2 and window[-1][0] > window[0][0]:
            (t0, r0), (t1, r1) = window[0], window[-1]
            slopes.append((r1 - r0) / 2**20 / ((t1 - t0) / 60))
    return slopes


def read_rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            line = next((line for line in status if line.startswith("VmRSS:")), None)
    except OSError:  # the process is gone
        return None
    return int(line.split()[1]) * 1024 if line else None


async def sample_rss(procs: dict[str, Popen], report: Report, start: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        now = round(time.monotonic() - start, 2)
        for service, proc in procs.items():
            rss = read_rss(proc.pid)
            if rss is not None:
                report.rss[service].append((now, rss))
            if proc.poll() is not None:  # the client loops stop too: every request would fail at once
                report.exited[service] = proc.returncode
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass


def good_request(prompt: str, max_tokens: int, k: int, params=None) -> generate_pb2.GenerateRequest:
    # ignore_eos: every request runs its whole budget, so tokens/s and the greedy check stay comparable
    return generate_pb2.GenerateRequest(
        prompt=prompt, chat=True, max_tokens=max_tokens, num_draft_tokens=k, sampling=params, ignore_eos=True
    )


def bad_requests(prompt: str, vocab_size: int) -> list[generate_pb2.GenerateRequest]:
    """One per rule of orchestrator/validation.py. max_tokens is a uint32, so a negative one cannot
    even be encoded; 0 is its low edge."""
    return [
        good_request(prompt, 0, 0),
        good_request(prompt, MAX_TOKENS_LIMIT + 1, 0),
        generate_pb2.GenerateRequest(prompt_token_ids=[1, vocab_size], max_tokens=8),
        good_request(prompt, 8, 0, generate_pb2.SamplingParams(temperature=-1.0)),
        good_request(prompt, 8, 0, generate_pb2.SamplingParams(temperature=0.8, top_p=1.5)),
        generate_pb2.GenerateRequest(max_tokens=8),  # empty prompt
    ]


async def generate(stub, request, cancel_after: int = 0) -> tuple[str, str, list[int], generate_pb2.GenerationStats]:
    """-> (status name, details, streamed token ids, the last response's stats); cancels after
    `cancel_after` responses if > 0."""
    call = stub.Generate(request, timeout=REQUEST_TIMEOUT)
    tokens, responses, stats = [], 0, generate_pb2.GenerationStats()
    try:
        async for response in call:
            tokens += response.token_ids
            stats = response.stats
            responses += 1
            if responses == cancel_after:
                call.cancel()
                break
    except grpc.aio.AioRpcError as e:
        return e.code().name, e.details() or "", tokens, stats
    return (await call.code()).name, await call.details() or "", tokens, stats


async def greedy_references(stub, prompts: list[str], max_tokens: int) -> list[list[int]]:
    references = []
    for prompt in prompts:  # one at a time: nothing else runs beside it
        code, details, tokens, _ = await generate(stub, good_request(prompt, max_tokens, 0))
        if code != "OK":
            raise RuntimeError(f"the greedy reference for {prompt!r} failed: {code}: {details}")
        references.append(tokens)
    return references


async def client_loop(stub, rng: random.Random, deadline: float, args, prompts, references, vocab, report) -> None:
    while time.monotonic() < deadline and not report.exited:
        kind, index = rng.choice(KINDS), rng.randrange(len(prompts))
        request, cancel_after = good_request(prompts[index], args.max_tokens, args.num_draft_tokens), 0
        if kind == "sampled":
            request.sampling.CopyFrom(
                generate_pb2.SamplingParams(temperature=0.8, top_p=0.95, seed=rng.randrange(2**32))
            )
        elif kind == "cancelled":
            cancel_after = rng.randint(1, 4)
        elif kind == "bad_input":
            request = rng.choice(bad_requests(prompts[index], vocab))
        code, details, tokens, stats = await generate(stub, request, cancel_after)
        report.tokens += len(tokens)
        report.drafted += stats.draft_tokens
        report.accepted += stats.accepted_tokens
        report.outcomes[kind][code] = report.outcomes[kind].get(code, 0) + 1
        # a stream that ended before its cancel point was never cancelled: OK is right for it
        if code != EXPECTED[kind] and not (kind == "cancelled" and code == "OK"):
            report.unexpected += 1
            keep(report.unexpected_examples, {"kind": kind, "code": code, "details": details})
        if kind == "greedy" and code == "OK":
            report.greedy_checked += 1
            if tokens != references[index]:
                report.greedy_mismatched += 1
                keep(report.mismatch_examples, {"prompt": prompts[index], "got": tokens, "want": references[index]})


def keep(examples: list[dict], example: dict) -> None:
    if len(examples) < KEPT_EXAMPLES:  # the first few say what went wrong; thousands would say nothing more
        examples.append(example)


def address(proc: Popen) -> str:
    return f"127.0.0.1:{proc.args[proc.args.index('--port') + 1]}"


async def session_counts(procs: dict[str, Popen], timeout: float) -> dict[str, int]:
    """Polls both services' GetInfo until neither holds a session, for up to `timeout` seconds
    (a cancelled request's sessions close a moment after the client has moved on)."""
    stubs = {"draft": session_pb2_grpc.DraftServiceStub, "target": session_pb2_grpc.TargetServiceStub}
    channels = {role: grpc.aio.insecure_channel(address(procs[f"{role}_service"])) for role in stubs}
    try:
        deadline = time.monotonic() + timeout
        while True:
            counts = {}
            for role, stub in stubs.items():
                info = await stub(channels[role]).GetInfo(session_pb2.GetInfoRequest(), timeout=5)
                counts[role] = info.active_sessions
            if not any(counts.values()) or time.monotonic() > deadline:
                return counts
            await asyncio.sleep(0.1)
    finally:
        await asyncio.gather(*(channel.close() for channel in channels.values()))


async def soak(args, prompts: list[str], procs: dict[str, Popen], report: Report) -> None:
    async with grpc.aio.insecure_channel(address(procs["orchestrator"])) as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        async with grpc.aio.insecure_channel(address(procs["target_service"])) as target:
            info = await session_pb2_grpc.TargetServiceStub(target).GetInfo(session_pb2.GetInfoRequest(), timeout=10)
        references = await greedy_references(stub, prompts, args.max_tokens)
        start, stop, seeds = time.monotonic(), asyncio.Event(), random.Random(args.seed)
        sampler = asyncio.create_task(sample_rss(procs, report, start, stop))
        deadline = start + duration(args)
        await asyncio.gather(
            *(client_loop(stub, random.Random(seeds.getrandbits(64)), deadline, args, prompts, references,
                          info.vocab_size, report) for _ in range(args.streams))
        )  # fmt: skip
        report.seconds = time.monotonic() - start
        stop.set()
        await sampler
    report.sessions_at_end = await session_counts(procs, SESSIONS_WAIT)


def service_env(streams: int) -> dict[str, str]:
    # A cancelled request's sessions close a moment after its client moves on to the next request,
    # so one stream can briefly hold two: room for two per stream, RESOURCE_EXHAUSTED never due.
    sessions = str(2 * streams + 2)
    return {
        **{f"SPECDEC_{role}_MAX_SESSIONS": sessions for role in ("DRAFT", "TARGET", "ORCHESTRATOR")},
        "SPECDEC_ORCHESTRATOR_NUM_DRAFT_TOKENS": "0",  # num_draft_tokens 0 = the target alone
        "SPECDEC_ORCHESTRATOR_MAX_TOKENS_LIMIT": str(MAX_TOKENS_LIMIT),
        "PYTHONUNBUFFERED": "1",  # the log file shows a failure as it happens
    }


def serve_args(args) -> argparse.Namespace:
    """specdec.serve's own arguments, so start_all sees every default it expects."""
    return serve.build_parser().parse_args(
        ["--target-model", args.target_model, "--target-dtype", args.target_dtype, "--draft-model", args.draft_model,
         "--draft-dtype", args.draft_dtype, "--port", str(args.port), "--max-seq-len", str(args.max_seq_len),
         "--start-timeout", str(args.start_timeout)]
    )  # fmt: skip


def duration(args) -> float:
    return args.seconds if args.seconds is not None else args.minutes * 60


def run_soak(args) -> Report:
    """Starts the services, runs the soak, stops them however it ends; returns the report."""
    log_path = args.log or os.path.join(tempfile.gettempdir(), f"specdec-soak-{time.strftime('%Y%m%d-%H%M%S')}.log")
    report = Report(streams=args.streams, log_path=log_path, rss_check=args.rss_check,
                    drafting=args.num_draft_tokens > 0)  # fmt: skip
    with open(log_path, "a") as log:
        procs = serve.start_all(serve_args(args), service_env(args.streams), log)
        try:
            by_service = {next(s for s in SERVICES if s in proc.args): proc for proc in procs}
            asyncio.run(soak(args, args.prompt or PROMPTS, by_service, report))
        finally:
            serve.stop_all(procs)
    return report


def build_parser() -> argparse.ArgumentParser:
    serving = serve.build_parser().parse_args([])  # the same model defaults as specdec.serve
    parser = argparse.ArgumentParser(prog="python -m specdec.tools.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=8, help="concurrent client loops")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=5.0)
    length.add_argument("--seconds", type=float)
    parser.add_argument("--target-model", default=serving.target_model)
    parser.add_argument("--target-dtype", default=serving.target_dtype)
    parser.add_argument("--draft-model", default=serving.draft_model)
    parser.add_argument("--draft-dtype", default=serving.draft_dtype)
    # prompts and outputs are short; a full-length KV pool for 2 sessions a stream would not fit in memory
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--port", type=int, default=50161, help="orchestrator port; draft and target take the next two")
    parser.add_argument("--start-timeout", type=float, default=serving.start_timeout)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--num-draft-tokens", "-k", type=int, default=4, help="k of the load's requests")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable); default: a built-in list")
    parser.add_argument("--log", help="the services' log file; default: a new file in the temp directory")
    parser.add_argument("--out", help="write the report, RSS series included, as JSON here")
    parser.add_argument("--no-rss-check", dest="rss_check", action="store_false", help="report RSS, do not judge it")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    report = run_soak(args)
    print(report.text())
    if args.out:
        with open(args.out, "w") as out:
            json.dump(report.as_dict(), out, indent=1)
    return 0 if not report.failures() else 1


if __name__ == "__main__":
    sys.exit(main())
