"""Start-up of a model service (draft or target): flags, engine, gRPC server."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import torch

from specdec.engine.config import UnsupportedModelError
from specdec.engine.torch_engine import DTYPES, TorchEngine
from specdec.models import DEFAULT_MODEL
from specdec.serving.flags import FlagParser, add_server_flags
from specdec.serving.server import Server, setup_logging
from specdec.serving.session_servicer import SessionServicer
from specdec.telemetry import Telemetry

log = logging.getLogger(__name__)


def parse_flags(role: str, default_dtype: str, default_port: int, argv: list[str] | None):
    parser = FlagParser(
        env_prefix=f"SPECDEC_{role.upper()}",
        prog=f"python -m {role}_service",
        description=f"The {role} service: serves one model over gRPC, one KV cache per session stream.",
    )
    parser.flag("--model", default=DEFAULT_MODEL, help="registered model name, Hugging Face directory or .gguf file")
    parser.flag("--dtype", default=default_dtype, choices=list(DTYPES), help="weights and KV cache dtype")
    parser.flag("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when present)")
    parser.flag(
        "--max-seq-len", default=4096, type=int, help="most positions one session may hold (capped by the model)"
    )
    parser.flag("--max-draft-tokens", default=16, type=int, help="largest block (k) one command may carry")
    parser.flag("--threads", default=0, type=int, help="torch CPU threads; 0 = torch's default")
    add_server_flags(parser, default_port)
    return parser.parse_args(argv)


def main(
    role: str,
    servicer_type: type[SessionServicer],
    add_to_server: Callable,
    service_name: str,
    default_dtype: str,
    default_port: int,
    argv: list[str] | None = None,
) -> int:
    args = parse_flags(role, default_dtype, default_port, argv)
    setup_logging(args.log_level, role)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        engine = TorchEngine.load(args.model, dtype=args.dtype, device=args.device, max_seq_len=args.max_seq_len)
    except (UnsupportedModelError, FileNotFoundError, ValueError) as e:
        log.error("cannot load model %s: %s", args.model, e)
        return 2
    log.info(
        "%s model %s (%s, %s) on %s, vocab %d, max %d positions",
        role, engine.info.name, engine.info.family, engine.info.dtype, engine.info.device,
        engine.info.vocab_size, engine.info.max_seq_len,
    )  # fmt: skip
    telemetry = Telemetry.from_env(role)
    servicer = servicer_type(engine, args.max_sessions, args.max_draft_tokens, telemetry)

    async def serve() -> int:
        # The aio server binds to the running event loop, so it is built inside it.
        try:
            server = Server([service_name], lambda s: add_to_server(servicer, s), args.host, args.port, telemetry)
        except (OSError, RuntimeError) as e:
            log.error("cannot listen on %s:%s: %s", args.host, args.port, e)
            return 1
        await server.serve_until_signal()
        return 0

    return asyncio.run(serve())
