"""A/B in one process: every layer on its fbgemm int8 copy against the weights as shipped.

PYTHONPATH=. python results/2026-12-02-gguf-int8-rows/int8_rows_ab.py qwen2.5-coder-1.5b
prefill, decode and verify/decode, two rounds in turn; then 24 greedy tokens on each."""
import statistics, sys, time, torch
from specdec.engine.base import forward_one
from specdec.engine import gguf_weights
from specdec.engine.cpu_quant_linear import WeightOnlyLinear
from specdec.engine.torch_engine import TorchEngine
torch.set_num_threads(2)
def median_ms(engine, session, tokens, repeats=7):
    base = session.length; times = []
    for _ in range(repeats):
        t = time.perf_counter(); forward_one(engine, session, tokens, len(tokens)); times.append(time.perf_counter() - t); session.truncate(base)
    return 1000 * statistics.median(times)
t = time.perf_counter()
e = TorchEngine.load(sys.argv[1], dtype="gguf-int8", max_seq_len=1024, max_sessions=2)
print("loaded", round(time.perf_counter() - t, 1), "s")
lins = [m for m in e.model.modules() if isinstance(m, WeightOnlyLinear)]
saved = [(m.int8_rows, None) for m in lins]
print("int8 rows kept on", sum(m.int8_rows is not None for m in lins), "of", len(lins), "layers")
s = e.new_session(1000); forward_one(e, s, list(range(100, 140)), 1)
for rnd in range(2):
  for mode in ["int8_rows", "shipped"]:
    for m, (r, f) in zip(lins, saved):
        m.int8_rows = r if mode == "int8_rows" else None
    d = median_ms(e, s, [5], 11)
    v = [median_ms(e, s, [5] * (k + 1)) / d for k in (1, 2, 4, 8)]
    p40 = median_ms(e, s, list(range(1000, 1040)), 3); p200 = median_ms(e, s, list(range(1000, 1200)), 3)
    print(mode, f"prefill 40 {p40:.0f} ms, 200 {p200:.0f} ms; decode {d:.1f} ms", "verify/decode k=1,2,4,8:", [round(x, 2) for x in v], flush=True)
# logits agreement, decode rows: int8_rows vs shipped over 24 greedy tokens
def greedy(mode, n=24):
    for m, (r, f) in zip(lins, saved):
        m.int8_rows = r if mode == "int8_rows" else None
    s = e.new_session(200); out = []; tok = list(range(300, 330))
    r = forward_one(e, s, tok, 1)
    for _ in range(n):
        nxt = int(r.logits[-1].argmax()); out.append(nxt); r = forward_one(e, s, [nxt], 1)
    e.end_session(s); return out
a, b = greedy("int8_rows"), greedy("shipped")
print("greedy same:", a == b, sum(x == y for x, y in zip(a, b)))
