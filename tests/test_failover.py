"""Losing the draft never costs a response (orchestrator/drafter.py, draft_link.py): a draft that
dies, hangs, answers INTERNAL or is gone from the start leaves every stream complete, greedy
output equal to the target alone; with two replicas a session moves to the one left."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

import grpc
import pytest

from specdec.engine.base import Engine
from specdec.v1 import generate_pb2, generate_pb2_grpc
from tests.servers import GatedEngine, start_model_service, start_orchestrator, start_stack
from tests.test_commands import Process
from tests.tiny import greedy_reference

PROMPTS = [[1, 2, 3], [7, 7, 1, 4, 2], [30, 2], [5]]


class FailingEngine(Engine):
    """Wraps an engine; after `healthy` forward passes every pass raises (the service answers
    INTERNAL for the commands in it)."""

    def __init__(self, inner: Engine, healthy: int):
        self.inner, self.info, self.pool = inner, inner.info, inner.pool
        self.healthy = healthy

    def new_session(self, capacity: int):
        return self.inner.new_session(capacity)

    def end_session(self, session):
        return self.inner.end_session(session)

    def run(self, chunks):
        self.healthy -= 1
        if self.healthy < 0:
            raise RuntimeError("the draft's device fell over")
        return self.inner.run(chunks)


class SlowEngine(GatedEngine):
    """A gated engine whose passes also take `seconds` each: streams that last long enough to
    lose a replica in the middle."""

    def __init__(self, inner: Engine, seconds: float):
        super().__init__(inner)
        self.seconds = seconds

    def run(self, chunks):
        time.sleep(self.seconds)
        return super().run(chunks)


def request(prompt, max_tokens=24, seed=None, k=4) -> generate_pb2.GenerateRequest:
    msg = generate_pb2.GenerateRequest(prompt_token_ids=prompt, max_tokens=max_tokens, num_draft_tokens=k,
                                       ignore_eos=True)  # fmt: skip
    if seed is not None:
        msg.sampling.temperature, msg.sampling.seed = 0.8, seed
    return msg


def generate_all(generator, requests, timeout=120) -> list[list[int]]:
    """The requests as concurrent streams; each one's tokens."""
    outputs: list = [None] * len(requests)

    def one(i):
        outputs[i] = [t for r in generator.Generate(requests[i], timeout=timeout) for t in r.token_ids]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    return outputs


def opened(replica) -> int:
    """Sessions open or being opened on a replica (an open waits for its device thread, which a
    closed gate holds)."""
    return len(replica.servicer.sessions) + replica.servicer.reserved


def failovers(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "target-only steps" in r.getMessage()]


def test_the_link_backs_off_doubling_once_per_outage_and_resets_when_answered():
    from orchestrator.draft_link import FIRST_DEADLINE, MAX_BACKOFF, MIN_DEADLINE, DraftLink

    now = [100.0]
    link = DraftLink(replicas=None, vocab_size=8, costs=None, clock=lambda: now[0])
    assert link.usable()
    link.unreachable()
    link.unreachable()  # sessions failing together: one backoff, not two
    assert not link.usable() and link.down_until == 101.0
    now[0] = 101.0
    assert link.usable()
    link.unreachable()  # the retry failed too: twice as long
    assert link.down_until == 103.0
    for _ in range(10):
        now[0] = link.down_until
        link.unreachable()
    assert link.down_until - now[0] == MAX_BACKOFF  # never longer
    link.reachable()
    assert link.usable() and link.backoff == 1.0
    assert link.deadlines.deadline("step") == FIRST_DEADLINE  # nothing timed yet
    link.deadlines.observe("prefill", 0.5)
    assert link.deadlines.deadline("step") == 5.0  # the prefill's until a step is timed
    link.deadlines.observe("step", 0.01)
    assert link.deadlines.deadline("step") == MIN_DEADLINE and link.deadlines.deadline("prefill") == 5.0


def test_command_deadlines_scale_with_a_long_prefill_and_never_fall_below_the_minimum():
    from orchestrator.deadlines import CommandDeadlines

    deadlines = CommandDeadlines(minimum=10.0, first=300.0)
    assert deadlines.deadline("prefill", rows=5000) == 300.0  # nothing timed yet
    deadlines.observe("prefill", 2.0, rows=100)
    assert deadlines.deadline("prefill", rows=100) == 20.0
    assert deadlines.deadline("prefill", rows=1000) == 200.0  # ten times the rows of a usual prefill
    assert deadlines.deadline("step", rows=5) == 20.0  # the prefill's until a step is timed
    deadlines.observe("step", 0.05, rows=5)
    assert deadlines.deadline("step", rows=1) == 10.0 and deadlines.deadline("step", rows=9) == 10.0


def test_backend_streams_carry_the_client_s_deadline(loop):
    """What is left of the client's deadline goes on every draft and target stream, so a replica
    ends a session whose client has given up, even if the orchestrator could not say so."""
    from orchestrator.clients import DraftSession, TargetSession
    from specdec.v1 import session_pb2_grpc

    async def remaining():
        channel = grpc.aio.insecure_channel("127.0.0.1:1")
        left = [
            TargetSession(session_pb2_grpc.TargetServiceStub(channel), "x", 8, timeout=7.0).call.time_remaining(),
            DraftSession(session_pb2_grpc.DraftServiceStub(channel), "x", 8, timeout=3.0).call.time_remaining(),
            TargetSession(session_pb2_grpc.TargetServiceStub(channel), "x", 8).call.time_remaining(),
        ]
        await channel.close()
        return left

    target, draft, unbounded = loop.run(remaining())
    assert 6.0 < target <= 7.0 and 2.0 < draft <= 3.0 and unbounded is None


def test_a_draft_that_answers_internal_midway_costs_no_stream(loop, engines, model_dirs, caplog):
    draft = FailingEngine(engines["layer_skip"], healthy=12)
    stack = start_stack(loop, engines["target"], draft, str(model_dirs["target"]))
    try:
        with caplog.at_level(logging.WARNING, logger="orchestrator.servicer"):
            requests = [request(p) for p in PROMPTS] + [request(p, seed=i) for i, p in enumerate(PROMPTS)]
            outputs = generate_all(stack.generator(), requests)
        for prompt, output in zip(PROMPTS, outputs):
            assert output == greedy_reference(engines["target"], prompt, 24)
        assert all(len(output) == 24 for output in outputs[len(PROMPTS) :])  # sampled: complete
        assert failovers(caplog) and all("failed (INTERNAL)" in line for line in failovers(caplog))
        assert stack.wait_sessions(0) == {"target": 0, "draft": 0}
    finally:
        stack.stop()


def test_a_hung_draft_costs_one_deadline_then_steps_go_on_without_it(loop, engines, model_dirs, caplog):
    draft = GatedEngine(engines["layer_skip"])
    stack = start_stack(loop, engines["target"], draft, str(model_dirs["target"]))
    try:
        generator = stack.generator()
        warm = request(PROMPTS[0], max_tokens=8)  # times the draft's commands: deadlines of 2 s
        assert len([t for r in generator.Generate(warm, timeout=60) for t in r.token_ids]) == 8
        draft.gate.clear()  # every draft pass from now on hangs
        with caplog.at_level(logging.WARNING, logger="orchestrator.servicer"):
            start = time.monotonic()
            outputs = generate_all(generator, [request(p, max_tokens=40) for p in PROMPTS])
            seconds = time.monotonic() - start
        for prompt, output in zip(PROMPTS, outputs):
            assert output == greedy_reference(engines["target"], prompt, 40)
        assert any("did not answer within 2.0 s" in line for line in failovers(caplog))
        assert seconds < 20  # a deadline, a backoff: never a deadline per step
    finally:
        draft.gate.set()
        stack.stop()


def test_with_the_draft_gone_from_the_start_requests_run_target_only(loop, engines, model_dirs):
    stack = start_stack(loop, engines["target"], engines["layer_skip"], str(model_dirs["target"]))
    try:
        loop.run(stack.draft.server.stop(0))
        outputs = generate_all(stack.generator(), [request(p) for p in PROMPTS])
        assert outputs == [greedy_reference(engines["target"], p, 24) for p in PROMPTS]
    finally:
        stack.stop()


@dataclass
class Lost:
    """What lose_a_replica_mid_stream saw."""

    outputs: list[list[int]]
    counts: list[int]  # sessions on each replica before one was lost
    most_on_kept: int  # the most sessions the other replica held at once afterwards


def lose_a_replica_mid_stream(loop, role: str, replicas, gates: list, tokenizer: str, other: str) -> Lost:
    """Generations over two `role` replicas (one channel, round robin), held by closing `gates`
    until every session is open; then the replica holding the most sessions stops, the gates
    open, and the generations run to their end. `other`: the other role's address."""
    addresses = "ipv4:" + ",".join(r.address for r in replicas)
    target, draft = (addresses, other) if role == "target" else (other, addresses)
    orchestrator = start_orchestrator(loop, target, draft, tokenizer)
    channel = grpc.insecure_channel(orchestrator.address)
    try:
        for gate in gates:
            gate.clear()
        outputs: list = []
        generator = generate_pb2_grpc.GeneratorStub(channel)
        requests = [request(p, max_tokens=60) for p in PROMPTS]
        runner = threading.Thread(target=lambda: outputs.extend(generate_all(generator, requests)))
        runner.start()
        deadline = time.monotonic() + 30
        while sum(opened(r) for r in replicas) < len(PROMPTS) and time.monotonic() < deadline:
            time.sleep(0.01)
        counts = [opened(r) for r in replicas]  # (round robin spreads them once both are connected)
        lost, kept = sorted(replicas, key=lambda r: -opened(r))
        loop.run(lost.server.stop(0))
        most = 0
        for gate in gates:
            gate.set()
        while runner.is_alive():
            most = max(most, len(kept.servicer.sessions))
            time.sleep(0.005)
        runner.join()
        return Lost(outputs, counts, most)
    finally:
        for gate in gates:
            gate.set()
        channel.close()
        loop.run(orchestrator.server.stop(0))


def stop_all(loop, *services) -> None:
    for running in services:
        loop.run(running.server.stop(0))
        running.servicer.close()


def test_with_two_draft_replicas_sessions_of_the_lost_one_move_to_the_other(loop, engines, model_dirs, caplog):
    target = SlowEngine(engines["target"], seconds=0.01)  # holds every stream after its prefill
    replicas = [start_model_service(loop, "draft", engines["layer_skip"]) for _ in range(2)]
    target_service = start_model_service(loop, "target", target)
    try:
        with caplog.at_level(logging.WARNING, logger="orchestrator.servicer"):
            seen = lose_a_replica_mid_stream(
                loop, "draft", replicas, [target.gate], str(model_dirs["target"]), target_service.address
            )
        assert sum(seen.counts) == len(PROMPTS), seen.counts
        assert seen.outputs == [greedy_reference(engines["target"], p, 60) for p in PROMPTS]
        assert seen.most_on_kept == len(PROMPTS)  # the lost replica's sessions reopened on the other
        assert failovers(caplog)
    finally:
        stop_all(loop, target_service, *replicas)


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_draft_process_killed_or_frozen_mid_stream_costs_no_stream(model_dirs, engines, how):
    """A real draft process: SIGKILL (it dies) or SIGSTOP (it hangs, connections open) while
    greedy and sampled streams are in flight; every stream completes, greedy equals the target
    alone."""
    model = str(model_dirs["target"])
    common = ["--dtype", "float64", "--port", "0", "--host", "127.0.0.1"]
    target = Process(["-m", "target_service", "--model", model, *common])
    draft = Process(["-m", "draft_service", "--model", str(model_dirs["layer_skip"]), *common])
    processes = [target, draft]
    try:
        target_address, draft_address = target.wait_ready(), draft.wait_ready()
        orchestrator = Process(["-m", "orchestrator", "--target", target_address, "--draft", draft_address,
                                "--tokenizer", model, "--port", "0", "--host", "127.0.0.1"])  # fmt: skip
        processes.append(orchestrator)
        with grpc.insecure_channel(orchestrator.wait_ready()) as channel:
            generator = generate_pb2_grpc.GeneratorStub(channel)
            requests = [request(p, max_tokens=200) for p in PROMPTS[:2]] + [request(PROMPTS[2], 200, seed=3)]
            streams = [generator.Generate(r, timeout=120) for r in requests]
            outputs = [list(next(s).token_ids) for s in streams]  # every stream has started
            os.kill(draft.proc.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
            for output, stream in zip(outputs, streams):
                output.extend(t for r in stream for t in r.token_ids)
        assert outputs[:2] == [greedy_reference(engines["target"], p, 200) for p in PROMPTS[:2]]
        assert len(outputs[2]) == 200
        assert "draft stream lost, target-only steps" in "".join(orchestrator.lines)
    finally:
        if how == "stopped":
            os.kill(draft.proc.pid, signal.SIGCONT)
        for process in reversed(processes):
            if process.proc.poll() is None:
                process.stop()


def test_with_two_target_replicas_sessions_of_the_lost_one_re_prefill_on_the_other(loop, engines, model_dirs, caplog):
    gated = [SlowEngine(engines["target"], seconds=0.005) for _ in range(2)]  # hold streams in their prefill
    replicas = [start_model_service(loop, "target", engine) for engine in gated]
    draft = start_model_service(loop, "draft", engines["layer_skip"])
    try:
        with caplog.at_level(logging.WARNING, logger="orchestrator.servicer"):
            seen = lose_a_replica_mid_stream(
                loop, "target", replicas, [e.gate for e in gated], str(model_dirs["target"]), draft.address
            )
        assert sum(seen.counts) == len(PROMPTS), seen.counts
        assert seen.outputs == [greedy_reference(engines["target"], p, 60) for p in PROMPTS]
        assert seen.most_on_kept == len(PROMPTS)  # re-prefilled there
        # One per session moved: lost mid-stream (a failover), or while it opened (the next replica's open)
        lines = [r.getMessage() for r in caplog.records
                 if "target stream lost" in r.getMessage() or "did not open a session" in r.getMessage()]  # fmt: skip
        assert len(lines) == max(seen.counts), lines
    finally:
        stop_all(loop, draft, *replicas)
