"""`python -m specdec.bench --quick` on tiny random models: the command cannot rot, and its
figures are consistent with each other."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.tiny import save_layer_skip_draft, save_tile_sized_pair, save_tiny_model


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    target = save_tiny_model(root / "target", vocab_size=64, num_layers=4, init_std=0.5, seed=1)
    draft = save_layer_skip_draft(target, root / "draft", num_layers=3)
    out = root / "out"
    command = [sys.executable, "-m", "specdec.bench", "--quick", "--target", str(target), "--draft", str(draft),
               "--target-dtypes", "float32", "--draft-dtype", "float32", "--out", str(out), "--port", "50230"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), result.stdout


def test_writes_table_json_and_plot(bench_result):
    out, result, stdout = bench_result
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "README.md").read_text()
    assert table.strip() in stdout and "| bound (turns) |" in table
    configs = {(r["engine"], r["config"], r["sampling"]) for r in result["rows"]}
    for sampling in ("greedy", "t=0.8"):
        for config in ("target alone", "k=2", "k=4", "adaptive k<=4"):
            assert ("specdec", config, sampling) in configs
        assert ("hf", "hf assisted", sampling) in configs and ("hf", "hf target alone", sampling) in configs
    assert ("specdec", "k=4 overlap", "greedy") in configs
    assert len(result["runs"]) == len(result["rows"]) * 3  # three prompts per row


def test_figures_agree_with_the_raw_runs(bench_result):
    _, result, _ = bench_result
    runs = result["runs"]
    alone = {r["sampling"]: r for r in result["rows"] if r["config"] == "target alone"}
    for row in result["rows"]:
        group = [
            r
            for r in runs
            if (r["engine"], r["config"], r["sampling"]) == (row["engine"], row["config"], row["sampling"])
        ]
        assert row["tokens_per_second"] == pytest.approx(
            sum(len(r["token_ids"]) for r in group) / sum(r["seconds"] for r in group)
        )
        assert all(len(r["token_ids"]) == 16 for r in group)  # EOS ignored, max_tokens honoured
        costs = result["costs"][f"float32|{row['sampling'] if 'overlap' not in row['config'] else 'greedy'}"]
        if row["engine"] == "specdec" and row["config"] != "target alone":
            base = alone[row["sampling"]]["steady_tokens_per_second"]
            assert row["speedup"] == pytest.approx(row["steady_tokens_per_second"] / base)
            assert row["alpha"] == pytest.approx(
                sum(r["accepted_tokens"] for r in group) / sum(r["draft_tokens"] for r in group)
            )
            k, tau = row["mean_k"], row["tau"]
            verify = costs["verify"].get(str(round(k))) if k == round(k) else None
            token_seconds = result["overhead"][f"float32|target alone|{row['sampling']}"]["step_seconds"]
            if verify is not None:
                assert row["bound_turns"] == pytest.approx(tau * token_seconds / (verify + k * costs["draft_token"]))
                assert row["bound_overlap"] >= row["bound_turns"]
    for costs in result["costs"].values():
        assert costs["c"] == pytest.approx(costs["draft_token"] / costs["decode"])
        for k, ratio in costs["draft_replicas_per_target"].items():  # k draft tokens per verify of k
            assert ratio == pytest.approx(int(k) * costs["draft_token"] / costs["verify"][k])


def test_the_load_runs_report_every_configuration_at_every_concurrency_from_the_raw_runs(bench_result):
    out, result, _ = bench_result
    assert (out / "concurrency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Under load: N sessions at once" in (out / "README.md").read_text()
    rows = {(r["config"], r["sampling"], r["concurrency"]): r for r in result["load"]}
    for sampling in ("greedy", "t=0.8"):
        for config in ("target alone", "k=4", "adaptive k<=4"):
            for n in (1, 2):
                row = rows[(config, sampling, n)]
                (level,) = [lv for lv in result["load_runs"] if (lv["config"], lv["sampling"], lv["concurrency"]) ==
                            (config, sampling, n)]  # fmt: skip
                assert row["requests"] == len(level["timings"]) == max(2, 2 * n)
                tokens = sum(t["tokens"] for t in level["timings"])
                assert row["aggregate_tokens_per_second"] == pytest.approx(tokens / level["wall_seconds"])
                assert row["sessions_per_pass"] is not None and 1 <= row["sessions_per_pass"] <= n
                base = rows[("target alone", sampling, n)]
                if config != "target alone":
                    assert row["ratio"] == pytest.approx(
                        row["aggregate_tokens_per_second"] / base["aggregate_tokens_per_second"]
                    )
                    assert row["bound"] is not None and row["bound"] > 0
                if sampling == "greedy":  # compared with one session alone; a difference is explained
                    same, compared = map(int, row["identical"].split("/"))
                    assert compared > 0
                    if same < compared:
                        label = f"{config}, {n} at once"
                        assert any(d["config"] == label and d["top2_gap"] < 1e-3 for d in result["divergences"])
                one = rows[(config, sampling, 1)]
                assert row["scaling"] == pytest.approx(
                    row["aggregate_tokens_per_second"] / one["aggregate_tokens_per_second"]
                )


def test_greedy_speculation_matches_the_target_alone_or_explains_why(bench_result):
    _, result, _ = bench_result
    explained = {(d["config"], d["prompt_id"]) for d in result["divergences"]}
    for row in result["rows"]:
        if row["identical_to_alone"] is not None and row["identical_to_alone"] != "3/3":
            assert any(config == row["config"] for config, _ in explained)
    assert all(d["top2_gap"] < 1e-3 for d in result["divergences"])  # float32 rounding at a near tie only


def test_the_ttnn_bench_runs_on_two_emulated_devices(tmp_path):
    """scripts/tt_bench.sh's command on the ttnn emulator (tests/ttnn_emulator.py): services on
    devices 1 and 0, figures for every configuration, greedy equal to the target alone."""
    import os

    from tests.ttnn_emulator import process_env

    target, draft = save_tile_sized_pair(tmp_path)
    env = {**os.environ, **process_env(), "SPECDEC_CACHE": str(tmp_path)}
    command = [sys.executable, "-m", "specdec.bench", "--backend", "ttnn", "--target", str(target), "--draft",
               str(draft), "--quick", "--no-hf", "--overlap-k", "0", "--samplings", "greedy", "--out",
               str(tmp_path / "out"), "--port", "50240"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["config"] for r in figures["rows"]} == {"target alone", "k=2", "k=4", "adaptive k<=4"}
    assert all(r["identical_to_alone"] in (None, "3/3") for r in figures["rows"])
    assert all(r["tokens_per_second"] > 0 and r["target_dtype"] == "bfloat16 on ttnn" for r in figures["rows"])
    log = open(figures["service_log"]).read()
    assert "opened Tenstorrent device 1" in log and "opened Tenstorrent device 0" in log
    assert "Against Hugging Face" not in (tmp_path / "out" / "README.md").read_text()


def test_says_plainly_whether_llama_cpp_ran(bench_result):
    """The tiny target is a Hugging Face directory, so llama.cpp never runs here: without a build
    the note says how to get one, with a build that the target has no GGUF file."""
    out, result, _ = bench_result
    note = result["llama_cpp"]
    assert note.startswith("not installed: scripts/build_llama_cpp.sh") or note.startswith("not run: ")
    assert note in (out / "README.md").read_text()
    assert not [r for r in result["rows"] if r["engine"] == "llama.cpp"]


def test_llama_cpp_comparison_lines_are_the_ratios_of_the_rows():
    from specdec.bench.report import versus_llama_cpp

    def row(engine, config, dtype, tps, alpha=None):
        return {"engine": engine, "config": config, "target_dtype": dtype, "sampling": "greedy",
                "tokens_per_second": tps, "alpha": alpha}  # fmt: skip

    rows = [row("specdec", "target alone", "gguf", 12.0), row("specdec", "k=2", "gguf", 15.0),
            row("specdec", "target alone", "float32", 3.0), row("llama.cpp", "llama.cpp target alone", "gguf", 10.0),
            row("llama.cpp", "llama.cpp k=2", "gguf", 8.0, alpha=0.75)]  # fmt: skip
    lines = versus_llama_cpp(rows)
    assert "specdec target alone (gguf) 12.00 tok/s, llama.cpp target alone 10.00: 1.20x" in lines
    assert "specdec target alone (float32) 3.00 tok/s, llama.cpp target alone 10.00: 0.30x" in lines
    assert "llama.cpp k=2: 8.00 tok/s, 75 % of drafts accepted" in lines
    assert lines[-1] == "best: specdec k=2 (gguf) 15.00 tok/s, llama.cpp target alone 10.00: 1.50x"


def test_llama_cpp_configurations_that_never_drafted_say_so():
    from specdec.bench.report import versus_llama_cpp

    rows = [{"engine": e, "config": c, "target_dtype": "gguf", "sampling": "greedy", "tokens_per_second": t, "alpha": None}
            for e, c, t in (("specdec", "target alone", 9.0), ("llama.cpp", "llama.cpp target alone", 10.0),
                            ("llama.cpp", "llama.cpp ngram k=3", 9.5))]  # fmt: skip
    assert "llama.cpp ngram k=3: 9.50 tok/s, no drafts proposed" in versus_llama_cpp(rows)


def test_tokens_per_second_by_prompt_kind_are_those_of_the_kinds_runs():
    from specdec.bench.report import by_prompt_kind

    def run(config, prompt_id, tokens, seconds):
        return {"engine": "specdec", "target_dtype": "gguf", "config": config, "sampling": "greedy",
                "prompt_id": prompt_id, "token_ids": [1] * tokens, "seconds": seconds}  # fmt: skip

    runs = [run("target alone", "edit-rename", 10, 2.0), run("target alone", "code-sql", 10, 1.0),
            run("ngram k=3", "edit-rename", 10, 0.5), run("ngram k=3", "edit-repeat", 30, 1.5),
            run("ngram k=3", "code-sql", 10, 1.25), {**run("ngram k=3", "code-sql", 99, 1.0), "sampling": "t=0.8"}]  # fmt: skip
    lines = by_prompt_kind(runs)
    assert "| engine | target | config | code | edit | all |" in lines
    assert "| specdec | gguf | target alone | 10.00 | 5.00 | 6.67 |" in lines  # 20 tokens in 3 s
    assert "| specdec | gguf | ngram k=3 | 8.00 | 20.00 | 15.38 |" in lines  # 50 tokens in 3.25 s; sampled left out


def test_both_drafts_get_every_configuration_each_on_its_own_orchestrator():
    from specdec.bench.runs import configs

    plan = configs([3, 7], ["greedy"], overlap_k=4, drafts=("model", "ngram"))
    assert [(c.name, c.orchestrator, c.k, c.adaptive) for c in plan] == [
        ("target alone", "alone", 0, False), ("k=3", "spec", 3, False), ("k=7", "spec", 7, False),
        ("adaptive k<=7", "spec", 7, True), ("ngram k=3", "ngram", 3, False), ("ngram k=7", "ngram", 7, False),
        ("ngram adaptive k<=7", "ngram", 7, True), ("k=4 overlap", "overlap", 4, False),
    ]  # fmt: skip
    assert not [c for c in configs([2], ["greedy"], overlap_k=4, drafts=("ngram",)) if c.orchestrator == "overlap"]
