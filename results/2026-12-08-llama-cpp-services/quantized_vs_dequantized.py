"""Greedy output of the GGUF file as shipped (torch `--dtype gguf`, and the llama.cpp backend)
against the same file dequantized to float32, target alone, in process: per prompt, whether the
tokens are equal and, where not, the first differing position and the float32 model's top-2 logit
gap there (the contexts are equal up to it, so a small gap is a near tie that rounding decides).

PYTHONPATH=. python results/2026-12-08-llama-cpp-services/quantized_vs_dequantized.py [model] [tokens]
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from orchestrator.validation import encode_prompt
from specdec.engine.base import forward_one
from specdec.engine.llama_cpp_engine import LlamaCppEngine
from specdec.engine.loading import resolve_tokenizer_dir
from specdec.engine.torch_engine import TorchEngine

PROMPTS = Path(__file__).parents[2] / "specdec" / "bench" / "prompts.json"


def generate(engine, prompt: list[int], tokens: int) -> tuple[list[int], list[float]]:
    """Greedy, one token a pass: (tokens, the top-2 logit gap before each)."""
    session = engine.new_session(len(prompt) + tokens + 1)
    out, gaps = [], []
    logits = forward_one(engine, session, prompt, 1).logits[0].float()
    for _ in range(tokens):
        top2 = logits.topk(2).values
        gaps.append(float(top2[0] - top2[1]))
        out.append(int(logits.argmax()))
        logits = forward_one(engine, session, [out[-1]], 1).logits[0].float()
    engine.end_session(session)
    return out, gaps


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-1.5b"
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer_dir(name))
    prompts = [(p["id"], encode_prompt(tokenizer, p["prompt"], True)) for p in json.loads(PROMPTS.read_text())]
    longest = max(len(ids) for _, ids in prompts) + tokens + 8
    loaders = {
        "dequantized float32": lambda: TorchEngine.load(name, dtype="float32", max_seq_len=longest, max_sessions=1),
        "torch gguf": lambda: TorchEngine.load(name, dtype="gguf", max_seq_len=longest, max_sessions=1),
        "llama.cpp": lambda: LlamaCppEngine.load(name, max_seq_len=longest, max_sessions=1),
    }
    outputs = {}
    for label, load in loaders.items():
        engine = load()
        outputs[label] = {pid: generate(engine, ids, tokens) for pid, ids in prompts}
        engine.close()
        del engine
    reference = outputs.pop("dequantized float32")
    print(
        f"| path | equal to dequantized float32 ({tokens} tokens) | first divergence: prompt, position, float32 top-2 gap |"
    )
    print("|---|---|---|")
    for label, runs in outputs.items():
        equal = sum(runs[pid][0] == reference[pid][0] for pid, _ in prompts)
        where = []
        for pid, _ in prompts:
            got, (expected, gaps) = runs[pid][0], reference[pid]
            if got != expected:
                i = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
                where.append(f"{pid} {i} {gaps[i]:.3f}")
        print(f"| {label} | {equal}/{len(prompts)} | {'; '.join(where)} |")


if __name__ == "__main__":
    main()
