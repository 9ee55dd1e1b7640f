"""The benchmark's configurations, the services they run on, and timed requests through them."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import grpc

from specdec import serve
from specdec.tally import Tally
from specdec.v1 import generate_pb2, generate_pb2_grpc

SAMPLING_TEMPERATURE = 0.8
SAMPLING_SEED = 1234


@dataclass(frozen=True)
class Config:
    name: str  # "target alone", "k=4", "adaptive", "k=4 overlap"
    orchestrator: str  # which orchestrator serves it: "alone", "spec" or "overlap"
    k: int  # 0 for the target alone; the largest k when adaptive
    adaptive: bool
    sampling: str  # "greedy" or "t=0.8"

    def request(self, prompt_token_ids: list[int], max_tokens: int, seed: int) -> generate_pb2.GenerateRequest:
        sampling = generate_pb2.SamplingParams()
        if self.sampling != "greedy":
            sampling = generate_pb2.SamplingParams(temperature=SAMPLING_TEMPERATURE, seed=seed)
        request = generate_pb2.GenerateRequest(
            prompt_token_ids=prompt_token_ids, max_tokens=max_tokens, sampling=sampling, ignore_eos=True
        )
        if self.k:
            request.num_draft_tokens = self.k
            request.adaptive_draft_tokens = self.adaptive
        return request


def configs(ks: list[int], samplings: list[str], overlap_k: int | None) -> list[Config]:
    out = []
    for sampling in samplings:
        out.append(Config("target alone", "alone", 0, False, sampling))
        out += [Config(f"k={k}", "spec", k, False, sampling) for k in ks]
        out.append(Config(f"adaptive k<={max(ks)}", "spec", max(ks), True, sampling))
    if overlap_k:
        out.append(Config(f"k={overlap_k} overlap", "overlap", overlap_k, False, "greedy"))
    return out


def load_configs(k: int, max_k: int, samplings: list[str]) -> list[Config]:
    """What the load runs compare, per sampling mode: the target alone, a fixed k, adaptive k."""
    out = []
    for sampling in samplings:
        out += [Config("target alone", "alone", 0, False, sampling), Config(f"k={k}", "spec", k, False, sampling),
                Config(f"adaptive k<={max_k}", "spec", max_k, True, sampling)]  # fmt: skip
    return out


@dataclass
class Run:
    """One request: what it produced and how long it took, as the client saw it."""

    engine: str  # "specdec" or "hf"
    target_dtype: str
    config: str
    k: int
    adaptive: bool
    sampling: str
    prompt_id: str
    prompt_tokens: int
    token_ids: list[int]
    seconds: float
    first_token_seconds: float
    steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    proposed_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    request_id: str = ""
    cold: bool = False  # the first request the target served after it started

    def as_dict(self) -> dict:
        return asdict(self)

    def tally(self) -> Tally:
        return Tally(
            steps=self.steps,
            drafting_steps=self.proposed_per_position[0] if self.proposed_per_position else 0,
            proposed=self.draft_tokens,
            accepted=self.accepted_tokens,
            emitted=len(self.token_ids) - 1 if self.steps else 0,
            proposed_per_position=list(self.proposed_per_position),
            accepted_per_position=list(self.accepted_per_position),
        )


def timed_request(stub, request: generate_pb2.GenerateRequest) -> tuple[list[int], float, float, object]:
    """-> (token ids, seconds, seconds to the first token, the last response)."""
    start = time.perf_counter()
    first, tokens, last = None, [], None
    for response in stub.Generate(request, timeout=3600):
        if first is None:
            first = time.perf_counter() - start
        tokens += response.token_ids
        last = response
    return tokens, time.perf_counter() - start, first, last


@contextlib.contextmanager
def services(target: str, draft: str, target_dtype: str, draft_dtype: str, tokenizer: str, base_port: int,
             env: dict[str, str], log, max_seq_len: int, pin_cores: bool = False,
             device_flags: dict[str, list[str]] | None = None):  # fmt: skip
    """Target and draft services, and three orchestrators over them: target alone, speculation,
    speculation with overlap. Yields {orchestrator name: address}. pin_cores: the draft on CPU 0
    and the target on CPU 1, one thread each, as if each had a device of its own. device_flags:
    extra flags per role ("target", "draft"), e.g. the ttnn backend and each one's device."""
    device_flags = device_flags or {}
    procs = []
    seq = ["--max-seq-len", str(max_seq_len), *(["--threads", "1"] if pin_cores else [])]
    ports = {"draft": base_port, "target": base_port + 1, "alone": base_port + 2, "spec": base_port + 3,
             "overlap": base_port + 4}  # fmt: skip
    try:
        target_flags = ["--model", target, "--dtype", target_dtype, *seq, *device_flags.get("target", [])]
        procs.append(
            serve.launch("target_service", ports["target"], target_flags, env, log, cpus="1" if pin_cores else None)
        )
        draft_flags = ["--model", draft, "--dtype", draft_dtype, *seq, *device_flags.get("draft", [])]
        procs.append(
            serve.launch("draft_service", ports["draft"], draft_flags, env, log, cpus="0" if pin_cores else None)
        )
        common = ["--target", f"127.0.0.1:{ports['target']}", "--tokenizer", tokenizer, "--max-draft-tokens", "16",
                  *device_flags.get("orchestrator", [])]  # fmt: skip
        draft_address = f"127.0.0.1:{ports['draft']}"
        for name, flags in (("alone", ["--draft", ""]), ("spec", ["--draft", draft_address]),
                            ("overlap", ["--draft", draft_address, "--overlap"])):  # fmt: skip
            procs.append(serve.launch("orchestrator", ports[name], [*common, *flags], env, log))
        yield {name: f"127.0.0.1:{ports[name]}" for name in ("alone", "spec", "overlap")}
    finally:
        serve.stop_all(procs)


def run_config(address: str, config: Config, target_dtype: str, prompt_id: str, prompt_token_ids: list[int],
               max_tokens: int, seed: int) -> Run:  # fmt: skip
    with grpc.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        tokens, seconds, first, last = timed_request(stub, config.request(prompt_token_ids, max_tokens, seed))
    s = last.stats
    return Run(
        engine="specdec", target_dtype=target_dtype, config=config.name, k=config.k, adaptive=config.adaptive,
        sampling=config.sampling, prompt_id=prompt_id, prompt_tokens=len(prompt_token_ids), token_ids=tokens,
        seconds=seconds, first_token_seconds=first, steps=s.steps, draft_tokens=s.draft_tokens,
        accepted_tokens=s.accepted_tokens, proposed_per_position=list(s.proposed_per_position),
        accepted_per_position=list(s.accepted_per_position), request_id=last.request_id,
    )  # fmt: skip
