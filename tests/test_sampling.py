"""Sampling is lossless: speculative samples follow the target's processed distribution.

Each statistical test has a negative control: a biased acceptance rule (accept a proposal only
when it is the target's argmax, the classic mistake) run through the same check must fail it, so
the check is known to have the power to catch a wrong algorithm. Seeds are fixed: deterministic.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import orchestrator.speculative
from orchestrator.acceptance import accept_greedy, accept_sampled, sample
from specdec.engine.base import forward_one
from specdec.engine.torch_engine import TorchEngine
from specdec.errors import InvalidArgument
from specdec.sampling import SamplingParams, processed_probs, wire_probs
from specdec.v1 import generate_pb2
from tests.servers import record_drafted_ahead, start_stack
from tests.stats import chi_square_pvalue
from tests.tiny import save_layer_skip_draft, save_tiny_model

PASS_P = 1e-3  # a correct sampler fails this with probability 0.001 (and, seeds fixed, never)
FAIL_P = 1e-6  # a biased one must be rejected far more clearly


def biased_accept(proposed, draft_probs, target_probs, generator):
    """Wrong on purpose: keeps a proposal only when it is p's argmax, else samples p."""
    for i, token in enumerate(proposed):
        if token != int(target_probs[i].argmax()):
            return i, sample(target_probs[i], generator)
    return len(proposed), sample(target_probs[len(proposed)], generator)


# --- processing -------------------------------------------------------------------------------


def test_temperature_is_softmax_of_scaled_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0, -1.0]])
    probs = processed_probs(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(probs, torch.softmax(logits / 0.5, dim=-1))


def test_top_k_keeps_the_k_most_likely():
    logits = torch.tensor([[0.1, 3.0, 2.0, 1.0, -1.0]])
    probs = processed_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert probs[0].nonzero().flatten().tolist() == [1, 2]
    assert torch.allclose(probs[0, [1, 2]], torch.softmax(torch.tensor([3.0, 2.0]), dim=-1))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs_in = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs_in.log()
    kept = lambda p: processed_probs(logits, SamplingParams(temperature=1.0, top_p=p))[0].nonzero().flatten().tolist()
    assert kept(0.5) == [0]  # 0.5 alone reaches 0.5
    assert kept(0.6) == [0, 1]
    assert kept(0.95) == [0, 1, 2]
    assert kept(0.96) == [0, 1, 2, 3]
    assert kept(1.0) == [0, 1, 2, 3]
    out = processed_probs(logits, SamplingParams(temperature=1.0, top_p=0.6))[0]
    assert torch.allclose(out[:2], torch.tensor([0.5, 0.3]) / 0.8)


@pytest.mark.parametrize(
    "params, field",
    [
        (SamplingParams(temperature=-0.1), "sampling.temperature"),
        (SamplingParams(temperature=math.nan), "sampling.temperature"),
        (SamplingParams(temperature=math.inf), "sampling.temperature"),
        (SamplingParams(temperature=1.0, top_p=0.0), "sampling.top_p"),
        (SamplingParams(temperature=1.0, top_p=1.5), "sampling.top_p"),
        (SamplingParams(temperature=1.0, top_p=math.nan), "sampling.top_p"),
    ],
)
def test_invalid_sampling_params_name_the_field(params, field):
    with pytest.raises(InvalidArgument) as e:
        params.validate()
    assert e.value.field == field


# --- acceptance, unit level ---------------------------------------------------------------------


def test_greedy_acceptance():
    assert accept_greedy([5, 6, 7], [5, 6, 7, 8]) == (3, 8)  # all accepted, bonus 8
    assert accept_greedy([5, 6, 7], [5, 9, 7, 8]) == (1, 9)  # second rejected, corrected to 9
    assert accept_greedy([5, 6, 7], [4, 6, 7, 8]) == (0, 4)
    assert accept_greedy([], [3]) == (0, 3)  # no draft: plain decode


def simulate(accept, p: torch.Tensor, q: torch.Tensor, k: int, trials: int, seed: int) -> list[tuple[int, ...]]:
    """Speculative sampling of L = len(p) positions whose distributions do not depend on context:
    p[j], q[j] are the target's and the draft's rows for position j. Returns the sampled sequences."""
    length = p.shape[0]
    generator = torch.Generator().manual_seed(seed)
    sequences = []
    for _ in range(trials):
        out: list[int] = []
        while len(out) < length:
            pos, kk = len(out), min(k, length - len(out) - 1)
            proposed = [sample(q[pos + i], generator) for i in range(kk)]
            accepted, token = accept(proposed, q[pos : pos + kk], p[pos : pos + kk + 1], generator)
            out += proposed[:accepted] + [token]
        sequences.append(tuple(out))
    return sequences


def context_free_rows(vocab: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(2 * torch.randn(length, vocab, generator=g, dtype=torch.float64), dim=-1)
    q = torch.softmax(2 * torch.randn(length, vocab, generator=g, dtype=torch.float64), dim=-1)
    return p, q


def product_distribution(p: torch.Tensor) -> dict[tuple[int, ...], float]:
    dist = {(): 1.0}
    for row in p:
        dist = {seq + (t,): prob * float(row[t]) for seq, prob in dist.items() for t in range(row.shape[0])}
    return dist


@pytest.mark.parametrize("k", [1, 3])
def test_rejection_sampling_follows_target_distribution(k):
    p, q = context_free_rows(vocab=5, length=3, seed=k)
    expected = product_distribution(p)
    samples = simulate(accept_sampled, p, q, k, trials=20_000, seed=100 + k)
    assert chi_square_pvalue(samples, expected) > PASS_P
    biased = simulate(biased_accept, p, q, k, trials=20_000, seed=100 + k)
    assert chi_square_pvalue(biased, expected) < FAIL_P


def test_rejection_when_draft_is_target_accepts_everything():
    p, _ = context_free_rows(vocab=5, length=1, seed=0)
    generator = torch.Generator().manual_seed(0)
    rows = p.repeat(4, 1)
    for _ in range(200):
        proposed = [sample(rows[i], generator) for i in range(3)]
        assert accept_sampled(proposed, rows[:3], rows, generator)[0] == 3


# --- end to end over gRPC -----------------------------------------------------------------------

VOCAB = 4
PROMPT = [1, 2, 3]
NUM_TOKENS = 4  # the prefill token, then a step with k = 2 (k is capped at what can still be emitted)


@pytest.fixture(scope="module")
def small_vocab_stack(loop, tmp_path_factory):
    root = tmp_path_factory.mktemp("small_vocab")
    # Small weights keep the distributions broad; the layer-skip draft often proposes the target's
    # argmax without matching p, which is where a biased rule goes wrong (chosen by measuring).
    target_dir = save_tiny_model(root / "target", vocab_size=VOCAB, hidden_size=32, num_layers=4, init_std=0.15, seed=7)
    draft_dir = save_layer_skip_draft(target_dir, root / "draft", num_layers=2)
    target = TorchEngine.load(target_dir, dtype="float64")
    stack = start_stack(loop, target, TorchEngine.load(draft_dir, dtype="float64"), str(target_dir))
    yield stack, target
    stack.stop()


def target_sequence_distribution(engine, prompt, length, params) -> dict[tuple[int, ...], float]:
    """The probability of every continuation of `length` tokens under the target's processed
    distribution, as it crosses the wire (float16, renormalised), by enumeration."""
    dist = {}

    def extend(prefix: list[int], prob: float):
        if len(prefix) == length:
            dist[tuple(prefix)] = prob
            return
        session = engine.new_session(len(prompt) + length)
        row = wire_probs(forward_one(engine, session, prompt + prefix, 1).logits, params)[0].double()
        engine.end_session(session)
        row /= row.sum()
        for token in range(row.shape[0]):
            if row[token] > 0:
                extend(prefix + [token], prob * float(row[token]))

    extend([], 1.0)
    return dist


def sample_speculative(stack, params: SamplingParams, trials: int) -> list[tuple[int, ...]]:
    """One generation per seed 0..trials-1, four at a time (the servers serve them concurrently)."""
    stub = stack.generator()

    def generate(seed: int) -> tuple[int, ...]:
        sampling = generate_pb2.SamplingParams(
            temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=seed
        )
        request = generate_pb2.GenerateRequest(
            prompt_token_ids=PROMPT, max_tokens=NUM_TOKENS, num_draft_tokens=2, ignore_eos=True, sampling=sampling
        )
        return tuple(t for r in stub.Generate(request, timeout=30) for t in r.token_ids)

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(generate, range(trials)))


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3, top_p=0.9)],
    ids=["plain", "processed"],
)
def test_speculative_samples_follow_target_distribution_over_grpc(small_vocab_stack, params, monkeypatch):
    stack, target = small_vocab_stack
    expected = target_sequence_distribution(target, PROMPT, NUM_TOKENS, params)
    samples = sample_speculative(stack, params, trials=1000)
    assert chi_square_pvalue(samples, expected) > PASS_P
    # The same check catches a biased acceptance rule in the real server.
    monkeypatch.setattr(orchestrator.speculative, "accept_sampled", biased_accept)
    assert chi_square_pvalue(sample_speculative(stack, params, trials=400), expected) < FAIL_P


def test_same_seed_same_output(small_vocab_stack):
    stack, _ = small_vocab_stack
    params = SamplingParams(temperature=1.0)
    first = sample_speculative(stack, params, trials=20)
    assert sample_speculative(stack, params, trials=20) == first
    assert len(set(first)) > 1  # different seeds do give different samples


def marginal_of_last(dist: dict[tuple[int, ...], float], n: int) -> dict[tuple[int, ...], float]:
    out: dict[tuple[int, ...], float] = {}
    for sequence, prob in dist.items():
        out[sequence[-n:]] = out.get(sequence[-n:], 0.0) + prob
    return out


def test_overlap_and_adaptive_k_sampling_is_lossless(loop, tmp_path_factory, monkeypatch):
    """Six tokens, k = 1 or adaptive up to 2: from the second step on, blocks drafted ahead (while
    the previous block was verified) are used whenever the target took the draft's guess. The
    last three tokens, which such blocks produce, follow the target's distribution."""
    root = tmp_path_factory.mktemp("overlap")
    target_dir = save_tiny_model(root / "target", vocab_size=VOCAB, hidden_size=32, num_layers=4, init_std=0.15, seed=7)
    target = TorchEngine.load(target_dir, dtype="float64")
    draft = TorchEngine.load(save_layer_skip_draft(target_dir, root / "draft", num_layers=2), dtype="float64")
    stack = start_stack(loop, target, draft, str(target_dir), "--overlap")
    drafted_ahead = record_drafted_ahead(monkeypatch)
    params, length = SamplingParams(temperature=1.0), 6
    try:
        stub = stack.generator()

        def generate(seed: int) -> tuple[int, ...]:
            request = generate_pb2.GenerateRequest(
                prompt_token_ids=PROMPT, max_tokens=length, num_draft_tokens=1 + seed % 2, ignore_eos=True,
                adaptive_draft_tokens=seed % 2 == 1, sampling=generate_pb2.SamplingParams(temperature=1.0, seed=seed),
            )  # fmt: skip
            return tuple(t for r in stub.Generate(request, timeout=30) for t in r.token_ids)

        with ThreadPoolExecutor(4) as pool:
            samples = list(pool.map(generate, range(800)))
    finally:
        stack.stop()
    expected = marginal_of_last(target_sequence_distribution(target, PROMPT, length, params), 3)
    assert chi_square_pvalue([s[-3:] for s in samples], expected) > PASS_P
    assert 0.1 < sum(drafted_ahead) / len(drafted_ahead) < 0.9  # the drafted-ahead path was exercised
