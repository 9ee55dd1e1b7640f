"""The benchmark's rows: tokens/s, speedup and its bounds, acceptance, all from the runs and the
measured step costs; written as a Markdown table, JSON and a plot."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from specdec.bench import concurrency
from specdec.bench.costs import Costs
from specdec.bench.runs import NGRAM, Run, label_dtype
from specdec.tally import Tally


@dataclass
class Row:
    engine: str
    target_dtype: str
    config: str
    sampling: str
    requests: int
    tokens_per_second: float  # completion tokens / request time, over all prompts
    steady_tokens_per_second: float  # after the first token: (tokens - 1) / (time - time to first token)
    speedup: float | None  # steady tokens/s over the same engine's target alone, same dtype and sampling
    alpha: float | None  # accepted / proposed
    tau: float | None  # tokens per target pass after the prefill
    mean_k: float | None
    acceptance_per_position: list[float]
    ttft_cold: float | None
    ttft_warm: float
    bound_turns: float | None  # tau T_token / (T_verify(k) + k T_draft)
    bound_overlap: float | None  # tau T_token / max(T_verify(k), k T_draft)
    efficiency: float | None  # speedup / bound_turns
    identical_to_alone: str | None  # greedy: prompts whose output equals the target alone's
    outside_share: float | None = None  # of a step, the time outside draft, verify and accept


def rows(runs: list[Run], costs: dict[tuple[str, str], Costs], overhead: dict[tuple[str, str, str], dict]) -> list[Row]:
    groups = defaultdict(list)
    for run in runs:
        groups[(run.engine, run.target_dtype, run.config, run.sampling)].append(run)
    # each engine against its own target alone: ours through the services, HF's in-process, llama.cpp's server
    alone = {key: _steady(v) for key, v in groups.items() if key[2] == ALONE_CONFIG[key[0]]}
    alone_tokens = {(r.target_dtype, r.prompt_id): r.token_ids for r in runs if r.engine == "specdec" and r.config == "target alone" and r.sampling == "greedy"}  # fmt: skip
    out = []
    for (engine, dtype, config, sampling), group in groups.items():
        steady = _steady(group)
        base = alone.get((engine, dtype, ALONE_CONFIG[engine], sampling))
        tally = Tally()
        for r in group:
            tally = tally.merge(r.tally())
        tau, mean_k = tally.tau, tally.mean_k
        speedup = steady / base if base else None
        cost_key = (dtype, sampling if engine == "specdec" and "overlap" not in config else "greedy")
        cost = costs.get(cost_key + (("ngram",) if config.startswith(NGRAM) else ()))
        bound_turns = bound_overlap = None
        if cost and mean_k and tau:
            # the target alone's whole time per token (its steps emit one token each)
            token_seconds = overhead.get((dtype, "target alone", sampling), {}).get("step_seconds", cost.decode)
            bound_turns = cost.bound_turns(tau, mean_k, token_seconds)
            bound_overlap = cost.bound_overlap(tau, mean_k, token_seconds)
        identical = None
        if sampling == "greedy" and engine == "specdec" and config != "target alone":
            same = sum(r.token_ids == alone_tokens.get((dtype, r.prompt_id)) for r in group)
            identical = f"{same}/{len(group)}"
        cold = [r.first_token_seconds for r in group if r.cold]
        out.append(
            Row(
                engine,
                dtype,
                config,
                sampling,
                len(group),
                tokens_per_second=sum(len(r.token_ids) for r in group) / sum(r.seconds for r in group),
                steady_tokens_per_second=steady,
                speedup=speedup,
                alpha=tally.alpha,
                tau=tau,
                mean_k=mean_k,
                acceptance_per_position=tally.acceptance_per_position(),
                ttft_cold=cold[0] if cold else None,
                ttft_warm=statistics.median(r.first_token_seconds for r in group if not r.cold)
                if len(group) > len(cold)
                else cold[0],
                bound_turns=bound_turns,
                bound_overlap=bound_overlap,
                efficiency=speedup / bound_turns if speedup and bound_turns else None,
                identical_to_alone=identical,
                outside_share=overhead.get((dtype, config, sampling), {}).get("outside_share"),
            )  # fmt: skip
        )
    return out


ALONE_CONFIG = {"specdec": "target alone", "hf": "hf target alone", "llama.cpp": "llama.cpp target alone"}


def _steady(group: list[Run]) -> float:
    return sum(len(r.token_ids) - 1 for r in group) / sum(r.seconds - r.first_token_seconds for r in group)


def _fmt(value, digits: int = 2, suffix: str = "") -> str:
    return "" if value is None else f"{value:.{digits}f}{suffix}"


def markdown(result: dict) -> str:
    lines = [
        f"# Speculative decoding benchmark: {result['pair']}",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {result['machine']}",
        f"- date: {result['date']}",
        f"- {result['prompts']} prompts, {result['max_tokens']} tokens each (EOS ignored), sampling t={result['temperature']}",
        "",
        "Speedup and efficiency use steady tokens/s (after the first token), the rate the bounds "
        "describe; tok/s is end to end. bound (turns) = tau T_token / (T_verify(k) + k T_draft), "
        "bound (overlap) = tau T_token / max(T_verify(k), k T_draft): the speedup if a step cost only "
        "its time on the devices, where T_verify and T_draft are measured inside the services (step "
        "costs below) and T_token is the target alone's whole time per token (device, gRPC, "
        "orchestrator), all in the same run. Efficiency = speedup / bound (turns) = the share of that "
        "ideal reached; 1 - efficiency is what gRPC and orchestration cost. Speedups are over the "
        "same engine's target alone (ours through the services, HF's in-process).",
        "",
    ]
    if not result["rows"]:  # the load runs only
        return "\n".join(lines[:7] + concurrency.markdown(result.get("load", []))) + "\n"
    lines += [
        "| engine | target | config | sampling | tok/s | speedup | bound (turns) | bound (overlap) | efficiency | alpha | tau | mean k | TTFT warm | TTFT cold | greedy = alone |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['engine']} | {r['target_dtype']} | {r['config']} | {r['sampling']} | {r['tokens_per_second']:.2f} | "
            f"{_fmt(r['speedup'], suffix='x')} | {_fmt(r['bound_turns'], suffix='x')} | {_fmt(r['bound_overlap'], suffix='x')} | "
            f"{_fmt(r['efficiency'])} | {_fmt(r['alpha'])} | {_fmt(r['tau'])} | {_fmt(r['mean_k'], 1)} | "
            f"{r['ttft_warm']:.2f} s | {_fmt(r['ttft_cold'], suffix=' s')} | {r['identical_to_alone'] or ''} |"
        )
    lines += ["", "## Step costs (medians, measured inside the services)", ""]
    lines += ["T_decode is the target's device time for one token (a verify with k = 0); c = T_draft / T_decode.", ""]
    lines += [
        "| target, sampling | T_decode | T_verify(k) / T_decode | T_draft per token | c | target prefill |",
        "|---|---|---|---|---|---|",
    ]
    for key, c in result["costs"].items():
        dtype = key.replace("|", ", ")
        verify = ", ".join(f"k={k}: {v * 1000:.0f} ms = {v / c['decode']:.2f}" for k, v in c["verify"].items())
        lines.append(
            f"| {dtype} | {c['decode'] * 1000:.0f} ms | {verify} | {c['draft_token'] * 1000:.0f} ms | {c['c']:.2f} | "
            f"{c['prefill_target'] * 1000:.0f} ms |"
        )
    lines += ["", "Draft replicas per target replica that keep both busy (k x T_draft / T_verify(k); the acceptance "
              "rate picks k: the best row above): "]  # fmt: skip
    for key, c in result["costs"].items():
        ratios = ", ".join(f"k={k}: {r:.2f}" for k, r in c.get("draft_replicas_per_target", {}).items())
        lines.append(f"- {key.replace('|', ', ')}: {ratios or 'no verify measured'}")
    lines += ["", "## Acceptance per draft position", ""]
    for r in result["rows"]:
        if r["acceptance_per_position"]:
            values = ", ".join(f"{a:.2f}" for a in r["acceptance_per_position"])
            lines.append(f"- {r['target_dtype']} {r['config']} {r['sampling']}: {values}")
    against_hf = versus_hf(result["rows"])
    if against_hf:  # not with --no-hf
        lines += ["", "## Against Hugging Face assisted generation (tokens/s, same prompts, same run)", ""]
        lines += [f"- {line}" for line in against_hf]
    if result.get("llama_cpp"):
        lines += ["", "## Against llama.cpp (tokens/s end to end, same GGUF files, prompts and run, greedy)", ""]
        lines += [f"- {line}" for line in versus_llama_cpp(result["rows"]) or [result["llama_cpp"]]]
    lines += by_prompt_kind(result["runs"])
    overhead = [r for r in result["rows"] if r["outside_share"] is not None and "overlap" not in r["config"]]
    if overhead:
        lines += ["", "## Time outside the engines", ""]
        for r in overhead:
            lines.append(
                f"- {r['target_dtype']} {r['config']} {r['sampling']}: {100 * r['outside_share']:.1f} % of a step"
            )
    if result.get("load"):
        lines += [""] + concurrency.markdown(result["load"])
    if result.get("divergences"):
        lines += ["", "## Greedy outputs that differ from the target alone", ""]
        for d in result["divergences"]:
            lines.append(
                f"- {d['target_dtype']} {d['config']} `{d['prompt_id']}`: first differs at token {d['position']} "
                f"({d['alone_token']} vs {d['spec_token']}); the target's top-2 logit gap there is {d['top2_gap']:.2e}"
            )
    return "\n".join(lines) + "\n"


def by_prompt_kind(runs: list[dict]) -> list[str]:
    """Greedy tokens/s end to end per prompt kind (the id's first word: code, prose, qa, edit), per
    engine, target and configuration: where a draft pays off, an n-gram one on edits above all."""
    greedy = [r for r in runs if r["sampling"] == "greedy"]
    kind_of = lambda r: r["prompt_id"].split("-")[0]  # noqa: E731
    kinds = sorted({kind_of(r) for r in greedy})
    if len(kinds) < 2:
        return []
    groups = defaultdict(list)
    for r in greedy:
        groups[(r["engine"], r["target_dtype"], r["config"])].append(r)

    def rate(group: list[dict]) -> str:
        return f"{sum(len(r['token_ids']) for r in group) / sum(r['seconds'] for r in group):.2f}" if group else ""

    lines = ["", "## Greedy tokens/s by prompt kind (end to end)", "",
             "| engine | target | config | " + " | ".join(kinds) + " | all |", "|---|---|---|" + "---|" * (len(kinds) + 1)]  # fmt: skip
    for (engine, dtype, config), group in groups.items():
        per_kind = [rate([r for r in group if kind_of(r) == kind]) for kind in kinds]
        lines.append(f"| {engine} | {dtype} | {config} | " + " | ".join(per_kind) + f" | {rate(group)} |")
    return lines


def versus_hf(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["engine"] != "hf" or r["config"] != "hf assisted":
            continue
        # ours may say "bfloat16 on ttnn": HF's in-process run has the dtype alone
        ours = [x for x in rows if x["engine"] == "specdec" and label_dtype(x["target_dtype"]) == r["target_dtype"]
                and x["sampling"] == r["sampling"] and x["config"] != "target alone"]  # fmt: skip
        if ours:
            best = max(ours, key=lambda x: x["tokens_per_second"])
            out.append(
                f"{r['target_dtype']} {r['sampling']}: specdec {best['config']} {best['tokens_per_second']:.2f} tok/s, "
                f"HF assisted {r['tokens_per_second']:.2f} tok/s: {best['tokens_per_second'] / r['tokens_per_second']:.2f}x"
            )
    return out


def versus_llama_cpp(rows: list[dict]) -> list[str]:
    """Our target alone against llama.cpp's, and our best against llama.cpp's best (alone or its
    own speculation), over every target dtype we ran."""
    theirs = [r for r in rows if r["engine"] == "llama.cpp" and r["sampling"] == "greedy"]
    ours = [r for r in rows if r["engine"] == "specdec" and r["sampling"] == "greedy"]
    if not theirs or not ours:
        return []
    their_alone = next((r for r in theirs if r["config"] == ALONE_CONFIG["llama.cpp"]), None)
    their_best = max(theirs, key=lambda r: r["tokens_per_second"])
    our_best = max(ours, key=lambda r: r["tokens_per_second"])
    lines = []
    for r in (x for x in ours if x["config"] == "target alone"):
        if their_alone:
            lines.append(f"specdec target alone ({r['target_dtype']}) {r['tokens_per_second']:.2f} tok/s, llama.cpp "
                         f"target alone {their_alone['tokens_per_second']:.2f}: "
                         f"{r['tokens_per_second'] / their_alone['tokens_per_second']:.2f}x")  # fmt: skip
    for r in theirs:
        if r["config"] != ALONE_CONFIG["llama.cpp"]:
            drafts = "no drafts proposed" if r["alpha"] is None else f"{100 * r['alpha']:.0f} % of drafts accepted"
            lines.append(f"{r['config']}: {r['tokens_per_second']:.2f} tok/s, {drafts}")
    lines.append(f"best: specdec {our_best['config']} ({our_best['target_dtype']}) {our_best['tokens_per_second']:.2f} "
                 f"tok/s, {their_best['config']} {their_best['tokens_per_second']:.2f}: "
                 f"{our_best['tokens_per_second'] / their_best['tokens_per_second']:.2f}x")  # fmt: skip
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_alpha) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (dtype, sampling), rs in _by_series(result["rows"]).items():
        rs = sorted(rs, key=lambda r: r["mean_k"])
        ks = [r["mean_k"] for r in rs]
        line = ax_speed.plot(ks, [r["speedup"] for r in rs], "o-", label=f"{dtype} {sampling}")[0]
        ax_speed.plot(ks, [r["bound_turns"] for r in rs], "--", color=line.get_color(), alpha=0.6)
        ax_alpha.plot(ks, [r["alpha"] for r in rs], "o-", color=line.get_color(), label=f"{dtype} {sampling}")
    ax_speed.axhline(1.0, color="grey", lw=0.8)
    ax_speed.set(
        xlabel="k (mean k for adaptive)", ylabel="speedup over the target alone", title="speedup (dashed: bound, turns)"
    )
    ax_alpha.set(xlabel="k", ylabel="alpha = accepted / proposed", title="acceptance", ylim=(0, 1))
    ax_speed.legend()
    ax_alpha.legend()
    fig.suptitle(result["pair"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _by_series(rows: list[dict]) -> dict:
    series = defaultdict(list)
    for r in rows:
        if r["engine"] == "specdec" and r["mean_k"] and r["speedup"] and "overlap" not in r["config"]:
            series[(r["target_dtype"], r["sampling"])].append(r)
    return series


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "README.md").write_text(markdown(result))
    if result["rows"]:
        plot(result, out / "speedup.png")
    if result.get("load"):
        concurrency.plot(result["load"], out / "concurrency.png", result["pair"])


def as_dicts(items) -> list[dict]:
    return [asdict(item) for item in items]
