"""The CPU peer: llama.cpp's server on the same GGUF files, the same prompt tokens and token counts,
greedy, the target alone and with its own speculative decoding (the draft model, k drafted tokens
at most; with ngram, also its n-gram lookup, `ngram-simple`), in the same run as ours.

llama.cpp is not a dependency: `scripts/build_llama_cpp.sh` builds it (11-20 minutes on 2
cores) into the cache, where find_binaries() looks, or $SPECDEC_LLAMA_CPP names the folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from specdec import models
from specdec.bench.runs import Run
from specdec.engine.loading import cache_root
from specdec.engine.ngram import MIN_N

ENGINE = "llama.cpp"
ALONE = "llama.cpp target alone"


def find_binaries() -> Path | None:
    """The folder holding llama-server: $SPECDEC_LLAMA_CPP, else the newest build in the cache."""
    named = os.environ.get("SPECDEC_LLAMA_CPP")
    candidates = [Path(named)] if named else sorted((cache_root() / "llama.cpp").glob("*/build/bin"), reverse=True)
    return next((c for c in candidates if (c / "llama-server").is_file()), None)


def gguf_file(model: str) -> Path | None:
    """The GGUF file of a registered model or a .gguf path; None for a Hugging Face directory."""
    if model in models.REGISTRY:
        path = models.model_dir(model) / models.GGUF_FILE
        return path if path.is_file() else None
    path = Path(model)
    return path if path.suffix == ".gguf" and path.is_file() else None


def llama_cpp_runs(binaries: Path, target: Path, draft: Path | None, prompts: list[tuple[str, list[int]]],
                   max_tokens: int, ks: list[int], context: int, port: int, log, progress,
                   ngram: bool = False) -> list[Run]:  # fmt: skip
    """Greedy runs of every prompt: the target alone, then with the draft at each k in ks, then
    (ngram) with its n-gram lookup at each k."""
    threads = str(os.cpu_count() or 1)
    plans = [(ALONE, 0, [])]
    # --spec-type: without it the server infers the kind from the draft's metadata, finds none
    # in a plain model, loads the draft and never drafts
    if draft is not None:
        plans += [(f"llama.cpp k={k}", k, ["-md", str(draft), "--spec-type", "draft-simple", "-td", threads, "--spec-draft-n-max", str(k)])
                  for k in ks]  # fmt: skip
    if ngram:  # our lookup's shortest match (2 tokens, specdec/engine/ngram.py), at most k proposals
        plans += [(f"llama.cpp ngram k={k}", k, ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", str(MIN_N),
                   "--spec-ngram-simple-size-m", str(k)]) for k in ks]  # fmt: skip
    runs = []
    for config, k, flags in plans:
        command = [str(binaries / "llama-server"), "-m", str(target), "-t", threads, "-c", str(context), "-np", "1",
                   "--host", "127.0.0.1", "--port", str(port), *flags]  # fmt: skip
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(port, server)
            for prompt_id, ids in prompts:
                runs.append(_complete(port, config, k, prompt_id, ids, max_tokens))
                progress.update()
        finally:
            server.terminate()
            server.wait(timeout=30)
    return runs


def _wait_healthy(port: int, server: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"llama-server exited with status {server.returncode}; see the service log")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"llama-server on port {port} was not healthy within {timeout:.0f} s")


def _complete(port: int, config: str, k: int, prompt_id: str, ids: list[int], max_tokens: int) -> Run:
    body = {"prompt": ids, "n_predict": max_tokens, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
            "cache_prompt": False, "return_tokens": True, "stream": False}  # fmt: skip
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=3600) as r:
        answer = json.loads(r.read())
    seconds = time.perf_counter() - start
    timings = answer.get("timings", {})
    tokens = [int(t) for t in answer.get("tokens", [])]
    drafted, accepted = int(timings.get("draft_n", 0)), int(timings.get("draft_n_accepted", 0))
    return Run(
        engine=ENGINE, target_dtype="gguf", config=config, k=k, adaptive=False, sampling="greedy",
        prompt_id=prompt_id, prompt_tokens=len(ids), token_ids=tokens, seconds=seconds,
        # the server answers once: its first token comes when the prompt is processed
        first_token_seconds=min(seconds, timings.get("prompt_ms", 0.0) / 1000),
        draft_tokens=drafted, accepted_tokens=accepted,
    )  # fmt: skip
