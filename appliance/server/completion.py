"""The one path of both text routes (chat and completions): generate, then answer whole or as SSE.

Streaming: the response starts only once the backend has accepted the prompt, so a prompt that
does not fit is a plain 400 even with ``stream: true``. After that the status is sent; a timeout
or failure becomes an ``error`` event (which the OpenAI clients raise), with no ``[DONE]``.
A client that goes away cancels the generation: Starlette cancels the stream when it sees the
disconnect, and until the stream starts (queueing, the backend taking the prompt) and on the
non-streamed path we watch for it ourselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive

from appliance.runtime.base import Backend, Generation
from appliance.server.deps import AppState
from appliance.server.engine import RunningGeneration
from appliance.server.errors import APIError, ClientClosedError, InternalError, api_error_body
from appliance.server.masking import (
    mask_for_log,
    note_response,
    refuse_unmasked_model_input,
)
from appliance.server.openai_shapes import SSE_DONE, Shape, sse
from appliance.server.record import RequestRecord
from appliance.server.schemas import SamplingRequest

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
T = TypeVar("T")


async def respond(
    request: Request,
    state: AppState,
    record: RequestRecord,
    body: SamplingRequest,
    *,
    shape: Shape,
    prompt: Any,
    start: Callable[[Backend], Generation],
) -> Response:
    """Answer ``body`` with what ``start`` generates; ``prompt`` goes to the request log
    (only with ``log_prompts``)."""
    record.model = body.model
    record.stream = bool(body.stream)
    state.engine.check_model(body.model)
    if state.settings.log_prompts:
        record.prompt = mask_for_log(state, record, prompt)
    refuse_unmasked_model_input(state, record)  # an in-process backend: prompts go as given
    # Waiting for a slot and for the backend to take the prompt can be long: a client that
    # leaves meanwhile gives up its place (the generation, if it started, stops at once).
    running = await unless_disconnected(request.receive, state.engine.generate(record, start))
    if body.stream:
        return StreamingResponse(
            _events(running, shape, record),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    try:
        text, finish_reason = await unless_disconnected(request.receive, running.collect())
    except ClientClosedError:
        running.finish("cancelled")
        raise
    note_response(state, record, text)
    return JSONResponse(shape.whole(text, finish_reason, record))


async def _events(
    running: RunningGeneration, shape: Shape, record: RequestRecord
) -> AsyncIterator[bytes]:
    first = True
    try:
        async for chunk in running.chunks():
            if chunk.text or first:
                yield sse(shape.chunk(chunk.text, None, first=first))
                first = False
        yield sse(shape.chunk("", record.finish_reason or "stop", first=False))
        if shape.include_usage:
            yield sse(shape.usage_chunk(record))
        yield SSE_DONE
    except APIError as exc:
        record.error = exc.code or exc.type
        yield sse(api_error_body(exc))
    except Exception as exc:  # the status is sent: an error event is all that is left
        log.exception("generation failed mid-stream", exc_info=exc)
        error = InternalError("internal server error")
        record.error = error.code
        yield sse(api_error_body(error))
    finally:
        if running.finish("cancelled"):  # the client left before the end
            record.error = ClientClosedError.code


async def unless_disconnected(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """The result of ``work``, unless the client disconnects first: then ``work`` is
    cancelled and the answer is 499."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientClosedError("the client closed the connection")
    finally:
        for pending in (task, gone):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
