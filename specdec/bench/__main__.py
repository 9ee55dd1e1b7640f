"""Benchmark: the target alone against speculation over gRPC (k fixed, adaptive, with overlap),
greedy and sampled, and Hugging Face assisted generation on the same pair, in one run.

    python -m specdec.bench                      # Qwen2.5-Coder 0.5B -> 1.5B, float32 and bfloat16 targets
    python -m specdec.bench --pair smollm2       # the default model, bfloat16 self-draft
    python -m specdec.bench --quick              # a smoke run: 3 prompts, 16 tokens, 1 and 2 sessions at once
    python -m specdec.bench --target DIR --draft DIR --target-dtypes float32
    python -m specdec.bench --pair smollm2 --concurrency 1,2,4,8,16 --sweep-only   # under load only
    python -m specdec.bench --backend llama.cpp --draft-method ngram   # GGUF on llama.cpp's kernels, n-gram draft

Writes README.md (tables), results.json (every raw figure), speedup.png and, with --concurrency,
concurrency.png to --out.
"""

# isort: off
import specdec.process_env  # noqa: F401  (first: before torch loads)
# isort: on

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

from specdec.bench import concurrency, report
from specdec.bench.concurrency import run_level
from specdec.bench.costs import measure_costs, spans_by_request, step_overhead
from specdec.bench.hf_peer import hf_runs
from specdec.bench.llama_cpp_peer import find_binaries, gguf_file, llama_cpp_runs
from specdec.bench.runs import (
    NGRAM,
    PORTS,
    SAMPLING_SEED,
    SAMPLING_TEMPERATURE,
    configs,
    load_configs,
    run_config,
    services,
    target_label,
)
from specdec.tools.otlp_sink import OtlpSink

PAIRS = {
    "qwen": ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "float32,bfloat16"),
    "smollm2": ("smollm2-135m", "smollm2-135m", "float32"),
}
PROMPTS = Path(__file__).with_name("prompts.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m specdec.bench", description=__doc__.split("\n")[0])
    p.add_argument("--pair", choices=list(PAIRS), default="qwen", help="a registered pair (see specdec.models)")
    p.add_argument("--target", help="target model (name, directory or .gguf); overrides --pair")
    p.add_argument("--draft", help="draft model; overrides --pair")
    p.add_argument("--tokenizer", help="default: the target")
    p.add_argument("--target-dtypes", help="comma-separated; default: the pair's")
    p.add_argument("--draft-dtype", help="default: bfloat16 on torch, gguf on llama.cpp")
    p.add_argument("--draft-method", choices=["model", "ngram", "both"], default="model",
                   help="ngram: the draft service's prompt lookup (no draft model); both: every configuration "
                   "with each draft, the n-gram ones named 'ngram ...'")  # fmt: skip
    p.add_argument("--ks", default="2,4,8", help="fixed k to try; adaptive goes up to the largest")
    p.add_argument("--overlap-k", type=int, default=4, help="k for the overlap configuration; 0 skips it")
    p.add_argument("--samplings", default="greedy,t=0.8")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=0, help="use the first N prompts; 0 = all")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face assisted generation")
    p.add_argument(
        "--no-llama-cpp", action="store_true", help="skip llama.cpp (run when scripts/build_llama_cpp.sh built it)"
    )
    p.add_argument("--quick", action="store_true", help="3 prompts, 16 tokens, k in {2, 4}: a smoke run")
    p.add_argument("--pin-cores", action="store_true", help="draft on CPU 0, target on CPU 1, one thread each")
    p.add_argument("--backend", choices=["torch", "llama.cpp", "ttnn"], default="torch",
                   help="both model services' backend; llama.cpp: scripts/build_llama_cpp.sh builds it; "
                   "ttnn: each service opens a device")  # fmt: skip
    p.add_argument("--draft-backend", choices=["torch", "llama.cpp"], help="the draft's, when not --backend's")
    p.add_argument("--draft-device-id", type=int, default=0, help="ttnn: the draft's Tenstorrent device")
    p.add_argument("--target-device-id", type=int, default=1, help="ttnn: the target's Tenstorrent device")
    p.add_argument("--concurrency", default="", help="comma-separated session counts to run at once (under load)")
    p.add_argument("--load-k", type=int, default=4, help="fixed k of the load runs (adaptive goes up to --ks' largest)")
    p.add_argument("--load-requests", type=int, default=6, help="requests per load level, at least 2 N")
    p.add_argument(
        "--load-rounds", type=int, default=1,
        help="split each N's requests into rounds, every configuration once per round (drift on a noisy machine "
        "then falls on all configurations alike); a round has at least N requests",
    )  # fmt: skip
    p.add_argument("--sweep-only", action="store_true", help="only the load runs, not the per-prompt ones")
    p.add_argument("--service-flags", default="", help="extra flags for both model services, e.g. '--prefill-chunk 32'")
    p.add_argument("--port", type=int, default=50200, help=f"first of {len(PORTS)} ports")
    p.add_argument("--out", default="results/bench", help="output folder")
    args = p.parse_args(argv)
    target, draft, dtypes = PAIRS[args.pair]
    args.target, args.draft = args.target or target, args.draft or draft
    args.tokenizer = args.tokenizer or args.target
    args.drafts = ("model", "ngram") if args.draft_method == "both" else (args.draft_method,)
    args.draft_backend = args.draft_backend or args.backend
    backend_dtype = {"ttnn": "bfloat16", "llama.cpp": "gguf"}
    args.target_dtypes = (args.target_dtypes or backend_dtype.get(args.backend, dtypes)).split(",")
    args.draft_dtype = args.draft_dtype or backend_dtype.get(args.draft_backend, "bfloat16")
    if args.quick:
        args.prompts, args.max_tokens, args.ks = args.prompts or 3, min(args.max_tokens, 16), "2,4"
        args.concurrency, args.load_requests = args.concurrency or "1,2", min(args.load_requests, 2)
        args.load_rounds = 2
    args.ks = [int(k) for k in args.ks.split(",")]
    args.concurrency = [int(n) for n in args.concurrency.split(",")] if args.concurrency else []
    args.samplings = args.samplings.split(",")
    return args


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    return (
        f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def device_flags(args) -> dict[str, list[str]]:
    """Extra flags per role: the device (ttnn), --service-flags, and room for the largest load level."""
    sessions = ["--max-sessions", str(max([16, *args.concurrency]))]
    extra = shlex.split(args.service_flags) + sessions
    common = {"orchestrator": sessions, "ngram draft": extra}  # the n-gram draft has no backend or device
    if args.backend != "ttnn":
        return {
            **common,
            "target": ["--backend", args.backend, *extra],
            "draft": ["--backend", args.draft_backend, *extra],
        }
    return {
        **common,
        **{
            role: ["--backend", "ttnn", "--device-id", str(device_id), *extra]
            for role, device_id in (("target", args.target_device_id), ("draft", args.draft_device_id))
        },
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from orchestrator.validation import encode_prompt
    from specdec.engine.loading import resolve_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer_dir(args.tokenizer))
    prompt_set = json.loads(PROMPTS.read_text())[: args.prompts or None]
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompts = [(p["id"], encode_prompt(tokenizer, p["prompt"], chat)) for p in prompt_set]
    plan = [] if args.sweep_only else configs(args.ks, args.samplings, args.overlap_k, args.drafts)
    load_plan = load_configs(args.load_k, max(args.ks), args.samplings, args.drafts[0]) if args.concurrency else []
    # level by level, every configuration at one N side by side (close in time on a noisy machine),
    # in rounds: (configuration, N, requests, the round's first request)
    levels = []
    for n in args.concurrency:
        per_round = max(-(-max(args.load_requests, 2 * n) // args.load_rounds), n)
        levels += [(config, n, per_round, r * per_round) for r in range(args.load_rounds) for config in load_plan]
    hf_dtypes = [d for d in args.target_dtypes if not d.startswith("gguf")]  # HF runs no GGUF weights as shipped
    hf_count = 0 if args.no_hf else 2 * len(args.samplings) * len(prompts) * len(hf_dtypes)
    per_dtype = len(plan) * len(prompts) + sum(count for _, _, count, _ in levels)
    llama_cpp, llama_cpp_note = llama_cpp_plan(args)
    print(f"llama.cpp peer: {llama_cpp_note}", file=sys.stderr)
    llama_cpp_count = len(prompts) * (1 + len(args.ks) * llama_cpp_drafts(llama_cpp, args)) if llama_cpp else 0
    total = len(args.target_dtypes) * per_dtype + hf_count + llama_cpp_count
    progress = tqdm(total=total, unit="request", file=sys.stderr)

    sink = OtlpSink()
    env = {**sink.env(), "OTEL_METRICS_EXPORTER": "none"}  # the services report step costs as spans
    runs, costs, overhead, divergences, level_runs = [], {}, {}, [], []
    max_seq_len = max(len(ids) for _, ids in prompts) + args.max_tokens + 32
    with tempfile.NamedTemporaryFile("w+", prefix="specdec-bench-", suffix=".log", delete=False) as log:
        for dtype in args.target_dtypes:
            label = target_label(dtype, args.backend)
            progress.set_description(f"target {label}")
            dtype_runs = []
            with services(args.target, args.draft, dtype, args.draft_dtype, args.tokenizer, args.port, env, log,
                          max_seq_len, args.pin_cores, device_flags(args), args.drafts) as addresses:  # fmt: skip
                for config in plan:
                    for i, (prompt_id, ids) in enumerate(prompts):
                        run = run_config(
                            addresses[config.orchestrator],
                            config,
                            label,
                            prompt_id,
                            ids,
                            args.max_tokens,
                            SAMPLING_SEED + i,
                        )
                        run.cold = not dtype_runs  # the target's first request: kernels not yet built
                        dtype_runs.append(run)
                        progress.update()
                rounds = []
                for config, n, count, first in levels:
                    progress.set_description(f"target {label}, {config.name} {config.sampling}, {n} at once")
                    rounds.append(
                        run_level(
                            addresses[config.orchestrator],
                            config,
                            label,
                            prompts,
                            n,
                            count,
                            args.max_tokens,
                            SAMPLING_SEED,
                            first,
                        )  # fmt: skip
                    )
                    progress.update(count)
                level_runs += concurrency.merge_rounds(rounds)
            # the services exported their last spans when they stopped
            if plan:
                dtype_costs, dtype_overhead = analyse(dtype_runs, spans_by_request(sink.spans), plan, args.samplings)
                costs.update({(label, *key): c for key, c in dtype_costs.items()})
                overhead.update({(label, *key): o for key, o in dtype_overhead.items()})
                greedy = [r for r in dtype_runs if r.sampling == "greedy"]
                reference = {r.prompt_id: r.token_ids for r in greedy if r.config == "target alone"}
                outputs = [(r.config, r.prompt_id, r.token_ids) for r in greedy if r.config != "target alone"]
                divergences += greedy_divergences(outputs, reference, dict(prompts), args, dtype, label)
            dtype_levels = [lv for lv in level_runs if lv.target_dtype == label and lv.sampling == "greedy"]
            if dtype_levels:  # under load: every greedy output against one session alone's
                reference = concurrency.alone_outputs(dtype_levels)
                outputs = [(f"{lv.config}, {lv.concurrency} at once", t.prompt_id, t.token_ids)
                           for lv in dtype_levels for t in lv.timings]  # fmt: skip
                divergences += greedy_divergences(outputs, reference, dict(prompts), args, dtype, label)
            runs += dtype_runs
            if not args.no_hf and dtype in hf_dtypes:
                progress.set_description(f"HF {dtype}")
                runs += hf_runs(
                    args.target, args.draft, dtype, args.draft_dtype, prompts, args.max_tokens, args.samplings, progress
                )
        if llama_cpp:
            progress.set_description("llama.cpp")
            runs += llama_cpp_runs(*llama_cpp, prompts, args.max_tokens, args.ks, max_seq_len,
                                   args.port + PORTS.index("llama.cpp"), log, progress, ngram="ngram" in args.drafts)  # fmt: skip
    progress.close()
    load_rows = concurrency.as_dicts(concurrency.level_rows(level_runs, spans_by_request(sink.spans)))
    sink.stop()

    result = {
        "pair": " and ".join(
            "n-gram draft" if d == "ngram" else f"{args.draft} ({args.draft_dtype})" for d in args.drafts
        )
        + f" -> {args.target}",
        "command": "python -m specdec.bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": machine() + (" (draft pinned to CPU 0, target to CPU 1, one thread each)" if args.pin_cores else ""),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "temperature": SAMPLING_TEMPERATURE,
        "costs": {"|".join(key): c.as_dict() for key, c in costs.items()},
        "rows": report.as_dicts(report.rows(runs, costs, overhead)),
        "divergences": divergences,
        "overhead": {"|".join(key): value for key, value in overhead.items()},
        "runs": [r.as_dict() for r in runs],
        "load": load_rows,
        "load_runs": [dataclasses.asdict(level) for level in level_runs],
        "service_log": log.name,
        "llama_cpp": llama_cpp_note,
    }
    out = Path(args.out)
    report.write(result, out)
    print(report.markdown(result))
    print(f"written to {out}/ (README.md, results.json, plots); service logs in {log.name}", file=sys.stderr)
    return 0


def llama_cpp_drafts(llama_cpp: tuple, args) -> int:
    """How many kinds of speculation llama.cpp's peer runs at each k: its draft model, its n-gram lookup."""
    return (llama_cpp[2] is not None) + ("ngram" in args.drafts)


def llama_cpp_plan(args) -> tuple[tuple | None, str]:
    """((binaries, target GGUF, draft GGUF or None), a note) when llama.cpp can run; (None, why not)."""
    if args.no_llama_cpp or args.sweep_only or args.backend == "ttnn":
        return None, "not run (--no-llama-cpp, --sweep-only or a device backend)"
    binaries = find_binaries()
    if binaries is None:
        return None, "not installed: scripts/build_llama_cpp.sh builds it (about 20 minutes on 2 cores)"
    target, draft = gguf_file(args.target), gguf_file(args.draft)
    if target is None:
        return None, f"not run: {args.target} has no GGUF file"
    return (binaries, target, draft), f"{binaries / 'llama-server'} on {target.name}" + (
        f" with draft {draft}" if draft else " (the draft has no GGUF file: target alone only)"
    )


def analyse(dtype_runs, by_request, plan, samplings):
    """Step costs per sampling mode and draft (keyed (sampling,) for the model draft, (sampling,
    "ngram") for the n-gram one), and each configuration's time outside the engines."""

    def spans_of(runs):
        return [s for r in runs for s in by_request.get(r.request_id, [])]

    costs, overhead = {}, {}
    for sampling in samplings:
        # costs from configurations that draft and verify in turns: with overlap the two share
        # the cores and each takes longer; a sampled verify also processes p
        measured = [r for r in dtype_runs if r.sampling == sampling and "overlap" not in r.config]
        alone = [r for r in measured if r.config == "target alone"]
        for key, drafted in (((sampling,), [r for r in measured if r.k and not r.config.startswith(NGRAM)]),
                             ((sampling, "ngram"), [r for r in measured if r.config.startswith(NGRAM)])):  # fmt: skip
            if drafted:
                costs[key] = measure_costs(spans_of(alone + drafted))
        for config in plan:
            config_runs = [r for r in dtype_runs if r.config == config.name and r.sampling == sampling]
            overhead[(config.name, sampling)] = step_overhead(spans_of(config_runs))
    return costs, overhead


def greedy_divergences(outputs: list[tuple[str, str, list[int]]], reference: dict[str, list[int]],
                       prompts: dict[str, list[int]], args, dtype: str, label: str) -> list[dict]:  # fmt: skip
    """Where a greedy output (config, prompt id, tokens) differs from the target alone's: the first
    differing position, and how close the target's two best logits were there, on the target's own
    backend (a near tie is where batched and single-row arithmetic may round apart)."""
    from specdec.engine.base import forward_one
    from specdec.engine.registry import EngineOptions, load_engine

    differing = [(c, p, t) for c, p, t in outputs if p in reference and t != reference[p]]
    if not differing:
        return []
    longest = max(len(prompts[p]) + len(reference[p]) for _, p, _ in differing)
    options = EngineOptions(args.target, dtype, max_seq_len=longest, max_sessions=1, max_draft_tokens=1)
    engine = load_engine("torch" if args.backend == "ttnn" else args.backend, options)  # no device opened here
    out = []
    for config, prompt_id, tokens in differing:
        expected = reference[prompt_id]
        i = next(i for i, (a, b) in enumerate(zip(expected, tokens)) if a != b)
        context = prompts[prompt_id] + expected[:i]
        session = engine.new_session(len(context))
        logits = forward_one(engine, session, context, 1).logits[0].float()
        engine.end_session(session)
        top2 = logits.topk(2).values
        out.append({"target_dtype": label, "config": config, "prompt_id": prompt_id, "position": i,
                    "alone_token": expected[i], "spec_token": tokens[i], "top2_gap": float(top2[0] - top2[1])})  # fmt: skip
    engine.close()
    return out


if __name__ == "__main__":
    raise SystemExit(main())
