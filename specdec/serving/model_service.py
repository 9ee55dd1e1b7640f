"""Start-up of a model service (draft or target): flags, engine, gRPC server."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import torch

from specdec.engine.base import Engine
from specdec.engine.config import UnsupportedModelError
from specdec.engine.torch_engine import DTYPES, TorchEngine
from specdec.engine.tt.device import DeviceUnavailable
from specdec.engine.tt.engine import TtEngine
from specdec.models import DEFAULT_MODEL
from specdec.serving.flags import FlagParser, add_server_flags
from specdec.serving.server import Server, setup_logging
from specdec.serving.session_servicer import SessionServicer
from specdec.telemetry import Telemetry

log = logging.getLogger(__name__)

TT_WEIGHT_DTYPES = ("bfloat16", "bfloat8_b")


def parse_flags(role: str, default_dtype: str, default_port: int, argv: list[str] | None):
    parser = FlagParser(
        env_prefix=f"SPECDEC_{role.upper()}",
        prog=f"python -m {role}_service",
        description=f"The {role} service: serves one model over gRPC, one KV cache per session stream.",
    )
    parser.flag("--model", default=DEFAULT_MODEL, help="registered model name, Hugging Face directory or .gguf file")
    parser.flag("--backend", default="torch", choices=["torch", "ttnn"], help="torch (CPU, CUDA) or ttnn (Tenstorrent)")
    parser.flag(
        "--dtype",
        default="",
        choices=["", *DTYPES, *TT_WEIGHT_DTYPES],
        help=f"weights dtype; default {default_dtype} (torch), bfloat16 (ttnn, which also takes bfloat8_b)",
    )
    parser.flag("--device", default="auto", help="torch backend: cpu, cuda, cuda:N, or auto (CUDA when present)")
    parser.flag("--device-id", default=0, type=int, help="ttnn backend: the Tenstorrent device this process owns")
    parser.flag(
        "--max-seq-len", default=4096, type=int, help="most positions one session may hold (capped by the model)"
    )
    parser.flag("--max-draft-tokens", default=16, type=int, help="largest block (k) one command may carry")
    parser.flag("--threads", default=0, type=int, help="torch CPU threads; 0 = torch's default")
    add_server_flags(parser, default_port)
    args = parser.parse_args(argv)
    allowed = TT_WEIGHT_DTYPES if args.backend == "ttnn" else tuple(DTYPES)
    args.dtype = args.dtype or ("bfloat16" if args.backend == "ttnn" else default_dtype)
    if args.dtype not in allowed:
        parser.error(f"--dtype {args.dtype} is not one the {args.backend} backend runs: {', '.join(allowed)}")
    return args


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
        engine = load_engine(args)
    except DeviceUnavailable as e:
        log.error("%s", e)
        return 1
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

    try:
        return asyncio.run(serve())
    finally:
        engine.close()  # a Tenstorrent device is closed here on SIGTERM, after streams in flight end


def load_engine(args) -> Engine:
    if args.backend == "ttnn":
        return TtEngine.load(
            args.model,
            device_id=args.device_id,
            weights_dtype=args.dtype,
            max_seq_len=args.max_seq_len,
            max_draft_tokens=args.max_draft_tokens,
            max_sessions=args.max_sessions,
        )
    return TorchEngine.load(args.model, dtype=args.dtype, device=args.device, max_seq_len=args.max_seq_len)
