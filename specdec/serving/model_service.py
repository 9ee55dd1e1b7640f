"""Start-up of a model service (draft or target): flags, engine (through the backend registry),
gRPC server."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Callable

import torch

from specdec.engine.base import Engine
from specdec.engine.config import UnsupportedModelError
from specdec.engine.registry import BACKENDS, EngineOptions, load_engine, load_ngram_engine
from specdec.errors import DeviceUnavailable
from specdec.models import DEFAULT_MODEL
from specdec.serving.flags import FlagParser, add_server_flags
from specdec.serving.handlers import PendingServicer
from specdec.serving.security import server_credentials
from specdec.serving.server import Server, StartupError, in_daemon_thread, setup_logging
from specdec.serving.session_servicer import ServiceLimits, SessionServicer
from specdec.telemetry import Telemetry
from specdec.vocabulary import model_fingerprint

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 64
_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30}


def memory_size(text: str) -> int:
    """'512MiB', '2GiB', '1g' or a number of bytes -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size such as 512MiB, 2GiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_flags(role: str, default_dtype: str, default_port: int, argv: list[str] | None):
    parser = FlagParser(
        env_prefix=f"SPECDEC_{role.upper()}",
        prog=f"python -m {role}_service",
        description=f"The {role} service: serves one model over gRPC, one KV cache per session stream.",
    )
    parser.flag("--model", default=DEFAULT_MODEL, help="registered model name, Hugging Face directory or .gguf file")
    if role == "draft":
        parser.flag(
            "--method", default="model", choices=["model", "ngram"],
            help="model: draft with --model on --backend; ngram: prompt lookup, no model weights or device "
            "(--model then only names the vocabulary)",
        )  # fmt: skip
    parser.flag(
        "--backend", default="torch", choices=list(BACKENDS),
        help=", ".join(b.description for b in BACKENDS.values()),
    )  # fmt: skip
    dtypes = {d: None for b in BACKENDS.values() for d in b.dtypes}
    parser.flag(
        "--dtype",
        default="",
        choices=["", *dtypes],
        help=f"weights dtype; default {default_dtype} (torch, which also takes gguf: a .gguf file's weights as shipped; "
        "llama.cpp takes gguf only), "
        "bfloat16 (ttnn, which also takes bfloat8_b)",
    )
    parser.flag("--device", default="auto", help="torch backend: cpu, cuda, cuda:N, or auto (CUDA when present)")
    parser.flag("--device-id", default=0, type=int, help="ttnn backend: the Tenstorrent device this process owns")
    parser.flag(
        "--max-seq-len", default=4096, type=int, help="most positions one session may hold (capped by the model)"
    )
    parser.flag("--max-draft-tokens", default=16, type=int, help="largest block (k) one command may carry")
    parser.flag(
        "--max-batch-tokens", default=0, type=int,
        help="most rows (tokens) in one forward pass, all sessions'; 0 = the larger of 256 and --prefill-chunk",
    )  # fmt: skip
    parser.flag(
        "--prefill-chunk", default=0, type=int,
        help="most prompt tokens one session puts in a pass (the rest goes to other sessions' steps); "
        f"0 = {DEFAULT_PREFILL_CHUNK} on torch, whole prompts (--max-seq-len) on ttnn, whose prefill is eager",
    )  # fmt: skip
    parser.flag(
        "--kv-cache-memory", default="", type=str,
        help="size of the KV pool every session borrows from (e.g. 2GiB); empty = max-sessions full-length sessions",
    )  # fmt: skip
    parser.flag(
        "--cuda-graphs", default="auto", choices=["auto", "on", "off"],
        help="torch on CUDA: capture decode and verify passes per batch size at start-up and replay them",
    )  # fmt: skip
    parser.flag("--threads", default=0, type=int, help="torch CPU threads; 0 = torch's default")
    add_server_flags(parser, default_port)
    args = parser.parse_args(argv)
    args.method = getattr(args, "method", "model")
    backend = BACKENDS[args.backend]
    args.dtype = args.dtype or backend.default_dtype or default_dtype
    if args.method == "model" and args.dtype not in backend.dtypes:
        parser.error(f"--dtype {args.dtype} is not one the {args.backend} backend runs: {', '.join(backend.dtypes)}")
    try:
        args.kv_cache_memory = memory_size(args.kv_cache_memory) if args.kv_cache_memory else 0
    except ValueError as e:
        parser.error(f"--kv-cache-memory: {e}")
    args.prefill_chunk = args.prefill_chunk or (args.max_seq_len if backend.whole_prompts else DEFAULT_PREFILL_CHUNK)
    args.max_batch_tokens = args.max_batch_tokens or max(256, args.prefill_chunk)
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
    """Listens at once (health NOT_SERVING, RPCs UNAVAILABLE while the model loads), loads the
    engine on a thread of its own, then serves until SIGTERM."""
    args = parse_flags(role, default_dtype, default_port, argv)
    setup_logging(args.log_level, role)
    if args.threads:
        torch.set_num_threads(args.threads)
    limits = ServiceLimits(args.max_sessions, args.max_draft_tokens, args.max_batch_tokens, args.prefill_chunk)
    telemetry = Telemetry.from_env(role)
    deferred = PendingServicer(servicer_type, f"{role} service is loading its model")
    servicers: list[SessionServicer] = []  # the one built, once its engine has loaded

    async def startup() -> None:
        # Then the tokenizer's fingerprint (GetInfo), on the same thread: transformers' lazy imports
        # are not safe from two threads at once.
        engine, fingerprint = await in_daemon_thread(lambda: (load_or_explain(args), model_fingerprint(args.model)))
        log.info(
            "%s model %s (%s, %s) on %s, vocab %d, max %d positions",
            role, engine.info.name, engine.info.family, engine.info.dtype, engine.info.device,
            engine.info.vocab_size, engine.info.max_seq_len,
        )  # fmt: skip
        try:
            servicer = servicer_type(engine, limits, telemetry, fingerprint)
        except ValueError as e:  # limits that cannot work together
            engine.close()
            raise StartupError(str(e), 2) from None
        servicers.append(servicer)
        deferred.ready(servicer)

    async def serve() -> int:
        # The aio server binds to the running event loop, so it is built inside it.
        try:
            credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
            server = Server([service_name], lambda s: add_to_server(deferred, s), args.host, args.port, telemetry,
                            deferred, credentials=credentials)  # fmt: skip
        except ValueError as e:
            log.error("%s", e)
            return 2
        except (OSError, RuntimeError) as e:
            log.error("cannot listen on %s:%s: %s", args.host, args.port, e)
            return 1
        return await server.serve_until_signal(args.shutdown_grace, startup)

    try:
        return asyncio.run(serve())
    finally:
        for servicer in servicers:
            servicer.close()
            servicer.engine.close()  # a Tenstorrent device is closed here on SIGTERM, after streams in flight end


def load_or_explain(args) -> Engine:
    """The engine, or a StartupError saying why not: exit 1 without a device, 2 for a model this
    backend cannot load."""
    try:
        return load(args)
    except DeviceUnavailable as e:
        raise StartupError(str(e), 1) from None
    except (UnsupportedModelError, FileNotFoundError, ImportError, ValueError, MemoryError, torch.OutOfMemoryError) as e:
        raise StartupError(f"cannot load model {args.model}: {e}", 2) from None


def load(args) -> Engine:
    graphs = {"auto": None, "on": True, "off": False}[args.cuda_graphs]
    options = EngineOptions(
        model=args.model, dtype=args.dtype, max_seq_len=args.max_seq_len, max_sessions=args.max_sessions,
        max_draft_tokens=args.max_draft_tokens, device=args.device, device_id=args.device_id,
        kv_cache_memory=args.kv_cache_memory, cuda_graphs=graphs, max_batch_tokens=args.max_batch_tokens,
    )  # fmt: skip
    return load_ngram_engine(options) if args.method == "ngram" else load_engine(args.backend, options)
