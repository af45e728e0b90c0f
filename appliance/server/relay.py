"""Relaying the OpenAI routes to the llama-server engine (appliance.runtime.llamaserver).

What stays ours, in front: the API key, the body limit, the bounded queue with its 429s, the
model check, refusing unsupported fields by name (appliance.server.schemas), the byte bound on
prompts, the deadline, the request log and the metrics. What the engine does: templates, tools,
grammars, reasoning, sampling, batching.

A request takes a run slot (:class:`~appliance.server.admission.Admission`) and a lease on the
served backend, exactly as an in-process generation does, and gives both back when the engine's
answer has ended (or the client left). A streamed answer is passed through as the engine's bytes,
event by event, with no JSON decoding except for the one or two events that carry the finish
reason and the usage: the engine is always asked for usage (the request log and the metrics need
the token counts), and the usage event is dropped again when the client did not ask for it. A
client that goes away closes the stream to the engine, which stops generating (llama-server
checks its connection at every token). The Ollama routes (appliance.server.routers.ollama) open
their engine requests the same way (:func:`open_engine_request`) and shape the answer themselves.

Errors the engine answers (``{"error": {"code": 400, "type": ...}}``) are answered in our shape:
a context overflow is ``context_length_exceeded``, a bad request a 400 naming what the engine
said, anything else a 500 whose details go to the log. An engine that is restarting is a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from appliance.runtime.llamaserver import LlamaServerBackend, engine_error
from appliance.server.completion import SSE_HEADERS, unless_disconnected
from appliance.server.deps import AppState
from appliance.server.errors import (
    APIError,
    BadRequestError,
    ClientClosedError,
    ContextLengthExceededError,
    InternalError,
    NotReadyError,
    RequestTimeoutError,
    api_error_body,
)
from appliance.server.masking import mask_for_log, mask_for_model, note_response
from appliance.server.openai_shapes import sse
from appliance.server.record import RequestRecord
from appliance.server.schemas import SamplingRequest

log = logging.getLogger(__name__)

_FINISH: Final = b'"finish_reason":"'
_USAGE: Final = b'"usage":{'
_EMPTY_CHOICES: Final = b'"choices":[]'
_CHAT_TOKEN: Final = b'"delta":{"content":"'
_THINK_TOKEN: Final = b'"delta":{"reasoning_content":"'
_TEXT_TOKEN: Final = b'"text":"'
# llama-server names its text completions like chat ones; OpenAI's are "cmpl-...".
_CHAT_ID: Final = b'"id":"chatcmpl-'
_TEXT_ID: Final = b'"id":"cmpl-'


class Release:
    """Gives the lease and the run slot back, once."""

    def __init__(self, state: AppState, lease: Any) -> None:
        self._state = state
        self._lease = lease
        self._done = False

    def __call__(self) -> None:
        if not self._done:
            self._done = True
            self._lease.release()
            self._state.engine.admission.release()


@dataclass(frozen=True)
class EngineAnswer:
    """The engine's 200 answer to ``record``, its body not read yet. Whoever reads the body
    ends the request by :meth:`read` or :meth:`end`: the engine's connection is closed, the run
    slot and the lease are given back, the generation is counted in the metrics."""

    state: AppState
    record: RequestRecord
    response: httpx.Response
    release: Release
    deadline: float

    async def read(self, request: Request) -> bytes:
        """The whole body (before the deadline, unless the client leaves); a generation that
        fails here is counted, one that does not is the caller's to :func:`finish`."""
        try:
            return await unless_disconnected(
                request.receive, within(self.deadline, self.response.aread())
            )
        except BaseException as exc:
            finish(self.state, self.record, _outcome(exc))
            raise
        finally:
            await self.response.aclose()
            self.release()

    async def end(self, outcome: str) -> None:
        """End a stream whose ``outcome`` is known ("cancelled": the client left)."""
        with contextlib.suppress(Exception):
            await self.response.aclose()  # a client that left: the engine stops generating
        self.release()
        if outcome == "cancelled":
            self.record.error = ClientClosedError.code
        finish(self.state, self.record, outcome)


async def open_engine_request(
    request: Request,
    state: AppState,
    record: RequestRecord,
    *,
    path: str,
    payload: dict[str, Any],
    prompt_bytes: int,
    stream: bool,
    check: Callable[[LlamaServerBackend], None] | None = None,
) -> EngineAnswer:
    """Admit ``record`` (a run slot and a lease, before its deadline) and send ``payload`` to the
    engine's ``path``; ``check``: what else the leased backend must allow, before the prompt's
    byte bound. Anything but a 200 gives the slot and the lease back and is raised as an
    :class:`APIError`, and counted in the metrics when the engine had the request."""
    # PII masking before anything reaches the engine; a masker that fails refuses the request.
    mask_for_model(state, record, payload)
    engine = state.engine
    deadline = engine.deadline(record)
    lease = await unless_disconnected(request.receive, engine.admit(record, deadline))
    release = Release(state, lease)
    try:
        backend = serving(lease.backend)
        if check is not None:
            check(backend)
        backend.check_prompt_bytes(prompt_bytes)
        if stream:
            payload["stream_options"] = {"include_usage": True}
        client = backend.async_http()
        upstream = client.build_request("POST", path, content=json.dumps(payload).encode())
        record.generation_started = time.monotonic()
        response = await unless_disconnected(
            request.receive, within(deadline, client.send(upstream, stream=True))
        )
    except BaseException as exc:
        release()
        if record.generation_started is not None:  # the engine had the request
            finish(state, record, _outcome(exc))
        raise
    if response.status_code != 200:
        try:
            answer = await response.aread()
        finally:
            await response.aclose()
            release()
        finish(state, record, "failed")
        raise engine_failure(response.status_code, answer)
    return EngineAnswer(state, record, response, release, deadline)


async def relay(
    request: Request,
    state: AppState,
    record: RequestRecord,
    body: SamplingRequest,
    *,
    path: str,
    payload: dict[str, Any],
    prompt: Any,
    prompt_bytes: int,
) -> Response:
    """Answer ``body`` by the engine's ``path``; ``payload`` is what is sent there."""
    record.model = body.model
    record.stream = bool(body.stream)
    state.engine.check_model(body.model)
    if state.settings.log_prompts:
        record.prompt = mask_for_log(state, record, prompt)
    upstream = await open_engine_request(
        request,
        state,
        record,
        path=path,
        payload=payload,
        prompt_bytes=prompt_bytes,
        stream=bool(body.stream),
    )
    text_ids = path == "/v1/completions"
    if body.stream:
        return StreamingResponse(
            _pass_through(
                upstream,
                usage=body.include_usage,
                text_ids=text_ids,
                keep_text=state.settings.log_prompts,
            ),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    answer = await upstream.read(request)
    _account(record, answer)
    if state.settings.log_prompts:
        note_response(state, record, _answer_text(answer))
    record.first_token_at = record.first_token_at or time.monotonic()
    finish(state, record, "finished")
    if text_ids:
        answer = answer.replace(_CHAT_ID, _TEXT_ID, 1)
    return Response(answer, media_type="application/json")


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, ClientClosedError | asyncio.CancelledError):
        return "cancelled"
    return "timeout" if isinstance(exc, RequestTimeoutError) else "failed"


def serving(backend: object) -> LlamaServerBackend:
    if not isinstance(backend, LlamaServerBackend):
        raise NotReadyError("the served model changed while this request waited; retry")
    if not backend.ready:
        raise NotReadyError("the llama.cpp engine is restarting; retry shortly")
    return backend


async def within(deadline: float, work: Any) -> Any:
    try:
        async with asyncio.timeout_at(deadline):
            return await work
    except TimeoutError:
        raise RequestTimeoutError("request timed out") from None
    except httpx.TransportError as exc:
        log.error("the llama.cpp engine did not answer: %s", exc)  # noqa: TRY400
        raise NotReadyError("the llama.cpp engine is restarting; retry shortly") from None


async def _pass_through(
    upstream: EngineAnswer, *, usage: bool, text_ids: bool, keep_text: bool = False
) -> AsyncIterator[bytes]:
    """The engine's events to the client; ``keep_text``: also the answer's text for the
    request log (log_prompts), decoded once the stream has ended."""
    record = upstream.record
    outcome = "cancelled"
    pending = b""
    kept: list[bytes] | None = [] if keep_text else None
    try:
        async with asyncio.timeout_at(upstream.deadline):
            async for data in upstream.response.aiter_raw():
                pending += data
                cut = pending.rfind(b"\n\n")
                if cut < 0:
                    continue
                events, pending = pending[: cut + 2], pending[cut + 2 :]
                if kept is not None:
                    kept.append(events)
                out = _inspect(record, events, usage)
                if out:
                    yield out.replace(_CHAT_ID, _TEXT_ID) if text_ids else out
        if pending.strip():
            out = _inspect(record, pending, usage)
            yield out.replace(_CHAT_ID, _TEXT_ID) if text_ids else out
        outcome = "finished" if record.finish_reason is not None else "failed"
    except TimeoutError:
        outcome = "timeout"
        timeout = RequestTimeoutError("request timed out while generating")
        record.error = timeout.code
        yield sse(api_error_body(timeout))
    except httpx.TransportError as exc:
        outcome = "failed"
        log.error("the llama.cpp engine broke off a stream: %s", exc)  # noqa: TRY400
        error = InternalError("the model failed on this request; the server log says why")
        record.error = error.code
        yield sse(api_error_body(error))
    finally:
        if kept is not None:
            note_response(upstream.state, record, _streamed_text(b"".join(kept)))
        await upstream.end(outcome)


def _inspect(record: RequestRecord, events: bytes, include_usage: bool) -> bytes:
    """``events`` (whole SSE events) as they go to the client; notes what the record needs."""
    if record.first_token_at is None:
        record.first_token_at = time.monotonic()
    # One event per token (llama-server streams each, text held back for UTF-8 included): the
    # count until the usage event says it exactly, for a stream the client leaves before.
    record.completion_tokens += (
        events.count(_CHAT_TOKEN) + events.count(_THINK_TOKEN) + events.count(_TEXT_TOKEN)
    )
    if _FINISH not in events and _USAGE not in events:
        return events  # the common case: text deltas, passed as they are
    out = []
    for raw in events.split(b"\n\n"):
        event = _note(record, raw, include_usage) if _FINISH in raw or _USAGE in raw else raw
        if event.strip():
            out.append(event + b"\n\n")
    return b"".join(out)


def _note(record: RequestRecord, event: bytes, include_usage: bool) -> bytes:
    head, _, payload = event.partition(b"data: ")
    try:
        data = json.loads(payload)
    except ValueError:
        return event
    _account_chunk(record, data)
    if _USAGE not in event or (include_usage and _EMPTY_CHOICES in event):
        return event
    if _EMPTY_CHOICES in event:
        return b""  # the usage event the client did not ask for
    # Usage on the last chunk of choices (llama-server's text completions): OpenAI sends it as
    # an event of its own, with no choices, after that chunk.
    usage = data.pop("usage", None)
    chunk = head + b"data: " + _dumps(data)
    if not include_usage:
        return chunk
    alone = {k: data[k] for k in ("id", "object", "created", "model") if k in data}
    return chunk + b"\n\n" + head + b"data: " + _dumps({**alone, "choices": [], "usage": usage})


def _answer_text(answer: bytes) -> str:
    """The text of a whole chat or text completion (its first choice)."""
    try:
        choice = json.loads(answer)["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return ""
    message = choice.get("message") or {}
    return str(message.get("content") or choice.get("text") or "")


def _streamed_text(events: bytes) -> str:
    """The text of a streamed answer: its chunks' deltas (or texts), joined."""
    parts: list[str] = []
    for event in events.split(b"\n\n"):
        _, _, payload = event.partition(b"data: ")
        if not payload.strip() or payload.strip() == b"[DONE]":
            continue
        try:
            choice = json.loads(payload)["choices"][0]
            delta = choice.get("delta") or {}
            parts.append(str(delta.get("content") or choice.get("text") or ""))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            continue  # the usage event (no choices), or an error event
    return "".join(parts)


def _dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def _account_chunk(record: RequestRecord, data: dict[str, Any]) -> None:
    for choice in data.get("choices") or ():
        reason = choice.get("finish_reason")
        if reason:
            record.finish_reason = str(reason)
    usage = data.get("usage")
    if isinstance(usage, dict):
        record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        record.completion_tokens = int(usage.get("completion_tokens") or 0)


def _account(record: RequestRecord, answer: bytes) -> None:
    try:
        data = json.loads(answer)
    except ValueError:
        return
    if isinstance(data, dict):
        _account_chunk(record, data)


def finish(state: AppState, record: RequestRecord, outcome: str) -> None:
    if record.generation_ended is not None:
        return
    record.generation_ended = time.monotonic()
    state.engine.metrics.observe_generation(record, outcome)


def engine_failure(status: int, answer: bytes) -> APIError:
    kind, message = engine_error(status, answer)
    if kind == "exceed_context_size_error":
        return ContextLengthExceededError(message)
    if status == 400 or kind == "invalid_request_error":
        return BadRequestError(message)
    if status == 503:
        return NotReadyError(message or "the llama.cpp engine is busy loading")
    if status == 501 or kind == "not_supported_error":
        return BadRequestError(f"not supported by this model: {message}")
    log.error("the llama.cpp engine answered %d: %s", status, message)
    return InternalError("the model failed on this request; the server log says why")
