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


NGRAM = "ngram "  # the name prefix of the configurations the n-gram draft serves
ON = " on "  # a target column reads "gguf on llama.cpp" off torch, the dtype alone on it


def target_label(dtype: str, backend: str) -> str:
    """What a row's target column says: the dtype, and the backend where it is not torch."""
    return dtype if backend == "torch" else f"{dtype}{ON}{backend}"


def label_dtype(label: str) -> str:
    """The dtype in a target_label."""
    return label.split(ON)[0]


@dataclass(frozen=True)
class Config:
    name: str  # "target alone", "k=4", "adaptive k<=8", "k=4 overlap", "ngram k=4"
    orchestrator: str  # which orchestrator serves it: "alone", "spec", "overlap" or "ngram"
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


def speculative(ks: list[int], max_k: int, sampling: str, draft: str) -> list[Config]:
    """Each fixed k in ks, then adaptive k up to max_k, with one draft ("model" or "ngram")."""
    prefix, orchestrator = ("", "spec") if draft == "model" else (NGRAM, "ngram")
    return [*(Config(f"{prefix}k={k}", orchestrator, k, False, sampling) for k in ks),
            Config(f"{prefix}adaptive k<={max_k}", orchestrator, max_k, True, sampling)]  # fmt: skip


def configs(ks: list[int], samplings: list[str], overlap_k: int | None, drafts: tuple[str, ...] = ("model",)) -> list[Config]:  # fmt: skip
    out = []
    for sampling in samplings:
        out.append(Config("target alone", "alone", 0, False, sampling))
        out += [c for draft in drafts for c in speculative(ks, max(ks), sampling, draft)]
    if overlap_k and "model" in drafts:  # an n-gram draft costs nothing to hide
        out.append(Config(f"k={overlap_k} overlap", "overlap", overlap_k, False, "greedy"))
    return out


def load_configs(k: int, max_k: int, samplings: list[str], draft: str = "model") -> list[Config]:
    """What the load runs compare, per sampling mode: the target alone, a fixed k, adaptive k."""
    return [
        c for s in samplings for c in [Config("target alone", "alone", 0, False, s), *speculative([k], max_k, s, draft)]
    ]


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


PORTS = ("draft", "target", "alone", "spec", "overlap", "ngram draft", "ngram", "llama.cpp")  # from --port on


@contextlib.contextmanager
def services(target: str, draft: str, target_dtype: str, draft_dtype: str, tokenizer: str, base_port: int,
             env: dict[str, str], log, max_seq_len: int, pin_cores: bool = False,
             device_flags: dict[str, list[str]] | None = None, drafts: tuple[str, ...] = ("model",)):  # fmt: skip
    """The target service, a draft service per draft in drafts (the model draft; the n-gram one,
    which needs no weights), and orchestrators over them: target alone; with the model draft,
    speculation and speculation with overlap; with the n-gram draft, "ngram". Yields {orchestrator
    name: address}. pin_cores: the draft on CPU 0 and the target on CPU 1, one thread each, as if
    each had a device of its own. device_flags: extra flags per role ("target", "draft", "ngram
    draft", "orchestrator"), e.g. the backend and each one's device."""
    device_flags = device_flags or {}
    procs = []
    seq = ["--max-seq-len", str(max_seq_len), *(["--threads", "1"] if pin_cores else [])]
    ports = {name: base_port + i for i, name in enumerate(PORTS)}
    address = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    try:
        target_flags = ["--model", target, "--dtype", target_dtype, *seq, *device_flags.get("target", [])]
        procs.append(
            serve.launch("target_service", ports["target"], target_flags, env, log, cpus="1" if pin_cores else None)
        )
        orchestrators = {"alone": ["--draft", ""]}
        if "model" in drafts:
            draft_flags = ["--model", draft, "--dtype", draft_dtype, *seq, *device_flags.get("draft", [])]
            procs.append(
                serve.launch("draft_service", ports["draft"], draft_flags, env, log, cpus="0" if pin_cores else None)
            )
            orchestrators |= {
                "spec": ["--draft", address["draft"]],
                "overlap": ["--draft", address["draft"], "--overlap"],
            }
        if "ngram" in drafts:  # its --model names the vocabulary only: the target's
            ngram_flags = ["--method", "ngram", "--model", target, *seq, *device_flags.get("ngram draft", [])]
            procs.append(serve.launch("draft_service", ports["ngram draft"], ngram_flags, env, log))
            orchestrators["ngram"] = ["--draft", address["ngram draft"]]
        common = ["--target", address["target"], "--tokenizer", tokenizer, "--max-draft-tokens", "16",
                  *device_flags.get("orchestrator", [])]  # fmt: skip
        for name, flags in orchestrators.items():
            procs.append(serve.launch("orchestrator", ports[name], [*common, *flags], env, log))
        yield {name: address[name] for name in orchestrators}
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
