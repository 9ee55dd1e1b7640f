"""Streaming text: UTF-8 safe deltas, stop strings, EOS and stop tokens, chat templates."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from orchestrator.clients import RemoteSession
from orchestrator.text import TextStream
from orchestrator.validation import Limits, validate
from specdec.v1 import generate_pb2
from tests.tiny import greedy_reference

TEXT = "héllo wörld 🙂 naïve café 🙂🙂 done"


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A byte-level BPE with few merges: accented letters and emoji span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    tok.train_from_iterator(["hello world done " * 20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def stream_all(tokenizer, ids, stop=(), prompt=()):
    text = TextStream(tokenizer, list(prompt), list(stop))
    deltas, emitted = [], []
    for token in ids:
        emitted.append(token)
        stopped = text.add(token)
        deltas.append(text.take(final=stopped))
        if stopped:
            break
    deltas.append(text.take(final=True))
    return deltas, emitted, text.stopped


def test_multibyte_characters_arrive_whole(byte_tokenizer):
    ids = byte_tokenizer.encode(TEXT)
    assert len(ids) > len(TEXT.encode()) / 2  # characters really are split across tokens
    deltas, _, _ = stream_all(byte_tokenizer, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == TEXT


def test_stop_string_cuts_the_text_and_the_tokens(byte_tokenizer):
    ids = byte_tokenizer.encode(TEXT)
    deltas, emitted, stopped = stream_all(byte_tokenizer, ids, stop=["café"])
    assert stopped and "".join(deltas) == "héllo wörld 🙂 naïve "
    # generation stopped at the token that completed the stop string, not later
    assert byte_tokenizer.decode(emitted).endswith(("café", "café ")) or "café" in byte_tokenizer.decode(emitted)
    assert "café" not in byte_tokenizer.decode(emitted[:-1])


def test_text_a_stop_string_may_claim_is_held_back(byte_tokenizer):
    ids = byte_tokenizer.encode("hello world")
    text = TextStream(byte_tokenizer, [], ["world!"])
    shown = ""
    for token in ids:
        text.add(token)
        shown += text.take()
    assert shown == "hello "  # "world" could still become "world!"
    assert shown + text.take(final=True) == "hello world"


def test_earliest_of_several_stop_strings_wins(byte_tokenizer):
    deltas, _, _ = stream_all(byte_tokenizer, byte_tokenizer.encode(TEXT), stop=["naïve", "wör"])
    assert "".join(deltas) == "héllo "


def test_remote_session_plans_rollback_from_what_the_replica_holds():
    session = RemoteSession.__new__(RemoteSession)
    session.cached, session.agreed = [], 0
    committed = [1, 2, 3]
    plan = session.plan(committed, need_last_logits=False)  # prefill: cache everything
    assert (plan.start_position, plan.new_tokens, plan.rolled_back) == (0, [1, 2, 3], 0)
    session.record(0, [1, 2, 3])
    plan = session.plan(committed + [4], need_last_logits=True)
    assert (plan.start_position, plan.new_tokens) == (3, [4])
    session.record(3, [4, 9, 9])  # fed 4 and two proposals
    committed += [4, 9, 5]  # first proposal accepted, second rejected and corrected to 5
    plan = session.plan(committed, need_last_logits=True)
    assert (plan.start_position, plan.new_tokens, plan.rolled_back) == (5, [5], 1)
    session.record(5, [5])
    plan = session.plan(committed, need_last_logits=True)  # the last token is always re-fed
    assert (plan.start_position, plan.new_tokens, plan.rolled_back) == (5, [5], 1)


# --- end to end -------------------------------------------------------------------------------


def generate(stack, **fields):
    responses = list(stack.generator().Generate(generate_pb2.GenerateRequest(**fields), timeout=30))
    return [t for r in responses for t in r.token_ids], "".join(r.text for r in responses), responses[-1]


def test_stream_text_is_the_text_that_follows_the_prompt(stack, engines, model_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dirs["target"])
    tokens, text, last = generate(stack, prompt="w1 w2 w3", max_tokens=12, ignore_eos=True)
    assert tokens == greedy_reference(engines["target"], [1, 2, 3], 12)
    prompt_text = tokenizer.decode([1, 2, 3], skip_special_tokens=True)
    assert text == tokenizer.decode([1, 2, 3] + tokens, skip_special_tokens=True)[len(prompt_text) :]
    assert last.stats.prompt_tokens == 3 and last.request_id


def test_stop_string_end_to_end(stack, engines):
    reference = greedy_reference(engines["target"], [1, 2, 3], 16)
    words = [f"w{t}" for t in reference]
    stop = " ".join(words[4:6])  # two words: cannot be a substring of an earlier word
    first = " ".join(words).find(stop)
    tokens, text, last = generate(stack, prompt_token_ids=[1, 2, 3], max_tokens=16, stop=[stop], ignore_eos=True)
    assert text == " " + " ".join(words)[:first]  # the output text continues the prompt's
    assert tokens == reference[: len(tokens)] and len(tokens) <= 6
    assert last.finish_reason == generate_pb2.FINISH_REASON_STOP


def test_stop_token_ends_generation_after_it(stack, engines):
    reference = greedy_reference(engines["target"], [1, 2, 3], 16)
    stop_token = reference[5]
    tokens, _, last = generate(
        stack, prompt_token_ids=[1, 2, 3], max_tokens=16, stop_token_ids=[stop_token], ignore_eos=True
    )
    assert tokens == reference[: reference.index(stop_token) + 1]
    assert last.finish_reason == generate_pb2.FINISH_REASON_STOP
    assert last.stats.completion_tokens == len(tokens)


def test_chat_template_wraps_the_prompt(stack, engines):
    tokens, _, last = generate(stack, prompt="w4 w5", chat=True, max_tokens=6, ignore_eos=True)
    assert last.stats.prompt_tokens == 2  # the tiny template adds no tokens of its own
    assert tokens == greedy_reference(engines["target"], [4, 5], 6)


def test_eos_stops_unless_ignored(byte_tokenizer):
    limits = Limits(
        vocab_size=300,
        context_len=64,
        max_tokens_limit=32,
        default_max_tokens=8,
        default_num_draft_tokens=4,
        max_draft_tokens=8,
    )
    msg = generate_pb2.GenerateRequest(prompt_token_ids=[1], stop_token_ids=[7])
    assert validate(msg, byte_tokenizer, limits, (0,)).stop_token_ids == {0, 7}
    msg.ignore_eos = True
    assert validate(msg, byte_tokenizer, limits, (0,)).stop_token_ids == {7}
    assert validate(msg, byte_tokenizer, limits, (0,)).max_tokens == 8  # the default
