"""In-process decode and verify costs of one engine (no services), greedy, one session.

PYTHONPATH=. python results/2026-12-02-gguf-vs-llama-cpp/decode_verify.py qwen2.5-coder-1.5b gguf [--no-splits]

--no-splits: every quantized layer runs a pass as one kernel call (RowPlan.single()), to compare
with the splits timed at load.
"""

import statistics
import sys
import time

import torch

from specdec.engine.base import forward_one
from specdec.engine.cpu_quant_linear import RowPlan, WeightOnlyLinear
from specdec.engine.torch_engine import TorchEngine


def median_ms(engine, session, tokens: list[int], repeats: int = 5) -> float:
    base = session.length
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward_one(engine, session, tokens, len(tokens))
        times.append(time.perf_counter() - start)
        session.truncate(base)
    return 1000 * statistics.median(times)


def main() -> None:
    name, dtype = sys.argv[1], sys.argv[2]
    torch.set_num_threads(2)
    start = time.perf_counter()
    engine = TorchEngine.load(name, dtype=dtype, max_seq_len=1024, max_sessions=2)
    print(f"{name} {dtype}: loaded in {time.perf_counter() - start:.1f} s")
    if "--no-splits" in sys.argv:
        for layer in engine.model.modules():
            if isinstance(layer, WeightOnlyLinear):
                layer.plan = RowPlan.single()
    session = engine.new_session(1000)
    forward_one(engine, session, list(range(100, 140)), 1)  # a 40-token context
    decode = median_ms(engine, session, [5], repeats=15)
    print(f"decode {decode:.1f} ms a token ({1000 / decode:.1f} tok/s)")
    for k in (1, 2, 3, 4, 5, 6, 8):
        verify = median_ms(engine, session, [5] * (k + 1))
        print(f"verify k={k}: {verify:.1f} ms = {verify / decode:.2f} decodes")


if __name__ == "__main__":
    main()
