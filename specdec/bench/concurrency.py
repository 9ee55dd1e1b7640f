"""The benchmark under load: N clients at once against the same services, for each configuration.

Each level keeps N requests in flight (a client starts its next request when one ends) until its
requests are done. Reported per configuration and N: aggregate tokens/s (all tokens over the
level's wall time), per-session tokens/s, TTFT and time per output token (p50, p99), how many
sessions and rows the target's passes carried (from the services' spans), and speculation's ratio
over the target alone at the same N, beside its bound from the measured pass costs.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import grpc

from specdec.bench.runs import Config, timed_request
from specdec.tally import Tally
from specdec.tools.otlp_sink import Span
from specdec.v1 import generate_pb2_grpc


@dataclass
class Timing:
    request_id: str
    prompt_id: str
    token_ids: list[int]
    tokens: int
    seconds: float
    first_token_seconds: float
    tally: Tally


@dataclass
class LevelRun:
    target_dtype: str
    config: str
    sampling: str
    k: int
    concurrency: int
    wall_seconds: float
    timings: list[Timing] = field(default_factory=list)


def run_level(address: str, config: Config, target_dtype: str, prompts: list[tuple[str, list[int]]],
              concurrency: int, num_requests: int, max_tokens: int, seed: int, first: int = 0) -> LevelRun:  # fmt: skip
    """num_requests requests, concurrency at a time, prompts in turn from the first-th; seeds
    seed + first, seed + first + 1, ..."""
    with grpc.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)

        def one(i: int) -> Timing:
            prompt_id, ids = prompts[i % len(prompts)]
            tokens, seconds, first, last = timed_request(stub, config.request(ids, max_tokens, seed + i))
            return Timing(last.request_id, prompt_id, tokens, len(tokens), seconds, first, Tally.from_stats(last.stats))

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            timings = list(pool.map(one, range(first, first + num_requests)))
        wall = time.perf_counter() - start
    return LevelRun(target_dtype, config.name, config.sampling, config.k, concurrency, wall, timings)


def merge_rounds(runs: list[LevelRun]) -> list[LevelRun]:
    """One run per (target, configuration, sampling, N) from its rounds: timings joined, wall
    times added (aggregate tokens/s is then all its tokens over all its time)."""
    merged: dict[tuple, LevelRun] = {}
    for run in runs:
        key = (run.target_dtype, run.config, run.sampling, run.concurrency)
        if key in merged:
            merged[key].timings += run.timings
            merged[key].wall_seconds += run.wall_seconds
        else:
            merged[key] = replace(run, timings=list(run.timings))
    return list(merged.values())


def alone_outputs(levels: list[LevelRun]) -> dict[str, list[int]]:
    """Greedy tokens per prompt of the target alone with the fewest sessions at once that ran it."""
    out: dict[str, list[int]] = {}
    for level in sorted((lv for lv in levels if lv.config == "target alone"), key=lambda lv: -lv.concurrency):
        out.update({t.prompt_id: t.token_ids for t in level.timings})  # the fewest sessions last: they win
    return out


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


@dataclass
class LevelRow:
    target_dtype: str
    config: str
    sampling: str
    concurrency: int
    requests: int
    aggregate_tokens_per_second: float
    per_session_tokens_per_second: float  # median over requests
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float | None  # time per output token after the first
    tpot_p99: float | None
    sessions_per_pass: float | None  # the target's passes, mean over its commands
    rows_per_pass: float | None
    alpha: float | None
    tau: float | None
    mean_k: float | None
    identical: str | None = None  # greedy: outputs equal to the target alone's (alone_outputs)
    ratio: float | None = None  # aggregate tokens/s over the target alone's at the same N
    bound: float | None = None  # the ratio if a step cost only its passes (see level_rows)
    scaling: float | None = None  # aggregate tokens/s over this configuration's at N = 1


def level_rows(levels: list[LevelRun], by_request: dict[str, list[Span]]) -> list[LevelRow]:
    rows, costs = [], {}
    references = {
        (dtype, sampling): alone_outputs([lv for lv in levels if (lv.target_dtype, lv.sampling) == (dtype, sampling)])
        for dtype, sampling in {(lv.target_dtype, lv.sampling) for lv in levels}
    }
    for level in levels:
        spans = [s for t in level.timings for s in by_request.get(t.request_id, [])]
        verify = [s for s in spans if s.service == "target" and s.name == "verify"]
        draft = [
            s for s in spans if s.service == "draft" and s.name == "draft" and s.attributes.get("specdec.proposed")
        ]
        tally = Tally()
        for t in level.timings:
            tally = tally.merge(t.tally)
        tpot = [(t.seconds - t.first_token_seconds) / (t.tokens - 1) for t in level.timings if t.tokens > 1]

        def mean_attr(name, spans=verify):
            return statistics.fmean(s.attributes[name] for s in spans) if spans else None

        rows.append(
            LevelRow(
                level.target_dtype,
                level.config,
                level.sampling,
                level.concurrency,
                len(level.timings),
                aggregate_tokens_per_second=sum(t.tokens for t in level.timings) / level.wall_seconds,
                per_session_tokens_per_second=statistics.median(t.tokens / t.seconds for t in level.timings),
                ttft_p50=_percentile([t.first_token_seconds for t in level.timings], 0.5),
                ttft_p99=_percentile([t.first_token_seconds for t in level.timings], 0.99),
                tpot_p50=_percentile(tpot, 0.5),
                tpot_p99=_percentile(tpot, 0.99),
                sessions_per_pass=mean_attr("specdec.batch.sessions"),
                rows_per_pass=mean_attr("specdec.batch.rows"),
                alpha=tally.alpha,
                tau=tally.tau,
                mean_k=tally.mean_k,
                identical=_identical(level, references[(level.target_dtype, level.sampling)]),
            )  # fmt: skip
        )
        # what the passes cost at this load: the target's per command, the draft's per proposed token
        costs[(level.target_dtype, level.config, level.sampling, level.concurrency)] = (
            statistics.median(s.attributes["specdec.device.seconds"] for s in verify) if verify else None,
            statistics.median(s.attributes["specdec.device.seconds"] / s.attributes["specdec.proposed"] for s in draft)
            if draft else 0.0,
        )  # fmt: skip
    _compare(rows, costs)
    return rows


def _identical(level: LevelRun, reference: dict[str, list[int]]) -> str | None:
    if level.sampling != "greedy":
        return None
    compared = [t for t in level.timings if t.prompt_id in reference]
    return f"{sum(t.token_ids == reference[t.prompt_id] for t in compared)}/{len(compared)}"


def _compare(rows: list[LevelRow], costs: dict) -> None:
    """Ratio over the target alone at the same N, scaling over N = 1, and the bound
    tau T_token / (T_verify + mean k T_draft): T_token is the target alone's time per token per
    session at this N (everything included), T_verify and T_draft this configuration's passes."""
    alone = {(r.target_dtype, r.sampling, r.concurrency): r for r in rows if r.config == "target alone"}
    first = {(r.target_dtype, r.config, r.sampling): r for r in rows if r.concurrency == 1}
    for r in rows:
        base = alone.get((r.target_dtype, r.sampling, r.concurrency))
        one = first.get((r.target_dtype, r.config, r.sampling))
        r.scaling = r.aggregate_tokens_per_second / one.aggregate_tokens_per_second if one else None
        if r.config == "target alone" or base is None:
            continue
        r.ratio = r.aggregate_tokens_per_second / base.aggregate_tokens_per_second
        verify, draft_token = costs[(r.target_dtype, r.config, r.sampling, r.concurrency)]
        if verify and r.tau and base.tpot_p50:
            r.bound = r.tau * base.tpot_p50 / (verify + (r.mean_k or 0.0) * draft_token)


def markdown(rows: list[dict]) -> list[str]:
    lines = [
        "## Under load: N sessions at once",
        "",
        "aggregate = all tokens of the level over its wall time; per session = median of each request's "
        "tokens / seconds; TPOT = time per output token after the first; sessions and rows per pass: the "
        "target's passes (mean over its verify commands); ratio = aggregate over the target alone's at the "
        "same N; bound = tau T_token / (T_verify + mean k T_draft) with T_token the target alone's TPOT "
        "p50 and T_verify, T_draft this configuration's passes at this N (device time from the spans); "
        "scaling = aggregate over the same configuration's at N = 1; greedy = alone: outputs equal to the "
        "target alone's for the same prompt with the fewest sessions at once.",
        "",
        "| target | sampling | config | N | aggregate tok/s | ratio | bound | scaling | per session tok/s | "
        "TTFT p50 / p99 | TPOT p50 / p99 | sessions / pass | rows / pass | alpha | tau | mean k | greedy = alone |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ms = lambda v: "" if v is None else f"{v * 1000:.0f}"  # noqa: E731
    num = lambda v, d=2, s="": "" if v is None else f"{v:.{d}f}{s}"  # noqa: E731
    for r in sorted(rows, key=lambda r: (r["target_dtype"], r["sampling"], r["config"] != "target alone",
                                         r["config"], r["concurrency"])):  # fmt: skip
        lines.append(
            f"| {r['target_dtype']} | {r['sampling']} | {r['config']} | {r['concurrency']} | "
            f"{r['aggregate_tokens_per_second']:.1f} | {num(r['ratio'], s='x')} | {num(r['bound'], s='x')} | "
            f"{num(r['scaling'], s='x')} | {r['per_session_tokens_per_second']:.1f} | "
            f"{ms(r['ttft_p50'])} / {ms(r['ttft_p99'])} ms | {ms(r['tpot_p50'])} / {ms(r['tpot_p99'])} ms | "
            f"{num(r['sessions_per_pass'], 1)} | {num(r['rows_per_pass'], 1)} | {num(r['alpha'])} | "
            f"{num(r['tau'])} | {num(r['mean_k'], 1)} | {r['identical'] or ''} |"
        )
    return lines


def plot(rows: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tps, ax_ratio) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict = {}
    for r in rows:
        series.setdefault((r["target_dtype"], r["sampling"], r["config"]), []).append(r)
    for (dtype, sampling, config), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["concurrency"])
        n = [r["concurrency"] for r in rs]
        label = f"{config} ({dtype}, {sampling})"
        line = ax_tps.plot(n, [r["aggregate_tokens_per_second"] for r in rs], "o-", label=label)[0]
        if config != "target alone":
            ax_ratio.plot(n, [r["ratio"] for r in rs], "o-", color=line.get_color(), label=label)
    ax_ratio.axhline(1.0, color="grey", lw=0.8)
    ax_tps.set(xscale="log", xlabel="concurrent sessions", ylabel="aggregate tokens/s", title="throughput")
    ax_ratio.set(xscale="log", xlabel="concurrent sessions", ylabel="over the target alone", title="speculation")
    for ax in (ax_tps, ax_ratio):
        ax.set_xticks(
            sorted({r["concurrency"] for r in rows}), [str(c) for c in sorted({r["concurrency"] for r in rows})]
        )
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def as_dicts(rows: list[LevelRow]) -> list[dict]:
    return [asdict(r) for r in rows]
