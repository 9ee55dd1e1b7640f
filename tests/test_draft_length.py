"""The adaptive choice of k."""

from __future__ import annotations

import pytest

from orchestrator.draft_length import AdaptiveDraftLength, FixedDraftLength, expected_tokens


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0  # only the target's own token
    assert expected_tokens(1.0, 4) == 5.0  # everything accepted, plus the bonus
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    # simulated: accept each proposal with probability a until the first rejection
    import random

    rng, a, k = random.Random(0), 0.8, 4
    emitted = [next((i for i in range(k) if rng.random() >= a), k) + 1 for _ in range(200_000)]
    assert sum(emitted) / len(emitted) == pytest.approx(expected_tokens(a, k), rel=0.01)


def feed(policy, steps, accepted_fraction, draft_seconds, verify_seconds):
    for i in range(steps):
        k = policy.next()
        accepted = round(k * accepted_fraction) if i % 3 else k  # some whole blocks, some rejections
        policy.update(k, accepted, draft_seconds * k, verify_seconds)


def test_starts_at_the_requested_k_until_it_has_measured():
    policy = AdaptiveDraftLength(max_k=8, initial_k=3)
    assert policy.next() == 3
    policy.update(3, 3, 0.3, 1.0)
    assert policy.next() != 3 or policy.acceptance > 0.7


def test_cheap_draft_that_is_always_right_gets_the_largest_k():
    policy = AdaptiveDraftLength(max_k=8, initial_k=2)
    for _ in range(20):
        k = policy.next()
        policy.update(k, k, 0.01 * k, 1.0)
    assert policy.next() == 8


def test_a_draft_that_is_usually_wrong_gets_k_1():
    policy = AdaptiveDraftLength(max_k=8, initial_k=4)
    for _ in range(30):
        k = policy.next()
        policy.update(k, 0, 0.2 * k, 1.0)
    assert policy.next() == 1


def test_an_expensive_draft_gets_a_smaller_k_than_a_cheap_one():
    cheap, costly = AdaptiveDraftLength(8, 4), AdaptiveDraftLength(8, 4)
    feed(cheap, 30, 0.75, 0.05, 1.0)
    feed(costly, 30, 0.75, 0.6, 1.0)
    assert costly.next() < cheap.next()


def test_overlap_hides_drafting_up_to_the_verify_time():
    turns, overlap = AdaptiveDraftLength(8, 4), AdaptiveDraftLength(8, 4, overlap=True)
    for policy in (turns, overlap):
        for _ in range(40):  # always right; a draft token costs a fifth of a verify
            policy.update(4, 4, 0.2 * 4, 1.0)
    assert turns.step_seconds(3) == pytest.approx(1.0 + 3 * 0.2)
    assert overlap.step_seconds(3) == pytest.approx(1.0) and overlap.step_seconds(8) == pytest.approx(1.6)
    # drafting is free up to the verify time: k = T_verify / T_draft = 5
    assert overlap.next() == 5


def test_a_whole_block_is_no_rejection():
    policy = AdaptiveDraftLength(8, 4)
    before = policy.rejected
    policy.update(4, 4, 0.4, 1.0)
    assert policy.rejected == pytest.approx(0.9 * before)
    policy.update(4, 2, 0.4, 1.0)
    assert policy.rejected == pytest.approx(0.81 * before + 1)


def test_drafted_ahead_steps_do_not_count_as_free_drafting():
    policy = AdaptiveDraftLength(8, 4)
    policy.update(4, 4, 0.4, 1.0)
    policy.update(4, 4, None, 1.0)
    assert policy.draft_seconds == pytest.approx(0.1)


def test_fixed_is_fixed():
    policy = FixedDraftLength(5)
    policy.update(5, 0, 1.0, 1.0)
    assert policy.next() == 5
