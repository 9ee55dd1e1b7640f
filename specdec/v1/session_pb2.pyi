from specdec.v1 import generate_pb2 as _generate_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceInfo(_message.Message):
    __slots__ = ("role", "model_name", "model_family", "vocab_size", "max_seq_len", "eos_token_ids", "dtype", "device", "backend", "max_draft_tokens", "active_sessions", "max_sessions", "kv_block_size", "kv_blocks_total", "kv_blocks_used", "max_batch_tokens", "prefill_chunk", "draining", "tokenizer_fingerprint")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FAMILY_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CHUNK_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    role: str
    model_name: str
    model_family: str
    vocab_size: int
    max_seq_len: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    device: str
    backend: str
    max_draft_tokens: int
    active_sessions: int
    max_sessions: int
    kv_block_size: int
    kv_blocks_total: int
    kv_blocks_used: int
    max_batch_tokens: int
    prefill_chunk: int
    draining: bool
    tokenizer_fingerprint: str
    def __init__(self, role: _Optional[str] = ..., model_name: _Optional[str] = ..., model_family: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., backend: _Optional[str] = ..., max_draft_tokens: _Optional[int] = ..., active_sessions: _Optional[int] = ..., max_sessions: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., prefill_chunk: _Optional[int] = ..., draining: _Optional[bool] = ..., tokenizer_fingerprint: _Optional[str] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("capacity", "sampling")
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    capacity: int
    sampling: _generate_pb2.SamplingParams
    def __init__(self, capacity: _Optional[int] = ..., sampling: _Optional[_Union[_generate_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ProbabilityRow(_message.Message):
    __slots__ = ("token_ids", "probs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    probs: bytes
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., probs: _Optional[bytes] = ...) -> None: ...

class ProposeCommand(_message.Message):
    __slots__ = ("start_position", "token_ids", "num_tokens")
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    start_position: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    def __init__(self, start_position: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class Proposal(_message.Message):
    __slots__ = ("token_ids", "probs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedCompositeFieldContainer[ProbabilityRow]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[_Union[ProbabilityRow, _Mapping]]] = ...) -> None: ...

class DraftRequest(_message.Message):
    __slots__ = ("open", "propose", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    OPEN_FIELD_NUMBER: _ClassVar[int]
    PROPOSE_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    propose: ProposeCommand
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., propose: _Optional[_Union[ProposeCommand, _Mapping]] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class BatchStats(_message.Message):
    __slots__ = ("passes", "rows", "sessions", "device_seconds", "queue_seconds", "open_sessions")
    PASSES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    passes: int
    rows: int
    sessions: int
    device_seconds: float
    queue_seconds: float
    open_sessions: int
    def __init__(self, passes: _Optional[int] = ..., rows: _Optional[int] = ..., sessions: _Optional[int] = ..., device_seconds: _Optional[float] = ..., queue_seconds: _Optional[float] = ..., open_sessions: _Optional[int] = ...) -> None: ...

class DraftResponse(_message.Message):
    __slots__ = ("opened", "proposal", "batch")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    proposal: Proposal
    batch: BatchStats
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., proposal: _Optional[_Union[Proposal, _Mapping]] = ..., batch: _Optional[_Union[BatchStats, _Mapping]] = ...) -> None: ...

class ScoreCommand(_message.Message):
    __slots__ = ("start_position", "token_ids", "num_scored")
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_SCORED_FIELD_NUMBER: _ClassVar[int]
    start_position: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_scored: int
    def __init__(self, start_position: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., num_scored: _Optional[int] = ...) -> None: ...

class Scores(_message.Message):
    __slots__ = ("argmax_token_ids", "probs")
    ARGMAX_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    argmax_token_ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedCompositeFieldContainer[ProbabilityRow]
    def __init__(self, argmax_token_ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[_Union[ProbabilityRow, _Mapping]]] = ...) -> None: ...

class TargetRequest(_message.Message):
    __slots__ = ("open", "score", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    OPEN_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    score: ScoreCommand
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., score: _Optional[_Union[ScoreCommand, _Mapping]] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class TargetResponse(_message.Message):
    __slots__ = ("opened", "scores", "batch")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    scores: Scores
    batch: BatchStats
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., scores: _Optional[_Union[Scores, _Mapping]] = ..., batch: _Optional[_Union[BatchStats, _Mapping]] = ...) -> None: ...
