"""The adaptive choice of k, against the load: pass costs learnt from the services' responses."""

from __future__ import annotations

import random

import pytest

from orchestrator.draft_length import AdaptiveDraftLength, FixedDraftLength, best_draft_length, expected_tokens
from orchestrator.load import Load, PassCosts
from specdec.v1 import session_pb2


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0  # only the target's own token
    assert expected_tokens(1.0, 4) == 5.0  # everything accepted, plus the bonus
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    # simulated: accept each proposal with probability a until the first rejection
    rng, a, k = random.Random(0), 0.8, 4
    emitted = [next((i for i in range(k) if rng.random() >= a), k) + 1 for _ in range(200_000)]
    assert sum(emitted) / len(emitted) == pytest.approx(expected_tokens(a, k), rel=0.01)


def batch(rows: float, seconds: float, sessions: float = 1, passes: int = 1, shared: int = 1) -> session_pb2.BatchStats:
    """A response's stats: `passes` passes of `rows` rows and `shared` sessions each, `sessions`
    open on the service."""
    return session_pb2.BatchStats(passes=passes, rows=round(rows * passes), sessions=shared * passes,
                                  device_seconds=seconds * passes, open_sessions=round(sessions))  # fmt: skip


def costs(curve, sessions: float = 1, rows=(1, 2, 4, 8, 16, 32, 64, 128)) -> PassCosts:
    """A service whose pass of r rows costs curve(r), seen at these row counts."""
    c = PassCosts()
    for r in rows:
        c.observe(batch(r, curve(r), sessions))
    return c


def cpu_like(fixed: float, per_row: float):
    """A pass costs a fixed part (reading the weights) plus a part per row: what batching amortises."""
    return lambda rows: fixed + per_row * rows


def test_pass_costs_interpolate_between_buckets_and_extend_the_last_slope():
    c = costs(cpu_like(0.05, 0.002), rows=(1, 8, 32))
    assert c.seconds(1) == pytest.approx(0.052)
    assert c.seconds(20) == pytest.approx(0.05 + 0.002 * 20)  # between 8 and 32
    assert c.seconds(100) == pytest.approx(0.05 + 0.002 * 100)  # past 32, along the 8..32 slope
    assert c.seconds(0.5) == pytest.approx(0.052)  # never below what was measured
    one = costs(cpu_like(0.05, 0.002), rows=(4,))
    assert one.seconds(1) == one.seconds(16) == pytest.approx(0.058)  # one point: no slope to go by
    with pytest.raises(ValueError):
        PassCosts().seconds(1)


def test_pass_costs_follow_the_recent_passes_and_the_sessions_open():
    c = PassCosts()
    for _ in range(50):
        c.observe(batch(5, 0.1, sessions=1))
    for _ in range(50):
        c.observe(batch(5, 0.2, sessions=4))
    assert c.seconds(5) == pytest.approx(0.2, rel=0.01) and c.sessions == pytest.approx(4, rel=0.01)
    c.observe(session_pb2.BatchStats())  # a command that ran no pass (a bare open) changes nothing
    assert c.sessions == pytest.approx(4, rel=0.01)


def load_at(sessions: float, target, draft, overhead: float = 0.0) -> Load:
    return Load(target=costs(target, sessions), draft=costs(draft, sessions), overhead=overhead)


def test_alone_on_the_device_a_cheap_accurate_draft_gets_the_largest_k():
    load = load_at(1, target=cpu_like(0.05, 0.001), draft=cpu_like(0.005, 0.0001))
    assert best_draft_length(0.9, 8, load) == 8


def test_under_load_verifying_k_plus_1_rows_each_costs_more_and_k_0_wins():
    """The same pair: at 1 session speculation pays; at 16 sessions a verify pass of 16 (k + 1)
    rows costs several decode passes, and plain decoding (k = 0) is faster."""
    target, draft = cpu_like(0.05, 0.004), cpu_like(0.02, 0.002)
    assert best_draft_length(0.8, 8, load_at(1, target, draft)) > 0
    assert best_draft_length(0.8, 8, load_at(16, target, draft)) == 0
    # and in between the chosen k shrinks as the load grows
    ks = [best_draft_length(0.8, 8, load_at(n, target, draft)) for n in (1, 2, 4, 8, 16)]
    assert ks == sorted(ks, reverse=True) and ks[0] > ks[-1]


def test_a_draft_that_is_usually_wrong_is_not_used():
    load = load_at(1, target=cpu_like(0.05, 0.001), draft=cpu_like(0.02, 0.0001))
    assert best_draft_length(0.05, 8, load) == 0
    assert best_draft_length(0.95, 8, load) > 0


def test_overhead_outside_the_passes_favours_speculation_which_spreads_it_over_more_tokens():
    target, draft = cpu_like(0.05, 0.002), cpu_like(0.045, 0.0)
    assert best_draft_length(0.9, 4, load_at(1, target, draft)) == 0
    assert best_draft_length(0.9, 4, load_at(1, target, draft, overhead=0.2)) > 0


def test_overlap_hides_drafting_up_to_the_verify_time():
    load = load_at(1, target=lambda rows: 1.0, draft=lambda rows: 0.2)
    # always right, drafting is free up to the verify time: k = T_verify / T_draft = 5
    assert best_draft_length(1.0, 8, load, overlap=True) == 5
    assert best_draft_length(0.5, 8, load, overlap=False) < best_draft_length(0.5, 8, load, overlap=True)


def test_the_policy_measures_a_plain_decode_first_then_the_draft_then_reads_the_load():
    load = Load()
    policy = AdaptiveDraftLength(max_k=8, initial_k=3, load=load)
    assert policy.next() == 0  # nothing measured: first a plain decode, the baseline
    load.target.observe(batch(5, 0.06))
    assert policy.next() == 0  # a verify pass says little about a one-row decode
    load.target.observe(batch(1, 0.05))
    assert policy.next() == 3  # the draft's cost is still unknown: the requested k
    load.draft.observe(batch(1, 0.001))
    for _ in range(20):
        policy.update(4, 4)
    assert policy.next() == 8
    for _ in range(60):  # the load grows to 16 sessions: a plain decode there is not measured yet
        load.target.observe(batch(20, 0.3, sessions=16))
    assert policy.next() == 0


def test_a_whole_block_is_no_rejection():
    policy = AdaptiveDraftLength(8, 4)
    before = policy.rejected
    policy.update(4, 4)
    assert policy.rejected == pytest.approx(0.9 * before)
    policy.update(4, 2)
    assert policy.rejected == pytest.approx(0.81 * before + 1)
    accepted = policy.accepted
    policy.update(0, 0)  # a k = 0 step says nothing about the draft
    assert policy.accepted == accepted


def test_load_learns_the_step_overhead_outside_the_passes():
    load = Load()
    for _ in range(40):
        load.observe_step(wall_seconds=0.12, device_seconds=0.1)
    assert load.overhead == pytest.approx(0.02, rel=0.05)
    assert Load().sessions == 1.0


def test_fixed_is_fixed():
    policy = FixedDraftLength(5)
    policy.update(5, 0)
    assert policy.next() == 5


def test_speculating_sessions_that_drift_apart_pay_a_pass_each_and_k_0_wins():
    """At 8 sessions a cheap draft pays when all 8 verify in one pass; measured, their verify
    passes carry 2 sessions each, so the target runs 4 passes per round and plain decoding wins."""
    target, draft = cpu_like(0.05, 0.001), cpu_like(0.01, 0.0005)
    together = load_at(8, target, draft)
    assert best_draft_length(0.8, 8, together) > 0
    apart = load_at(8, target, draft)
    apart.target.observe(batch(10, target(10), sessions=8, shared=2), speculative=True)  # 2 blocks of 5 rows
    apart.draft.observe(batch(2, draft(2), sessions=8, shared=2, passes=4), speculative=True)
    assert apart.target.shared == apart.draft.shared == 2
    assert best_draft_length(0.8, 8, apart) == 0
    apart.target.observe(batch(10, target(10), sessions=8, shared=2))  # a plain pass: not speculative
    assert apart.target.shared == 2
