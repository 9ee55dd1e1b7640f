"""Many sessions in the same forward passes: outputs exactly as if each ran alone, the scheduler's
guarantees (starvation-free, prefill chunks beside decode steps, limits), a full KV pool, and a
session cancelled in the middle of a batch."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from specdec.engine.base import Engine
from specdec.engine.torch_engine import TorchEngine
from specdec.sampling import Sampler, SamplingParams
from specdec.serving.jobs import ProposeJob, ScoreJob
from specdec.serving.scheduler import Scheduler, plan_pass
from specdec.v1 import generate_pb2, session_pb2, session_pb2_grpc
from tests.servers import GatedEngine, start_stack
from tests.tiny import greedy_reference


class RecordingEngine(Engine):
    """Wraps an engine and keeps, per pass, each chunk's (session, rows)."""

    def __init__(self, inner: Engine):
        self.inner, self.info, self.pool = inner, inner.info, inner.pool
        self.passes: list[list[tuple[int, int]]] = []
        self.fail_next = False

    def new_session(self, capacity):
        return self.inner.new_session(capacity)

    def end_session(self, session):
        return self.inner.end_session(session)

    def run(self, chunks):
        self.passes.append([(id(c.session), len(c.token_ids)) for c in chunks])
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("a broken pass")
        return self.inner.run(chunks)


# --- through the services: exactness under batching ---------------------------------------------

REQUESTS = [  # (prompt, max_tokens, k, temperature, seed): lengths, k, greedy and sampled mixed
    ([11], 24, 1, 0.0, None),
    ([5, 3, 9, 2, 2, 7, 1], 30, 4, 0.0, None),
    (list(range(1, 30)), 20, 8, 0.0, None),
    ([7, 7], 28, 2, 0.0, None),
    ([4, 8, 15, 16, 23], 26, 4, 1.0, 11),
    ([9, 1, 30], 22, 3, 0.8, 12),
    (list(range(31, 1, -1)), 18, 2, 0.0, None),
    ([2], 32, 6, 1.0, 13),
]


def request(prompt, max_tokens, k, temperature, seed) -> generate_pb2.GenerateRequest:
    sampling = generate_pb2.SamplingParams(temperature=temperature)
    if seed is not None:
        sampling.seed = seed
    return generate_pb2.GenerateRequest(
        prompt_token_ids=prompt, max_tokens=max_tokens, num_draft_tokens=k, ignore_eos=True, sampling=sampling
    )


@pytest.fixture(scope="module")
def recorded_stack(loop, engines, model_dirs):
    target, draft = RecordingEngine(engines["target"]), RecordingEngine(engines["layer_skip"])
    stack = start_stack(loop, target, draft, str(model_dirs["target"]))
    yield stack, target, draft
    stack.stop()


def generate(stack, msg) -> list[int]:
    return [t for r in stack.generator().Generate(msg, timeout=120) for t in r.token_ids]


def test_concurrent_sessions_equal_their_sequential_runs_and_the_target_alone(recorded_stack, engines):
    stack, target, draft = recorded_stack
    alone = [generate(stack, request(*r)) for r in REQUESTS]  # one at a time
    target.passes.clear()
    draft.passes.clear()
    barrier = threading.Barrier(len(REQUESTS))

    def together(r):
        barrier.wait()
        return generate(stack, request(*r))

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        batched = list(pool.map(together, REQUESTS))
    assert batched == alone  # sampled ones too: each session's own seeded generators
    for (prompt, max_tokens, _, temperature, _), tokens in zip(REQUESTS, batched):
        if temperature == 0:
            assert tokens == greedy_reference(engines["target"], prompt, max_tokens)
    # and they did share passes: the target scored several sessions' blocks at once
    assert max(len(p) for p in target.passes) >= 4 and max(len(p) for p in draft.passes) >= 4
    assert all(len({s for s, _ in p}) == len(p) for p in target.passes + draft.passes)  # one chunk a session
    assert stack.wait_sessions(0) == {"target": 0, "draft": 0}


def test_a_session_cancelled_in_the_middle_of_a_batch_frees_its_kv_and_disturbs_no_other(recorded_stack, engines):
    stack, target, _ = recorded_stack
    used = {role: stack.info(role).kv_blocks_used for role in ("target", "draft")}
    long = generate_pb2.GenerateRequest(prompt_token_ids=[1, 2, 3], max_tokens=4000, ignore_eos=True)
    doomed = stack.generator().Generate(long, timeout=60)
    next(doomed)
    others = REQUESTS[:4]
    with ThreadPoolExecutor(len(others)) as pool:
        futures = [pool.submit(generate, stack, request(*r)) for r in others]
        for _ in range(5):
            next(doomed)  # it keeps stepping beside them
        info = stack.info("target")
        assert info.active_sessions >= 2 and info.kv_blocks_used > used["target"]
        doomed.cancel()
        outputs = [f.result() for f in futures]
    for (prompt, max_tokens, *_), tokens in zip(others, outputs):
        assert tokens == greedy_reference(engines["target"], prompt, max_tokens)
    assert stack.wait_sessions(0) == {"target": 0, "draft": 0}
    assert {role: stack.info(role).kv_blocks_used for role in ("target", "draft")} == used


def test_a_full_kv_pool_answers_resource_exhausted_and_serves_again_when_room_is_back(loop, model_dirs):
    engine = TorchEngine.load(model_dirs["target"], dtype="float64", kv_cache_memory=64 * 1024)  # 4 blocks of 16
    stack = start_stack(loop, engine, None, str(model_dirs["target"]))
    try:
        release = threading.Event()

        def requests():  # a session holding 3 of the 4 blocks, from outside the orchestrator
            yield session_pb2.TargetRequest(open=session_pb2.OpenSession(capacity=41))
            release.wait(30)

        holder = session_pb2_grpc.TargetServiceStub(stack.channel(stack.target.address)).Session(requests())
        next(holder)
        assert stack.info("target").kv_blocks_used == 3 and stack.info("target").kv_blocks_total == 4
        request = generate_pb2.GenerateRequest(prompt_token_ids=[1], max_tokens=40, ignore_eos=True)
        with pytest.raises(grpc.RpcError) as e:
            generate(stack, request)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "KV cache has 1 free blocks of 16 positions; capacity 41 needs 3" in e.value.details()
        release.set()
        holder.cancel()
        assert stack.wait_sessions(0, roles=("target",)) == {"target": 0}
        assert len(generate(stack, request)) == 40
    finally:
        stack.stop()


# --- the scheduler itself -------------------------------------------------------------------------


def score_job(engine, session, tokens, scored=1):
    return session, lambda: ScoreJob.build(session, session.length, tokens, scored, SamplingParams(),
                                           engine.info.vocab_size, 0.0)  # fmt: skip


def test_prefill_chunks_share_passes_with_decode_steps_and_the_limits_hold(engines):
    inner = RecordingEngine(engines["target"])
    engine = GatedEngine(inner)
    scheduler = Scheduler(engine, max_batch_tokens=24, prefill_chunk=8, block_rows=9, name="test")
    try:
        short = [inner.new_session(64) for _ in range(3)]
        for s in short:
            scheduler.submit(*score_job(inner, s, [1, 2])).result(10)
        engine.gate.clear()
        blocker = scheduler.submit(*score_job(inner, short[0], [3]))  # holds the device
        assert engine.blocked.wait(10)
        long = inner.new_session(128)
        prompt = scheduler.submit(*score_job(inner, long, [1 + i % 30 for i in range(59)]))  # 8 passes
        steps = [scheduler.submit(*score_job(inner, s, [4, 5, 6], 3)) for s in short[1:]]
        inner.passes.clear()
        engine.gate.set()
        blocker.result(10)
        for f in steps:
            f.result(10)
        assert not prompt.done()  # the decode steps finished while the prompt was still being cached
        prompt.result(10)
        first = inner.passes[1]  # after the held pass
        assert sorted(rows for _, rows in first) == [3, 3, 8]  # a prompt chunk beside both blocks
        assert all(sum(rows for _, rows in p) <= 24 for p in inner.passes)
        prompt_rows = [rows for p in inner.passes for s, rows in p if s == id(long)]
        assert prompt_rows == [8] * 7 + [3] and long.length == 59
    finally:
        engine.gate.set()
        scheduler.close()


def test_no_job_waits_more_than_the_passes_of_the_jobs_older_than_it(engines):
    """Many jobs, a budget that holds few of them: every job's first pass comes within the passes
    the older jobs need (each block here needs one), so nothing starves."""
    engine = RecordingEngine(engines["target"])
    scheduler = Scheduler(engine, max_batch_tokens=9, prefill_chunk=4, block_rows=9, name="test")
    try:
        sessions = [engine.new_session(64) for _ in range(12)]
        for s in sessions:
            scheduler.submit(*score_job(engine, s, [1, 2, 3, 4])).result(10)
        gate = GatedEngine(engine)
        scheduler.engine = gate
        gate.gate.clear()
        held = scheduler.submit(*score_job(engine, sessions[0], [1]))
        assert gate.blocked.wait(10)
        futures = [scheduler.submit(*score_job(engine, s, [5] * (1 + i % 5), 1 + i % 5)) for i, s in
                   enumerate(sessions[1:])]  # fmt: skip
        engine.passes.clear()
        gate.gate.set()
        held.result(10)
        jobs = [f.result(10) for f in futures]
        passes = engine.passes[1:]  # after the held pass
        first_pass = {}
        for i, p in enumerate(passes):
            for s, _ in p:
                first_pass.setdefault(s, i)
        for n, (job, session) in enumerate(zip(jobs, sessions[1:])):
            assert job.record.passes == 1  # a block is never split
            assert first_pass[id(session)] <= n  # at most one pass per older job
        assert all(sum(rows for _, rows in p) <= 9 for p in passes)
    finally:
        scheduler.close()


def test_plan_pass_cuts_only_prompt_pieces_and_always_serves_the_oldest():
    class Wants:
        def __init__(self, rows):
            self.rows = rows

        def rows_wanted(self, prefill_chunk, block_rows):
            return self.rows if self.rows <= block_rows else min(self.rows, prefill_chunk)

        def next_chunk(self, rows):
            return rows

    jobs = [Wants(40), Wants(5), Wants(9), Wants(3), Wants(30)]  # prompts of 40 and 30, blocks between
    plan = plan_pass(jobs, max_rows=32, prefill_chunk=16, block_rows=9)
    # 16 + 5 + 9 = 30 rows; the block of 3 does not fit the 2 left and waits whole for the next
    # pass; the second prompt's piece is cut to those 2
    assert [(jobs.index(j), rows) for j, rows in plan] == [(0, 16), (1, 5), (2, 9), (4, 2)]
    assert plan_pass(jobs[3:], max_rows=32, prefill_chunk=16, block_rows=9)[0][1] == 3  # oldest first


def test_a_failed_pass_fails_its_commands_only_and_the_next_pass_runs(engines):
    engine = RecordingEngine(engines["target"])
    scheduler = Scheduler(engine, max_batch_tokens=64, prefill_chunk=64, block_rows=9, name="test")
    try:
        a, b = engine.new_session(32), engine.new_session(32)
        engine.fail_next = True
        with pytest.raises(RuntimeError, match="a broken pass"):
            scheduler.submit(*score_job(engine, a, [1, 2, 3])).result(10)
        assert scheduler.submit(*score_job(engine, b, [1, 2, 3])).result(10).argmax
        bad = scheduler.submit(a, lambda: ScoreJob.build(a, 99, [1], 1, SamplingParams(), 32, 0.0))
        with pytest.raises(Exception, match="start_position"):
            bad.result(10)
        sampler = Sampler(SamplingParams())
        job = scheduler.submit(b, lambda: ProposeJob.build(b, 3, [4], 3, sampler, 32, 0.0)).result(10)
        assert len(job.proposed) == 3 and job.record.passes == 3
    finally:
        scheduler.close()


def test_limits_that_cannot_work_are_refused(engines):
    with pytest.raises(ValueError, match="must hold a prefill chunk"):
        Scheduler(engines["target"], max_batch_tokens=8, prefill_chunk=16, block_rows=9, name="test")
    with pytest.raises(ValueError, match="a whole block"):
        Scheduler(engines["target"], max_batch_tokens=8, prefill_chunk=4, block_rows=9, name="test")
