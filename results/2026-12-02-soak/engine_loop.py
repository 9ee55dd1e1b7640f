"""Engine-only RSS loop: 8 sessions, prefills of 5-200 tokens, verify passes of 1-5 rows a session.

DT=float32|bfloat16 TRIM=0|1 PYTHONPATH=. python results/2026-12-02-soak/engine_loop.py SESSIONS
prints sessions done, RSS MiB, seconds."""
import os, random, sys, time, ctypes
import torch
from specdec.engine.torch_engine import TorchEngine
from specdec.engine.base import Chunk
from specdec.sampling import SamplingParams
torch.set_num_threads(2)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
trim = os.environ.get("TRIM") == "1"
libc = ctypes.CDLL("libc.so.6")
e = TorchEngine.load("smollm2-135m", dtype=os.environ.get("DT", "float32"), max_seq_len=512, max_sessions=8)
rng = random.Random(0)
g = SamplingParams()
sessions = int(sys.argv[1]) if len(sys.argv) > 1 else 400
t0 = time.time()
print("start", round(rss()), flush=True)
done = 0
live = []
while done < sessions:
    while len(live) < 8:
        s = e.new_session(512)
        n = rng.randint(5, 200)
        e.run([Chunk(s, [rng.randrange(1000) for _ in range(n)], 1, g)])
        live.append([s, rng.randint(5, 40)])
    chunks = []
    for item in live:
        k = rng.randint(0, 4)
        chunks.append(Chunk(item[0], [rng.randrange(1000) for _ in range(k + 1)], k + 1, g))
    e.run(chunks)
    for item in live:
        item[0].truncate(item[0].length - rng.randint(0, 2))
        item[1] -= 1
    for item in [i for i in live if i[1] <= 0]:
        e.end_session(item[0]); live.remove(item); done += 1
        if trim: libc.malloc_trim(0)
        if done % 50 == 0:
            print(done, round(rss()), round(time.time() - t0), flush=True)
