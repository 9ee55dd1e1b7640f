"""What stands between gRPC and a role's servicer: a stand-in while the servicer is being built,
and a precise answer to a request that is not a protobuf message at all."""

from __future__ import annotations

import inspect

import grpc
from google.protobuf.message import DecodeError


class PendingServicer:
    """Stands in for a servicer of `servicer_type` that is not built yet (its model loading, its
    backends not reached): every RPC answers UNAVAILABLE with `message` until ready(servicer),
    then is the servicer's own. So a process can listen, and answer health checks, at once."""

    def __init__(self, servicer_type: type, message: str):
        self._type = servicer_type
        self._message = message
        self._draining = False
        self.servicer = None

    def ready(self, servicer) -> None:
        servicer.draining = self._draining
        self.servicer = servicer

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:  # Server.drain: the servicer refuses new streams
        self._draining = value
        if self.servicer is not None:
            self.servicer.draining = value

    def in_flight(self) -> int:
        return self.servicer.in_flight() if self.servicer is not None else 0

    def __getattr__(self, name: str):
        """The RPC `name` (looked up once, when the servicer is added to the server)."""
        if inspect.isasyncgenfunction(getattr(self._type, name)):

            async def stream(request, context):
                if self.servicer is None:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, self._message)
                async for response in getattr(self.servicer, name)(request, context):
                    yield response

            return stream

        async def unary(request, context):
            if self.servicer is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, self._message)
            return await getattr(self.servicer, name)(request, context)

        return unary


class _Malformed:
    def __init__(self, error: DecodeError):
        self.error = error


class RejectMalformed(grpc.aio.ServerInterceptor):
    """Bytes that do not parse as a unary RPC's request message get INVALID_ARGUMENT (grpc's own
    answer is UNKNOWN). Streamed requests are parsed as the servicer reads them: it does the same
    (session_servicer.py)."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        parse, method = handler.request_deserializer, details.method

        def deserialize(data: bytes):
            try:
                return parse(data)
            except DecodeError as e:
                return _Malformed(e)

        async def refuse(context, malformed: _Malformed) -> None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: malformed request: {malformed.error}")

        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        behavior = getattr(handler, kind)
        if inspect.isasyncgenfunction(behavior):

            async def guarded(request, context):
                if isinstance(request, _Malformed):
                    await refuse(context, request)
                async for response in behavior(request, context):
                    yield response
        else:

            async def guarded(request, context):
                if isinstance(request, _Malformed):
                    await refuse(context, request)
                return await behavior(request, context)

        return handler._replace(request_deserializer=deserialize, **{kind: guarded})
