"""python -m orchestrator --target HOST:PORT [--draft HOST:PORT] --port N"""

from __future__ import annotations

# isort: off
import specdec.process_env  # noqa: F401  (first: before torch loads)
# isort: on

import asyncio
import logging

from orchestrator.servicer import SERVICE_NAME, Backend, GeneratorServicer, connect
from orchestrator.validation import Limits
from specdec.engine.loading import resolve_model_dir
from specdec.models import DEFAULT_MODEL
from specdec.serving.flags import FlagParser, add_server_flags
from specdec.serving.server import Server, setup_logging
from specdec.telemetry import Telemetry
from specdec.v1 import generate_pb2_grpc, session_pb2_grpc

log = logging.getLogger("orchestrator")


def parse_flags(argv=None):
    parser = FlagParser(
        env_prefix="SPECDEC_ORCHESTRATOR",
        prog="python -m orchestrator",
        description="The orchestrator: serves Generate, drafting on a draft service and verifying on a target service.",
    )
    parser.flag("--target", default="localhost:50053", help="target service address (dns:///host:port for replicas)")
    parser.flag(
        "--draft", default="localhost:50052", help="draft service address; empty = no speculation, target alone"
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
    parser.flag("--connect-timeout", default=120.0, type=float, help="seconds to wait for the services at start-up")
    add_server_flags(parser, default_port=50051)
    return parser.parse_args(argv)


async def build(args, telemetry: Telemetry) -> Server:
    """Connects to the services, checks they can work together, and builds the server."""
    from transformers import AutoTokenizer

    backends = [connect("target", args.target, session_pb2_grpc.TargetServiceStub, args.connect_timeout, telemetry)]
    if args.draft:
        backends.append(
            connect("draft", args.draft, session_pb2_grpc.DraftServiceStub, args.connect_timeout, telemetry)
        )
    target, *rest = await asyncio.gather(*backends)
    draft: Backend | None = rest[0] if rest else None
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(args.tokenizer))
    vocab = target.info.vocab_size
    if draft and draft.info.vocab_size != vocab:
        raise ValueError(f"draft vocabulary ({draft.info.vocab_size}) differs from the target's ({vocab})")
    if len(tokenizer) > vocab:
        raise ValueError(
            f"tokenizer {args.tokenizer} has {len(tokenizer)} tokens, more than the target's vocabulary {vocab}"
        )
    services = [b.info for b in (target, draft) if b]
    context = min(info.max_seq_len for info in services)
    max_k = min(args.max_draft_tokens, *(info.max_draft_tokens for info in services))
    limits = Limits(
        vocab_size=vocab,
        context_len=min(context, args.max_seq_len) if args.max_seq_len else context,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens_limit),
        default_num_draft_tokens=min(args.num_draft_tokens, max_k),
        max_draft_tokens=max_k,
        adaptive_by_default=args.adaptive_draft_tokens,
    )
    log.info(
        "target %s at %s; draft %s; context %d, k %d (max %d)",
        target.info.model_name, target.address,
        f"{draft.info.model_name} at {draft.address}" if draft else "none (target alone)",
        limits.context_len, limits.default_num_draft_tokens, limits.max_draft_tokens,
    )  # fmt: skip
    servicer = GeneratorServicer(target, draft, tokenizer, limits, args.max_sessions, telemetry, args.overlap)
    return Server(
        [SERVICE_NAME],
        lambda s: generate_pb2_grpc.add_GeneratorServicer_to_server(servicer, s),
        args.host,
        args.port,
        telemetry,
        servicer,
    )


async def amain(args) -> int:
    try:
        server = await build(args, Telemetry.from_env("orchestrator"))
    except (ConnectionError, ValueError, FileNotFoundError, OSError) as e:
        log.error("%s", e)
        return 1
    await server.serve_until_signal(args.shutdown_grace)
    return 0


def main(argv=None) -> int:
    args = parse_flags(argv)
    setup_logging(args.log_level, "orchestrator")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    raise SystemExit(main())
