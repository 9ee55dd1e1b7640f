"""Target service: Score commands on a session stream; a block is verified in one forward pass
(shared with the other sessions' blocks)."""

from __future__ import annotations

from specdec.sampling import wire_probs
from specdec.serving.jobs import ScoreJob
from specdec.serving.session_servicer import Session, SessionServicer
from specdec.v1 import session_pb2, session_pb2_grpc
from specdec.wire import encode_probs

SERVICE_NAME = session_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name


class TargetServicer(SessionServicer, session_pb2_grpc.TargetServiceServicer):
    role = "target"
    command = "score"
    step_name = "verify"
    response_type = session_pb2.TargetResponse

    def span_attributes(self, cmd: session_pb2.ScoreCommand) -> dict:
        return {"specdec.scored": cmd.num_scored}

    def check_command(self, cmd: session_pb2.ScoreCommand) -> None:
        self.check_block("score.num_scored", cmd.num_scored, self.limits.max_draft_tokens + 1)

    def build_job(self, session: Session, cmd: session_pb2.ScoreCommand, received: float) -> ScoreJob:
        return ScoreJob.build(
            session.kv, cmd.start_position, list(cmd.token_ids), cmd.num_scored, session.sampler.params,
            self.engine.info.vocab_size, received,
        )  # fmt: skip

    def respond(self, session: Session, job: ScoreJob) -> session_pb2.TargetResponse:
        params = session.sampler.params
        if params.greedy:
            return session_pb2.TargetResponse(scores=session_pb2.Scores(argmax_token_ids=job.argmax))
        probs = wire_probs(job.scored_logits(), params)  # [num_scored, vocab]
        return session_pb2.TargetResponse(scores=session_pb2.Scores(probs=encode_probs(probs)))


def add_to_server(servicer: TargetServicer, server) -> None:
    session_pb2_grpc.add_TargetServiceServicer_to_server(servicer, server)
