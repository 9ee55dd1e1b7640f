"""Target alone vs the n-gram draft, one session at a time, greedy: tokens/s and acceptance.

python results/2026-12-02-ngram/measure.py ORCHESTRATOR_ADDRESS OUT.json
(the orchestrator started with --num-draft-tokens 0, so a request with k = 0 is the target alone)
"""

import json
import sys
import time

import grpc

from specdec.v1 import generate_pb2, generate_pb2_grpc

PROMPTS = {
    "edit-code": "Rewrite this function with the variable `total` renamed to `acc`, and change nothing else:\n"
    "```python\ndef sum_list(values):\n    total = 0\n    for v in values:\n        if v > 0:\n"
    "            total += v\n    return total\n```",
    "repeat-with-changes": "Repeat the following list, replacing every 'apple' with 'pear': apple pie, "
    "apple juice, green apple, apple tree, apple cider, baked apple.",
    "explain": "Explain in three sentences why the sky is blue.",
}
CONFIGS = (("target alone", 0), ("ngram k=4", 4))


def timed(stub, prompt: str, k: int):
    request = generate_pb2.GenerateRequest(prompt=prompt, chat=True, max_tokens=96, num_draft_tokens=k)
    start = time.perf_counter()
    responses = list(stub.Generate(request, timeout=600))
    seconds = time.perf_counter() - start
    tokens = [t for r in responses for t in r.token_ids]
    return len(tokens) / seconds, tokens, responses[-1].stats


def main() -> None:
    stub = generate_pb2_grpc.GeneratorStub(grpc.insecure_channel(sys.argv[1]))
    rows = []
    for name, prompt in PROMPTS.items():
        runs = {label: [] for label, _ in CONFIGS}
        for _ in range(2):  # each configuration twice, in turn; the best is kept
            for label, k in CONFIGS:
                runs[label].append(timed(stub, prompt, k))
        alone, ngram = max(runs["target alone"], key=lambda r: r[0]), max(runs["ngram k=4"], key=lambda r: r[0])
        stats = ngram[2]
        row = {
            "prompt": name, "target_alone_tok_s": alone[0], "ngram_tok_s": ngram[0], "speedup": ngram[0] / alone[0],
            "proposed": stats.draft_tokens, "accepted": stats.accepted_tokens, "steps": stats.steps,
            "tokens": len(ngram[1]), "same_output": alone[1] == ngram[1],
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(sys.argv[2], "w") as out:
        json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
