"""Draft service: Propose commands on a session stream."""

from __future__ import annotations

from specdec.serving.jobs import ProposeJob
from specdec.serving.session_servicer import Session, SessionServicer
from specdec.v1 import session_pb2, session_pb2_grpc
from specdec.wire import encode_probs

SERVICE_NAME = session_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name


class DraftServicer(SessionServicer, session_pb2_grpc.DraftServiceServicer):
    role = "draft"
    command = "propose"
    step_name = "draft"
    response_type = session_pb2.DraftResponse

    def span_attributes(self, cmd: session_pb2.ProposeCommand) -> dict:
        return {"specdec.proposed": cmd.num_tokens}

    def check_command(self, cmd: session_pb2.ProposeCommand) -> None:
        self.check_block("propose.num_tokens", cmd.num_tokens, self.limits.max_draft_tokens)

    def build_job(self, session: Session, cmd: session_pb2.ProposeCommand, received: float) -> ProposeJob:
        return ProposeJob.build(
            session.kv, cmd.start_position, list(cmd.token_ids), cmd.num_tokens, session.sampler,
            self.engine.info.vocab_size, received,
        )  # fmt: skip

    def respond(self, session: Session, job: ProposeJob) -> session_pb2.DraftResponse:
        probs = job.probs()
        return session_pb2.DraftResponse(
            proposal=session_pb2.Proposal(
                token_ids=job.proposed, probs=encode_probs(probs) if probs is not None else []
            )
        )


def add_to_server(servicer: DraftServicer, server) -> None:
    session_pb2_grpc.add_DraftServiceServicer_to_server(servicer, server)
