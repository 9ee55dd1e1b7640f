"""Target service: Score commands on a session stream; one forward pass per command."""

from __future__ import annotations

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

    def run(self, session: Session, cmd: session_pb2.ScoreCommand) -> session_pb2.TargetResponse:
        self.check_block("score.num_scored", cmd.num_scored, self.max_draft_tokens + 1)
        scores = self.engine.score(
            session.kv, cmd.start_position, list(cmd.token_ids), cmd.num_scored, session.sampler.params
        )
        if scores.probs is not None:
            return session_pb2.TargetResponse(scores=session_pb2.Scores(probs=encode_probs(scores.probs)))
        return session_pb2.TargetResponse(scores=session_pb2.Scores(argmax_token_ids=scores.argmax_token_ids))


def add_to_server(servicer: TargetServicer, server) -> None:
    session_pb2_grpc.add_TargetServiceServicer_to_server(servicer, server)
