"""The model-free draft (specdec/engine/ngram.py): proposals follow the prompt-lookup rule, and
speculation with it is exact: greedy output equals the target alone, sampled output keeps the
target's distribution."""

from __future__ import annotations

import pytest

from specdec.engine.ngram import NgramEngine, lookup
from specdec.engine.torch_engine import TorchEngine
from specdec.sampling import SamplingParams
from specdec.v1 import generate_pb2
from tests.servers import start_stack
from tests.stats import chi_square_pvalue
from tests.test_sampling import (
    NUM_TOKENS,
    PASS_P,
    PROMPT,
    VOCAB,
    sample_speculative,
    target_sequence_distribution,
)
from tests.tiny import greedy_reference, save_tiny_model


@pytest.mark.parametrize(
    "tokens, expected",
    [
        ([1, 2, 3, 9, 1, 2, 3], 9),  # the 3-gram (1, 2, 3) was followed by 9
        ([4, 2, 3, 7, 9, 2, 3], 7),  # (2, 3) was followed by 7
        ([5, 1, 2, 7, 5, 1, 2, 8, 4, 1, 2], 8),  # the most recent occurrence wins
        ([1, 1, 1, 1], 1),  # an occurrence may overlap the suffix
        ([1, 2, 3, 1], None),  # one token repeated is not a match (MIN_N = 2)
        ([1, 2, 3], None),  # nothing occurred before
        ([7], None),
    ],
)
def test_lookup_proposes_what_followed_the_latest_longest_match(tokens, expected):
    assert lookup(tokens) == expected


def test_a_longer_match_beats_a_more_recent_shorter_one():
    tokens = [1, 2, 3, 7, 9, 2, 3, 6, 1, 2, 3]  # (1, 2, 3) -> 7 at the start; (2, 3) -> 6 more recently
    assert lookup(tokens) == 7 and lookup(tokens, max_n=2) == 6


def propose(engine: NgramEngine, tokens: list[int], k: int, sampling: SamplingParams):
    """What the draft service proposes for `tokens`, its job run pass by pass as the scheduler
    runs it. -> (proposals, positions the session holds after the job)."""
    from specdec.sampling import Sampler
    from specdec.serving.jobs import ProposeJob

    session = engine.new_session(len(tokens) + k)
    job = ProposeJob.build(session, 0, tokens, k, Sampler(sampling), engine.info.vocab_size, 0.0)
    while not job.done:
        job.take(engine.run([job.next_chunk(len(tokens))])[0])
    engine.end_session(session)
    return job.proposed, session.length


@pytest.mark.parametrize(
    "sampling", [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9)], ids=["greedy", "sampled"]
)
def test_proposals_copy_the_match_and_stop_where_the_command_s_tokens_end(model_dirs, sampling):
    """k follows the match length; the draft holds all its proposals but the last, as the
    orchestrator's cache mirror assumes (orchestrator/clients.py)."""
    engine = NgramEngine.load(model_dirs["target"], max_seq_len=64, max_sessions=1)
    cases = [
        (
            [1, 3, 4, 5, 6, 2, 3, 4],
            6,
            [5, 6, 2, 3, 4],
        ),  # (3, 4) -> copy 5, 6, 2, 3, 4: the copy ends at the tokens' end
        ([8, 4, 5, 9, 1, 4, 5], 6, [9, 1, 4, 5]),
        ([7, 1, 2, 9, 3, 1, 2], 3, [9, 3, 1]),  # k caps it
        ([10, 11, 12, 13, 14, 1, 2, 3, 10, 11], 10, [12, 13, 14, 1, 2, 3, 10, 11]),  # never its own proposals
        ([1, 2, 3, 4], 4, []),  # nothing matches: no proposal, a plain target step
    ]
    for tokens, k, expected in cases:
        proposed, held = propose(engine, tokens, k, sampling)
        assert proposed == expected, tokens
        assert held == len(tokens) + max(len(proposed) - 1, 0)


REPEATING = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]  # what prompt lookup is for


def loose_ngram_draft(model_dir, max_seq_len: int) -> NgramEngine:
    """Matching from one token on: the tiny random targets seldom repeat two tokens, and the
    tests want proposals, accepted and rejected, to go through the whole path."""
    strict = NgramEngine.load(model_dir, max_seq_len=max_seq_len, max_sessions=8)
    return NgramEngine(strict.info, 8 * max_seq_len, min_n=1, max_n=3)


@pytest.fixture(scope="module")
def ngram_stack(loop, engines, model_dirs):
    draft = loose_ngram_draft(model_dirs["target"], 512)
    stack = start_stack(loop, engines["target"], draft, str(model_dirs["target"]))
    yield stack
    stack.stop()


@pytest.mark.parametrize("prompt", [REPEATING, [1, 2, 3], [9, 4, 9, 4, 9, 4, 9]])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_with_the_ngram_draft_equals_the_target_alone(ngram_stack, engines, prompt, k):
    request = generate_pb2.GenerateRequest(prompt_token_ids=prompt, max_tokens=24, num_draft_tokens=k, ignore_eos=True)
    responses = list(ngram_stack.generator().Generate(request, timeout=60))
    assert [t for r in responses for t in r.token_ids] == greedy_reference(engines["target"], prompt, 24)
    assert responses[-1].stats.draft_tokens > 0


def test_some_ngram_proposals_are_accepted(ngram_stack):
    """Not only rejections go through: where the output repeats itself, lookup predicts it."""
    accepted = 0
    for prompt in (REPEATING, [1, 2, 3], [9, 4, 9, 4, 9, 4, 9]):
        request = generate_pb2.GenerateRequest(
            prompt_token_ids=prompt, max_tokens=64, num_draft_tokens=4, ignore_eos=True
        )
        accepted += list(ngram_stack.generator().Generate(request, timeout=60))[-1].stats.accepted_tokens
    assert accepted > 0


def test_sampling_with_the_ngram_draft_keeps_the_target_distribution(loop, tmp_path_factory):
    """The chi-square test the model draft passes (tests/test_sampling.py), with a one-hot q."""
    target_dir = save_tiny_model(tmp_path_factory.mktemp("ngram_small") / "target", vocab_size=VOCAB,
                                 hidden_size=32, num_layers=4, init_std=0.15, seed=7)  # fmt: skip
    target = TorchEngine.load(target_dir, dtype="float64")
    stack = start_stack(loop, target, loose_ngram_draft(target_dir, 64), str(target_dir))
    try:
        params = SamplingParams(temperature=1.0)
        expected = target_sequence_distribution(target, PROMPT, NUM_TOKENS, params)
        assert chi_square_pvalue(sample_speculative(stack, params, trials=1000), expected) > PASS_P
    finally:
        stack.stop()
