import sys, time, statistics, torch
torch.set_num_threads(2)
from specdec.engine.torch_engine import TorchEngine
from specdec.engine.base import forward_one
name, dtype = sys.argv[1], sys.argv[2]
t0 = time.time(); e = TorchEngine.load(name, dtype=dtype, max_seq_len=1024, max_sessions=2); print(dtype, "load s", round(time.time()-t0,1), flush=True)
from transformers import AutoTokenizer
from specdec.engine.loading import resolve_model_dir
tok = AutoTokenizer.from_pretrained(resolve_model_dir(name))
prompt = tok.encode("def quicksort(xs):\n    \"\"\"Sort a list of numbers.\"\"\"\n")
s = e.new_session(1000)
t0=time.time(); lg = forward_one(e, s, prompt, 1); print("prefill", len(prompt), "tok", round(time.time()-t0,3))
out=[]; tok_id = int(lg.logits[0].argmax())
times=[]
for i in range(24):
    out.append(tok_id); t0=time.perf_counter(); lg = forward_one(e, s, [tok_id], 1); times.append(time.perf_counter()-t0); tok_id=int(lg.logits[0].argmax())
dec = statistics.median(times[4:])
print(f"decode {dec*1000:.1f} ms/token = {1/dec:.1f} tok/s; text:", repr(tok.decode(out))[:90])
base = s.length
for m in (2,3,4,5,6,7,9):
    ts=[]
    for r in range(5):
        t0=time.perf_counter(); forward_one(e, s, [tok_id]*m, m); ts.append(time.perf_counter()-t0); s.truncate(base)
    v = statistics.median(ts); print(f"verify k={m-1}: {v*1000:.1f} ms = {v/dec:.2f} x decode")
