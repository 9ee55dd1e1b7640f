"""Draft service: Propose commands on a session stream."""

from __future__ import annotations

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

    def run(self, session: Session, cmd: session_pb2.ProposeCommand) -> session_pb2.DraftResponse:
        self.check_block("propose.num_tokens", cmd.num_tokens, self.max_draft_tokens)
        proposal = self.engine.propose(
            session.kv, cmd.start_position, list(cmd.token_ids), cmd.num_tokens, session.sampler
        )
        probs = encode_probs(proposal.probs) if proposal.probs is not None else []
        return session_pb2.DraftResponse(proposal=session_pb2.Proposal(token_ids=proposal.token_ids, probs=probs))


def add_to_server(servicer: DraftServicer, server) -> None:
    session_pb2_grpc.add_DraftServiceServicer_to_server(servicer, server)
