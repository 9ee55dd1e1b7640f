"""Errors that carry what the caller got wrong, so every layer can map them to a gRPC status."""


class InvalidArgument(ValueError):
    """A request field is out of bounds. The message starts with the field's name."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


class ResourceExhausted(RuntimeError):
    """The server is full (sessions, memory); the request may succeed later."""


class ShuttingDown(RuntimeError):
    """The service drains (SIGTERM): it finishes the streams it has and takes no new ones
    (UNAVAILABLE, so a client or balancer retries elsewhere)."""


class DeviceUnavailable(RuntimeError):
    """No device could be opened: no chip or GPU, a wrong id, or the backend's package missing.
    A service exits 1 with the message."""


def check_token_ids(field: str, token_ids, vocab_size: int) -> None:
    for i, token in enumerate(token_ids):
        if not 0 <= token < vocab_size:
            raise InvalidArgument(f"{field}[{i}]", f"{token} is outside the vocabulary [0, {vocab_size})")
