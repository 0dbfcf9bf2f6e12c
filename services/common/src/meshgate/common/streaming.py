"""Response streams that always end in the task that served them.

grpc.aio consumes a handler that is an async generator with a plain
`async for`: when the call is cancelled while the generator waits at a `yield`
(the client stalled, so the write blocked, then went away or reconnected), the
cancellation lands in grpc's write and the generator is left suspended. It is
closed much later by the garbage collector, from another task and another
`contextvars.Context`. Then

- OpenTelemetry's server interceptor, whose generator holds the span's context
  token across its `yield`s, fails to detach it ("Failed to detach context",
  with a traceback, at ERROR);
- the handler's own `finally` runs late or never: an agent's session stays
  "connected", a Watch keeps its etcd watch.

`CloseStreams`, the outermost server interceptor, serves every
response-streaming handler through the reader/writer API instead: it iterates
the generator itself, writes each message with `context.write`, and closes the
generator with `aclose()` in the call's own task however the call ends. A write that fails because the
client has gone ends the call quietly (grpc would log it as an ERROR with a
traceback).
"""

from __future__ import annotations

import inspect

import grpc


def _closing(behavior):
    async def serve(request_or_iterator, context) -> None:
        stream = behavior(request_or_iterator, context)
        try:
            async for message in stream:
                try:
                    await context.write(message)
                except Exception as e:
                    # The client went away mid-write (grpc's core refused the send:
                    # ExecuteBatchError): the call is over, there is nothing to
                    # report, and raising would only log a traceback at ERROR.
                    if context.done() or type(e).__name__ == "ExecuteBatchError":
                        return
                    raise
        finally:
            await stream.aclose()

    return serve


class CloseStreams(grpc.aio.ServerInterceptor):
    """Serve async-generator stream handlers so that they are closed in their own task."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler
        if handler.request_streaming:
            behavior, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        else:
            behavior, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        if not inspect.isasyncgenfunction(behavior):
            return handler  # already a reader/writer coroutine (or a sync generator)
        return make(_closing(behavior), request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
