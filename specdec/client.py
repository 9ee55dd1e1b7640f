"""A small client: streams one generation to the terminal.

python -m specdec.client "Write a haiku about rivers" --chat --max-tokens 64
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc

from specdec.serving import security
from specdec.serving.security import channel_credentials, read_token
from specdec.tally import Tally
from specdec.v1 import generate_pb2, generate_pb2_grpc


def build_request(args) -> generate_pb2.GenerateRequest:
    sampling = generate_pb2.SamplingParams(temperature=args.temperature, top_k=args.top_k)
    if args.top_p is not None:
        sampling.top_p = args.top_p
    if args.seed is not None:
        sampling.seed = args.seed
    request = generate_pb2.GenerateRequest(
        prompt=args.prompt, sampling=sampling, num_draft_tokens=args.num_draft_tokens, stop=args.stop, chat=args.chat
    )
    if args.max_tokens is not None:
        request.max_tokens = args.max_tokens
    return request


def open_channel(server: str, tls_ca: str = "", tls: bool = False) -> grpc.Channel:
    """Plaintext, or TLS verified against tls_ca (a PEM file) or, with tls alone, the system's roots."""
    credentials = channel_credentials(tls_ca, "", "") or (grpc.ssl_channel_credentials() if tls else None)
    return security.open_channel(server, credentials)


def stream(server: str, request: generate_pb2.GenerateRequest, out=sys.stdout, timeout: float | None = None,
           channel: grpc.Channel | None = None, token: str = ""):  # fmt: skip
    """Prints the text as it arrives; returns the last response (finish reason and stats)."""
    with channel or grpc.insecure_channel(server) as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        last = None
        metadata = [("authorization", f"Bearer {token}")] if token else None
        for response in stub.Generate(request, timeout=timeout, metadata=metadata):
            out.write(response.text)
            out.flush()
            last = response
    return last


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdec.client", description="Stream one generation.")
    parser.add_argument("prompt")
    parser.add_argument("--server", default="localhost:50051")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--num-draft-tokens", "-k", type=int, default=0, help="0 = the server default")
    parser.add_argument("--stop", action="append", default=[])
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True, help="apply the chat template")
    parser.add_argument("--tls", action="store_true", help="TLS, verified against the system's roots")
    parser.add_argument("--tls-ca", default="", help="TLS, verified against this CA (PEM)")
    parser.add_argument("--token-file", default="", help="send `authorization: Bearer <the token in this file>`")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        token = read_token(args.token_file) if args.token_file else ""
        channel = open_channel(args.server, args.tls_ca, args.tls)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        last = stream(args.server, build_request(args), channel=channel, token=token)
    except grpc.RpcError as e:
        print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print_summary(last, time.perf_counter() - start)
    return 0


def print_summary(last: generate_pb2.GenerateResponse, elapsed: float) -> None:
    s, tally = last.stats, Tally.from_stats(last.stats)
    print(
        f"\n[{generate_pb2.FinishReason.Name(last.finish_reason)}] {s.completion_tokens} tokens in {elapsed:.2f} s "
        f"({s.completion_tokens / elapsed:.1f} tok/s), {s.steps} steps, accepted {s.accepted_tokens}/{s.draft_tokens} "
        f"proposed (alpha {tally.alpha or 0.0:.2f}), {tally.tau or 0.0:.2f} tokens per step",
        file=sys.stderr,
    )


if __name__ == "__main__":
    raise SystemExit(main())
