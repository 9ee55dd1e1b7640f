"""The peer a user would pick instead: Hugging Face transformers, in-process, the target alone and
assisted generation (`generate(..., assistant_model=draft)`) on the same pair and prompts."""

from __future__ import annotations

import time

import torch

from specdec.bench.runs import SAMPLING_TEMPERATURE, Run
from specdec.engine.loading import resolve_model_dir
from specdec.engine.torch_engine import DTYPES


class _FirstToken:
    """A generate() streamer that notes when the first new token arrives (its first put() is the
    prompt)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.calls = 0
        self.first: float | None = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter() - self.start

    def end(self):
        pass


def hf_runs(target: str, draft: str, target_dtype: str, draft_dtype: str, prompts: list[tuple[str, list[int]]],
            max_tokens: int, samplings: list[str], progress) -> list[Run]:  # fmt: skip
    from transformers import AutoModelForCausalLM

    target_model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(target), dtype=DTYPES[target_dtype]).eval()
    draft_model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(draft), dtype=DTYPES[draft_dtype]).eval()
    runs = []
    for sampling in samplings:
        for name, assistant in (("hf target alone", None), ("hf assisted", draft_model)):
            for seed, (prompt_id, ids) in enumerate(prompts):
                runs.append(
                    _generate(target_model, assistant, name, target_dtype, sampling, prompt_id, ids, max_tokens, seed)
                )
                progress.update()
    return runs


def _generate(model, assistant, name, target_dtype, sampling, prompt_id, ids, max_tokens, seed) -> Run:
    inputs = torch.tensor([ids])
    kwargs = {"do_sample": False, "top_k": None, "top_p": None, "temperature": None}
    if sampling != "greedy":
        torch.manual_seed(seed)
        kwargs = {"do_sample": True, "temperature": SAMPLING_TEMPERATURE, "top_k": 0, "top_p": 1.0}
    streamer = _FirstToken()
    with torch.inference_mode():
        out = model.generate(
            inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
            assistant_model=assistant, streamer=streamer, pad_token_id=_pad_id(model), **kwargs,
        )  # fmt: skip
    seconds = time.perf_counter() - streamer.start
    tokens = out[0, len(ids) :].tolist()
    return Run(
        engine="hf", target_dtype=target_dtype, config=name, k=0, adaptive=assistant is not None, sampling=sampling,
        prompt_id=prompt_id, prompt_tokens=len(ids), token_ids=tokens, seconds=seconds,
        first_token_seconds=streamer.first or seconds,
    )  # fmt: skip


def _pad_id(model) -> int:
    eos = model.generation_config.eos_token_id
    return eos[0] if isinstance(eos, list) else eos
