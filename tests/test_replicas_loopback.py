"""Two draft and two target replicas (real processes) behind one orchestrator given both addresses
of each role, and a replica of each role serving a model with another tokenizer: sessions spread
over the compatible replicas, greedy output stays the target alone's, a full replica's sessions
go to the other without the client hearing RESOURCE_EXHAUSTED, a draining replica gets no new
sessions, and the incompatible ones are never used."""

from __future__ import annotations

import shutil
import signal
import threading
import time

import grpc
import pytest

from orchestrator.replicas import POLL_SECONDS
from specdec.v1 import generate_pb2, generate_pb2_grpc, session_pb2, session_pb2_grpc
from tests.servers import HeldSessions
from tests.test_commands import Process
from tests.tiny import greedy_reference, save_tiny_tokenizer

TARGET_SESSIONS = 8
STUBS = {"target": session_pb2_grpc.TargetServiceStub, "draft": session_pb2_grpc.DraftServiceStub}


class Replicas:
    def __init__(self, model_dirs, tmp_path):
        other = {}  # the same models with another tokenizer of the same size: only the fingerprint differs
        for role, name in (("target", "target"), ("draft", "layer_skip")):
            other[role] = shutil.copytree(model_dirs[name], tmp_path / f"other-{name}")
            save_tiny_tokenizer(other[role], 32, word="v")
        common = ["--dtype", "float64", "--port", "0", "--host", "127.0.0.1"]

        def service(role, model, *flags):
            return Process(["-m", f"{role}_service", "--model", str(model), *common, *flags])

        self.targets = [service("target", model_dirs["target"], "--max-sessions", str(TARGET_SESSIONS),
                                "--shutdown-grace", "60") for _ in range(2)]  # fmt: skip
        self.drafts = [service("draft", model_dirs["layer_skip"]) for _ in range(2)]
        self.other_target, self.other_draft = service("target", other["target"]), service("draft", other["draft"])
        self.services = [*self.targets, *self.drafts, self.other_target, self.other_draft]
        self.orchestrator = None
        try:
            for process in self.services:
                process.wait_ready()
            targets = ",".join(p.address for p in [*self.targets, self.other_target])
            drafts = ",".join(p.address for p in [*self.drafts, self.other_draft])
            self.orchestrator = Process(["-m", "orchestrator", "--target", targets, "--draft", drafts,
                                         "--tokenizer", str(model_dirs["target"]), "--port", "0", "--host", "127.0.0.1"])  # fmt: skip
            self.orchestrator.wait_ready()
            self.channels = {p.address: grpc.insecure_channel(p.address) for p in self.services}
            self.channels["orchestrator"] = grpc.insecure_channel(self.orchestrator.address)
            self.wait_drafting()
        except BaseException:
            self.stop()
            raise

    def generator(self):
        return generate_pb2_grpc.GeneratorStub(self.channels["orchestrator"])

    def sessions(self, process, role: str) -> int:
        stub = STUBS[role](self.channels[process.address])
        return stub.GetInfo(session_pb2.GetInfoRequest(), timeout=10).active_sessions

    def counts(self) -> dict[str, list[int]]:
        return {
            "target": [self.sessions(p, "target") for p in self.targets],
            "draft": [self.sessions(p, "draft") for p in self.drafts],
            "incompatible": [self.sessions(self.other_target, "target"), self.sessions(self.other_draft, "draft")],
        }

    def wait_idle(self, timeout: float = 20.0) -> dict[str, list[int]]:
        """Until no replica holds a session, and the orchestrator has polled them since."""
        deadline = time.monotonic() + timeout
        idle = {"target": [0, 0], "draft": [0, 0], "incompatible": [0, 0]}
        while (counts := self.counts()) != idle and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2 * POLL_SECONDS)
        return counts

    def wait_drafting(self) -> None:
        """Until a generation drafts: the orchestrator has attached a draft replica."""
        request = generate_pb2.GenerateRequest(prompt_token_ids=[1, 2], max_tokens=8, num_draft_tokens=4)
        deadline = time.monotonic() + 20
        while list(self.generator().Generate(request, timeout=30))[-1].stats.draft_tokens == 0:
            assert time.monotonic() < deadline, "no draft replica was attached"
            time.sleep(0.2)

    def stop(self) -> None:
        for channel in getattr(self, "channels", {}).values():
            channel.close()
        for process in [self.orchestrator, *self.services]:
            if process is not None and process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait(10)


@pytest.fixture(scope="module")
def replicas(model_dirs, tmp_path_factory):
    replicas = Replicas(model_dirs, tmp_path_factory.mktemp("replicas"))
    yield replicas
    replicas.stop()


def long_generations(replicas: Replicas, n: int, prompt=(3, 1, 4)) -> list:
    """n generations that last far longer than the test looks at them, each past its first
    response (so its draft and target sessions are open)."""
    request = generate_pb2.GenerateRequest(prompt_token_ids=prompt, max_tokens=3000, ignore_eos=True)
    streams = [replicas.generator().Generate(request, timeout=120) for _ in range(n)]
    for stream in streams:
        next(stream)
    return streams


def end(streams) -> None:
    for stream in streams:
        stream.cancel()


def test_concurrent_sessions_spread_over_both_replicas_of_each_role(replicas):
    streams = long_generations(replicas, 8)
    try:
        assert replicas.counts() == {"target": [4, 4], "draft": [4, 4], "incompatible": [0, 0]}
    finally:
        end(streams)
    assert replicas.wait_idle()["target"] == [0, 0]


def test_greedy_output_over_the_replicas_equals_the_target_alone(replicas, engines):
    prompts = [[1, 2, 3], [7, 7, 1, 4, 2], [30, 2], [5], [9, 9], [2, 4, 8, 16], [11], [6, 3]]
    outputs: list = [None] * len(prompts)

    def one(i):
        request = generate_pb2.GenerateRequest(prompt_token_ids=prompts[i], max_tokens=40, ignore_eos=True)
        outputs[i] = [t for r in replicas.generator().Generate(request, timeout=120) for t in r.token_ids]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(130)
    assert outputs == [greedy_reference(engines["target"], p, 40) for p in prompts]


def test_a_replica_filled_by_another_client_gets_no_session_and_no_client_hears_it(replicas):
    full, other = replicas.targets
    held = HeldSessions(full.address, TARGET_SESSIONS)  # before the orchestrator's next poll sees it
    try:
        streams = long_generations(replicas, TARGET_SESSIONS)  # would be RESOURCE_EXHAUSTED on the full one
        try:
            counts = replicas.counts()
            assert counts["target"] == [TARGET_SESSIONS, TARGET_SESSIONS] and counts["incompatible"] == [0, 0]
        finally:
            end(streams)
    finally:
        held.end()
    assert replicas.wait_idle()["target"] == [0, 0]


def test_a_draining_replica_gets_no_new_sessions(replicas):
    held = long_generations(replicas, 2)  # one on each target
    draining = replicas.targets[1]
    try:
        assert replicas.counts()["target"] == [1, 1]
        draining.proc.send_signal(signal.SIGTERM)  # drains: its session goes on, up to its 60 s grace
        stub = STUBS["target"](replicas.channels[draining.address])
        deadline = time.monotonic() + 10
        while not stub.GetInfo(session_pb2.GetInfoRequest(), timeout=10).draining:
            assert time.monotonic() < deadline, "the replica did not start draining"
            time.sleep(0.02)
        streams = long_generations(replicas, 4)
        try:
            assert replicas.counts()["target"] == [5, 1]
        finally:
            end(streams)
    finally:
        end(held)
    assert draining.proc.wait(30) == 0  # its last session ended: it stopped


def test_the_replicas_with_another_tokenizer_were_never_used(replicas):
    """Checked last: no generation of the tests above opened a session there."""
    log = "".join(replicas.orchestrator.lines)
    for process, role in ((replicas.other_target, "target"), (replicas.other_draft, "draft")):
        assert f"{role} replica {process.address} is not used: its model" in log
        assert "has another tokenizer" in log
        assert not [line for line in process.lines if "session" in line and "opened" in line]
