"""A GenerateRequest checked field by field and turned into what the loop needs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from specdec.errors import InvalidArgument, check_token_ids
from specdec.sampling import SamplingParams
from specdec.v1 import generate_pb2
from specdec.wire import sampling_from_proto

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    context_len: int  # most positions a session may hold: prompt + completion
    max_tokens_limit: int
    default_max_tokens: int
    default_num_draft_tokens: int
    max_draft_tokens: int
    adaptive_by_default: bool = False


@dataclass(frozen=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int  # already clamped to the room the context leaves
    sampling: SamplingParams
    num_draft_tokens: int  # k; the largest k when adaptive
    adaptive: bool
    stop: list[str]
    stop_token_ids: frozenset[int]  # EOS included unless ignore_eos


def validate(msg: generate_pb2.GenerateRequest, tokenizer, limits: Limits, eos_token_ids: tuple[int, ...]) -> Request:
    prompt = _prompt_token_ids(msg, tokenizer, limits.vocab_size)
    if len(prompt) >= limits.context_len:
        raise InvalidArgument(
            "prompt", f"{len(prompt)} tokens leave no room for output in the context of {limits.context_len} positions"
        )
    max_tokens = msg.max_tokens if msg.HasField("max_tokens") else limits.default_max_tokens
    if not 1 <= max_tokens <= limits.max_tokens_limit:
        raise InvalidArgument("max_tokens", f"must be in [1, {limits.max_tokens_limit}], got {max_tokens}")
    k = msg.num_draft_tokens or limits.default_num_draft_tokens
    if k > limits.max_draft_tokens:
        raise InvalidArgument("num_draft_tokens", f"{k} exceeds the server maximum {limits.max_draft_tokens}")
    stop = list(msg.stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    for i, s in enumerate(stop):
        if not 0 < len(s) <= MAX_STOP_STRING_CHARS:
            raise InvalidArgument(f"stop[{i}]", f"must have 1 to {MAX_STOP_STRING_CHARS} characters, got {len(s)}")
    check_token_ids("stop_token_ids", msg.stop_token_ids, limits.vocab_size)
    stop_ids = set(msg.stop_token_ids) | (set() if msg.ignore_eos else set(eos_token_ids))
    return Request(
        request_id=msg.request_id or uuid.uuid4().hex,
        prompt_token_ids=prompt,
        max_tokens=min(max_tokens, limits.context_len - len(prompt)),
        sampling=sampling_from_proto(msg.sampling),
        num_draft_tokens=k,
        adaptive=msg.adaptive_draft_tokens if msg.HasField("adaptive_draft_tokens") else limits.adaptive_by_default,
        stop=stop,
        stop_token_ids=frozenset(stop_ids),
    )


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """Text to token ids; with chat, as one user message in the model's chat template."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidArgument("chat", "the served model's tokenizer has no chat template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return tokenizer.encode(text, add_special_tokens=not chat)  # a chat template writes its own


def _prompt_token_ids(msg: generate_pb2.GenerateRequest, tokenizer, vocab_size: int) -> list[int]:
    if msg.prompt:
        ids = encode_prompt(tokenizer, msg.prompt, msg.chat)
        if not ids:
            raise InvalidArgument("prompt", "tokenizes to no tokens")
        return ids
    if not msg.prompt_token_ids:
        raise InvalidArgument("prompt", "empty: set prompt or prompt_token_ids")
    if msg.chat:
        raise InvalidArgument("chat", "needs a text prompt, not prompt_token_ids")
    check_token_ids("prompt_token_ids", msg.prompt_token_ids, vocab_size)
    return list(msg.prompt_token_ids)
