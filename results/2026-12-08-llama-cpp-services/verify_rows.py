"""A pass of n rows on the llama.cpp backend over a one-row decode, in process (one session, a
40-token context, 2 threads, medians of 9, the sizes interleaved).

PYTHONPATH=. python results/2026-12-08-llama-cpp-services/verify_rows.py [model] [--unpadded]
"""

import statistics
import sys
import time

import torch

from specdec.engine import llama_cpp_engine
from specdec.engine.base import forward_one
from specdec.engine.llama_cpp_engine import LlamaCppEngine

ROWS = (1, 2, 3, 4, 7, 8)


def main() -> None:
    name = next((a for a in sys.argv[1:] if not a.startswith("--")), "qwen2.5-coder-1.5b")
    if "--unpadded" in sys.argv:
        llama_cpp_engine.PADDED_ROWS = {}
    torch.set_num_threads(2)
    engine = LlamaCppEngine.load(name, max_seq_len=1024, max_sessions=2)
    session = engine.new_session(1000)
    forward_one(engine, session, list(range(100, 140)), 1)
    times = {n: [] for n in ROWS}
    for _ in range(9):
        for n in ROWS:
            start = time.perf_counter()
            forward_one(engine, session, [5] * n, n)
            times[n].append(time.perf_counter() - start)
            session.truncate(40)
    decode = statistics.median(times[1])
    for n, t in times.items():
        print(f"rows={n}: {1000 * statistics.median(t):.0f} ms = {statistics.median(t) / decode:.2f} decodes")


if __name__ == "__main__":
    main()
