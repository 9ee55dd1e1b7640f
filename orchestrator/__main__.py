"""python -m orchestrator --target HOST:PORT [--draft HOST:PORT] --port N"""

from __future__ import annotations

# isort: off
import specdec.process_env  # noqa: F401  (first: before torch loads)
# isort: on

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable

from orchestrator.compatibility import Requirements
from orchestrator.replicas import ReplicaMetrics, ReplicaSet
from orchestrator.servicer import SERVICE_NAME, GeneratorServicer
from orchestrator.validation import Limits
from specdec import vocabulary
from specdec.engine.loading import resolve_tokenizer_dir
from specdec.models import DEFAULT_MODEL
from specdec.serving.flags import FlagParser, add_server_flags
from specdec.serving.handlers import PendingServicer
from specdec.serving.security import BearerToken, channel_credentials, read_token, server_credentials
from specdec.serving.server import GENERATOR_MESSAGES, Server, StartupError, in_daemon_thread, setup_logging
from specdec.telemetry import Telemetry
from specdec.v1 import generate_pb2_grpc, session_pb2, session_pb2_grpc

log = logging.getLogger("orchestrator")

DRAFT_GRACE_SECONDS = 2.0  # how long a ready target waits for the draft before serving target-only


def parse_flags(argv=None):
    parser = FlagParser(
        env_prefix="SPECDEC_ORCHESTRATOR",
        prog="python -m orchestrator",
        description="The orchestrator: serves Generate, drafting on a draft service and verifying on a target service.",
    )
    parser.flag(
        "--target", default="localhost:50053",
        help="target replicas: host:port, a comma-separated list, or dns:///name:port (re-resolved: a headless Service)",
    )  # fmt: skip
    parser.flag(
        "--draft", default="localhost:50052", help="draft replicas, as --target; empty = no speculation, target alone"
    )
    parser.flag(
        "--tokenizer",
        default=DEFAULT_MODEL,
        help="the target model's tokenizer: registered name, HF directory or .gguf",
    )
    parser.flag("--num-draft-tokens", default=4, type=int, help="k when a request leaves num_draft_tokens at 0")
    parser.flag("--max-draft-tokens", default=16, type=int, help="largest k a request may ask (capped by the services)")
    parser.flag("--default-max-tokens", default=256, type=int, help="max_tokens when a request leaves it unset")
    parser.flag("--max-tokens-limit", default=4096, type=int, help="largest max_tokens a request may ask")
    parser.flag("--max-seq-len", default=0, type=int, help="most positions per generation; 0 = what the services allow")
    parser.switch("--adaptive-draft-tokens", help="adapt k each step, up to k, unless a request says otherwise")
    parser.switch("--overlap", help="draft the next block while the target verifies (wants separate devices)")
    parser.flag(
        "--tls-ca", default="", help="verify the draft and target services' TLS certificates against this CA (PEM)"
    )
    parser.flag("--tls-client-cert", default="", help="present this certificate (PEM) to the services: mutual TLS")
    parser.flag("--tls-client-key", default="", help="the private key (PEM) of --tls-client-cert")
    parser.flag(
        "--auth-token-file", default="",
        help="Generate requires the header `authorization: Bearer <the token in this file>`; empty = no token",
    )  # fmt: skip
    add_server_flags(parser, default_port=50051)
    return parser.parse_args(argv)


def limits_for(args, target: session_pb2.ServiceInfo) -> Limits:
    """What requests may ask, from the flags and the first target replica (the first draft's k
    limit applies once it answers: GeneratorServicer.attach_draft)."""
    context = min(target.max_seq_len, args.max_seq_len) if args.max_seq_len else target.max_seq_len
    max_k = min(args.max_draft_tokens, target.max_draft_tokens)
    return Limits(
        vocab_size=target.vocab_size,
        context_len=context,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens_limit),
        default_num_draft_tokens=min(args.num_draft_tokens, max_k),
        max_draft_tokens=max_k,
        adaptive_by_default=args.adaptive_draft_tokens,
    )


def build(args, telemetry: Telemetry) -> tuple[Server, Callable[[], Awaitable[GeneratorServicer]]]:
    """The server, which listens before the services answer (health NOT_SERVING, Generate
    UNAVAILABLE), and its start-up: load the tokenizer, watch the replicas of both roles, wait
    for a compatible target as long as it takes, then serve (the draft is attached whenever a
    draft replica answers). Raises ValueError for flags that cannot work."""
    credentials = channel_credentials(args.tls_ca, args.tls_client_cert, args.tls_client_key)
    metrics = ReplicaMetrics(telemetry.meter)  # one set of instruments for both roles
    targets = ReplicaSet("target", args.target, session_pb2_grpc.TargetServiceStub, telemetry, credentials, metrics)
    drafts = None
    if args.draft:
        drafts = ReplicaSet("draft", args.draft, session_pb2_grpc.DraftServiceStub, telemetry, credentials, metrics)
    deferred = PendingServicer(GeneratorServicer, f"target service at {args.target} is not reachable yet")
    token = (BearerToken(read_token(args.auth_token_file), SERVICE_NAME),) if args.auth_token_file else ()
    server = Server(
        [SERVICE_NAME],
        lambda s: generate_pb2_grpc.add_GeneratorServicer_to_server(deferred, s),
        args.host,
        args.port,
        telemetry,
        deferred,
        messages=GENERATOR_MESSAGES,
        credentials=server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca),
        interceptors=token,
    )
    server.on_stop += [replicas.close for replicas in (targets, drafts) if replicas is not None]

    async def startup() -> GeneratorServicer:
        # a .gguf's metadata may be converted
        tokenizer = await in_daemon_thread(lambda: load_tokenizer(args.tokenizer))
        requirements = Requirements(vocabulary.fingerprint(tokenizer), len(tokenizer))
        targets.start(requirements.problem)
        info = await targets.wait_first()
        limits = limits_for(args, info)
        # The first target sets what every replica must match, drafts included: they are judged from now on.
        requirements.vocab_size, requirements.max_draft_tokens = info.vocab_size, limits.max_draft_tokens
        targets.recheck()
        if drafts is not None:  # started together with the targets, a draft is most often up by now
            drafts.start(requirements.problem)
            with contextlib.suppress(asyncio.TimeoutError):  # then it is attached whenever one answers
                await asyncio.wait_for(drafts.wait_first(), DRAFT_GRACE_SECONDS)
        servicer = GeneratorServicer(targets, info, drafts, tokenizer, requirements, limits, args.max_sessions,
                                     telemetry, args.overlap)  # fmt: skip
        log.info("target %s at %s; context %d, k %d (max %d); draft %s",
                 info.model_name, args.target, servicer.limits.context_len, servicer.limits.default_num_draft_tokens,
                 servicer.limits.max_draft_tokens, f"at {args.draft}" if drafts else "none")  # fmt: skip
        await servicer.watch(server.set_serving)
        deferred.ready(servicer)
        return servicer

    return server, startup


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_tokenizer_dir(name))
    except (ValueError, OSError) as e:  # OSError covers a missing file or directory
        raise StartupError(f"cannot load tokenizer {name}: {e}") from None


async def amain(args) -> int:
    try:
        server, startup = build(args, Telemetry.from_env("orchestrator"))
    except (ValueError, FileNotFoundError, OSError) as e:
        log.error("%s", e)
        return 1
    return await server.serve_until_signal(args.shutdown_grace, startup)


def main(argv=None) -> int:
    args = parse_flags(argv)
    setup_logging(args.log_level, "orchestrator")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    raise SystemExit(main())
