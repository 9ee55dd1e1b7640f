"""In-process decode and verify costs of the llama.cpp backend beside the torch one on the same
GGUF file (no services), greedy, one session, 2 threads, in one run.

PYTHONPATH=. python results/2026-12-03-llama-cpp-backend/decode_verify.py qwen2.5-coder-1.5b
"""

import statistics
import sys
import time

import torch

from specdec.engine.base import forward_one
from specdec.engine.llama_cpp_engine import LlamaCppEngine
from specdec.engine.torch_engine import TorchEngine

KS = (1, 2, 3, 4, 5, 6, 8)


def median_ms(engine, session, tokens: list[int], repeats: int) -> float:
    base = session.length
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward_one(engine, session, tokens, len(tokens))
        times.append(time.perf_counter() - start)
        session.truncate(base)
    return 1000 * statistics.median(times)


def costs(engine) -> tuple[float, dict[int, float]]:
    session = engine.new_session(1000)
    forward_one(engine, session, list(range(100, 140)), 1)  # a 40-token context
    decode = median_ms(engine, session, [5], repeats=15)
    verify = {k: median_ms(engine, session, [5] * (k + 1), repeats=7) for k in KS}
    engine.end_session(session)
    return decode, verify


def main() -> None:
    name = sys.argv[1]
    torch.set_num_threads(2)
    rows = []
    for label, load in (("llama.cpp", lambda: LlamaCppEngine.load(name, max_seq_len=1024, max_sessions=2)),
                        ("torch gguf", lambda: TorchEngine.load(name, dtype="gguf", max_seq_len=1024, max_sessions=2))):
        engine = load()
        rows.append((label, *costs(engine)))
        engine.close()
        del engine
    print(f"| {name} | decode ms (tok/s) | " + " | ".join(f"verify k={k} / decode" for k in KS) + " |")
    print("|---|---|" + "---|" * len(KS))
    for label, decode, verify in rows:
        ratios = " | ".join(f"{verify[k] / decode:.2f} ({verify[k]:.0f} ms)" for k in KS)
        print(f"| {label} | {decode:.1f} ({1000 / decode:.1f}) | {ratios} |")
    print(f"llama.cpp decode / torch gguf decode: {rows[0][1] / rows[1][1]:.2f}")


if __name__ == "__main__":
    main()
