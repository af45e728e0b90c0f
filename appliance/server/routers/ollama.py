"""The Ollama API (``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/tags``, ...), for
Ollama's clients, behind the same gateway as the OpenAI routes.

A chat or generate request is translated into the engine's OpenAI request (``/v1/chat/completions``,
or ``/v1/completions`` for a ``raw`` generate) and goes the relay's way (appliance.server.relay):
the model check, the byte bound, a run slot and a lease (429 when the queue is full), the
deadline, the request record and the metrics. The engine's answer is translated back: streamed,
one NDJSON line per engine event, then a last line with ``done: true``, the reason and the token
counts; tool calls as whole objects with their arguments parsed, reasoning as ``thinking``.

What Ollama offers and we cannot honour is refused by name (400), as on the OpenAI routes:
load-time ``options`` (the signed bundle fixes them), a ``num_ctx`` above the served context,
``suffix``, ``template``, ``context``, log probabilities. ``keep_alive`` is accepted and has no
effect: the one served model is always loaded.

Errors on these routes are Ollama's shape, ``{"error": "message"}``, with the status the OpenAI
routes answer (:class:`OllamaRoute`); mid-stream, an ``{"error": ...}`` line, which Ollama's
clients raise. The model is named by its id, with or without Ollama's default tag ``:latest``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Annotated, Any, Final, Literal

import httpx
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException

from appliance.runtime.base import Backend
from appliance.runtime.llamaserver import LlamaServerBackend
from appliance.server.completion import unless_disconnected
from appliance.server.deps import AppState, EngineDep, KeyName, Record, State
from appliance.server.engine import Engine
from appliance.server.errors import (
    APIError,
    BadRequestError,
    ClientClosedError,
    InternalError,
    ModelNotFoundError,
    NotReadyError,
    RequestTimeoutError,
    UnsupportedParameterError,
    as_api_error,
    validation_error,
)
from appliance.server.record import RequestRecord
from appliance.server.relay import Release, engine_failure, finish, serving, within
from appliance.server.routers.embeddings import EmbeddingsNotSupportedError
from appliance.server.schemas import MAX_STOP, lone_surrogate_at
from signing.errors import AirgapError

log = logging.getLogger(__name__)

DEFAULT_TAG: Final = ":latest"
NDJSON: Final = "application/x-ndjson"
MAX_EMBED_INPUTS: Final = 2048

# Ollama's options that are settings of the loaded model, not of a request.
_LOAD_OPTIONS: Final = frozenset(
    {
        "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
        "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread",
    }
)  # fmt: skip
_DROPPED_OPTIONS: Final = {
    "tfs_z": "tail-free sampling is no longer in llama.cpp",
    "penalize_newline": "no longer in llama.cpp",
}
# Top-level fields Ollama has and we do not honour, with the one value that is fine to send.
_REFUSED_FIELDS: Final = {
    "suffix": ("", "fill-in-the-middle is not supported"),
    "template": ("", "the model's own chat template is used"),
    "context": ([], "token contexts are not returned, use /api/chat for a conversation"),
    "logprobs": (False, "log probabilities are not supported on the Ollama API"),
    "top_logprobs": (0, "log probabilities are not supported on the Ollama API"),
    "dimensions": (None, "embeddings have the model's own dimensions"),
}


# -- errors in Ollama's shape ----------------------------------------------------------------


class BackendNotSupportedError(APIError):
    status = 501
    code = "not_supported"


class OllamaRoute(APIRoute):
    """A route whose errors are ``{"error": "message"}``, the shape Ollama's clients read."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 (every error is answered, in one shape)
                error = _as_error(exc, request)
                RequestRecord.of(request).error = error.code or error.type
                status = exc.status_code if isinstance(exc, HTTPException) else error.status
                return JSONResponse(
                    {"error": error.message}, status_code=status, headers=error.headers()
                )

        return answer


def _as_error(exc: Exception, request: Request) -> APIError:
    """``exc`` as the OpenAI routes' handlers (appliance.server.errors) see it."""
    if isinstance(exc, AirgapError):
        return as_api_error(exc)
    if isinstance(exc, RequestValidationError):
        return validation_error(exc)
    if isinstance(exc, HTTPException):
        return BadRequestError(str(exc.detail))
    log.error("unexpected error on %s", request.url.path, exc_info=exc)
    return InternalError("internal server error")


router = APIRouter(prefix="/api", tags=["ollama"], route_class=OllamaRoute)


# -- requests --------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionCall(_Strict):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    index: int | None = None


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None


class Options(BaseModel):
    """The per-request ``options`` the engine takes; anything else is refused by name."""

    model_config = ConfigDict(extra="allow")

    temperature: Annotated[float, Field(ge=0.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    typical_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: int | None = None
    num_predict: Annotated[int, Field(ge=-2)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    repeat_penalty: Annotated[float, Field(gt=0.0)] | None = None
    repeat_last_n: Annotated[int, Field(ge=-1)] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    mirostat: Literal[0, 1, 2] | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    num_keep: Annotated[int, Field(ge=-1)] | None = None
    num_ctx: Annotated[int, Field(ge=1)] | None = None

    def sampling(self) -> dict[str, Any]:
        """The engine's sampling fields, after refusing what it does not take."""
        for name, value in (self.model_extra or {}).items():
            if value is None:
                continue
            param = f"options.{name}"
            if name in _LOAD_OPTIONS:
                raise UnsupportedParameterError(
                    f"{param} is a load-time setting, fixed by the signed bundle", param=param
                )
            reason = _DROPPED_OPTIONS.get(name, "unknown option")
            raise UnsupportedParameterError(f"{param} is not supported: {reason}", param=param)
        given = self.model_dump(
            exclude_none=True, exclude={"num_ctx", "num_predict", "num_keep", "stop"}
        )
        if self.num_keep is not None:
            given["n_keep"] = self.num_keep
        if self.num_predict is not None and self.num_predict > 0:
            given["max_tokens"] = self.num_predict
        elif self.num_predict == 0:
            raise BadRequestError("options.num_predict must not be 0", param="options.num_predict")
        if self.stop:
            given["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        return given

    def check_context(self, context: int) -> None:
        if self.num_ctx is not None and self.num_ctx > context:
            raise BadRequestError(
                f"options.num_ctx {self.num_ctx} is more than the served context of "
                f"{context} tokens",
                param="options.num_ctx",
            )


class _OllamaRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    options: Options | None = None
    keep_alive: float | str | None = None  # no effect: the model is always loaded

    @model_validator(mode="before")
    @classmethod
    def _refuse_lone_surrogates(cls, data: Any) -> Any:
        where = lone_surrogate_at(data)
        if where is not None:
            raise BadRequestError(
                f"invalid value for {where or 'the request body'}: it contains a lone surrogate",
                param=where or None,
            )
        return data

    def refuse_unknown(self) -> None:
        for name, value in (self.model_extra or {}).items():
            fine, reason = _REFUSED_FIELDS.get(name, (None, ""))
            if value is None or value == fine:
                continue
            if reason:
                raise UnsupportedParameterError(f"{name} is not supported: {reason}", param=name)
            raise UnsupportedParameterError(f"unknown parameter: {name}", param=name)

    def sampling(self) -> dict[str, Any]:
        self.refuse_unknown()
        return self.options.sampling() if self.options is not None else {}


class _TextRequest(_OllamaRequest):
    stream: bool | None = None
    format: Literal["", "json"] | dict[str, Any] | None = None
    think: bool | Literal["low", "medium", "high"] | None = None

    @property
    def streamed(self) -> bool:
        return self.stream is not False  # Ollama streams unless told not to

    def shaping(self) -> dict[str, Any]:
        """``format`` and ``think`` as the engine's chat fields."""
        out: dict[str, Any] = {}
        if self.format == "json":
            out["response_format"] = {"type": "json_object"}
        elif isinstance(self.format, dict):
            out["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "format", "schema": self.format},
            }
        if isinstance(self.think, bool):
            out["chat_template_kwargs"] = {"enable_thinking": self.think}
        elif self.think is not None:
            out["chat_template_kwargs"] = {"enable_thinking": True, "reasoning_effort": self.think}
        return out


class ChatRequest(_TextRequest):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(_TextRequest):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None


class EmbedRequest(_OllamaRequest):
    input: str | Annotated[list[str], Field(max_length=MAX_EMBED_INPUTS)]
    truncate: bool | None = None  # an input that does not fit is refused, never cut


class EmbeddingsRequest(_OllamaRequest):
    prompt: str = ""


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    name: str | None = None  # the older clients' field
    verbose: bool | None = None


# -- translation to the engine ---------------------------------------------------------------


def engine_messages(messages: list[Message], *, vision: bool) -> list[dict[str, Any]]:
    """Ollama's messages as OpenAI's; images only for a model that takes them (``vision``).
    Tool calls get ids, and a tool's answer the id of the earliest unanswered call of that tool
    (Ollama pairs them by name)."""
    out: list[dict[str, Any]] = []
    unanswered: dict[str, list[str]] = {}
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        item: dict[str, Any] = {"role": message.role, "content": _content(message, where, vision)}
        if message.thinking is not None or message.tool_calls:
            if message.role != "assistant":
                raise BadRequestError(
                    f"{where}: thinking and tool_calls are for assistant messages", param=where
                )
            if message.thinking:
                item["reasoning_content"] = message.thinking
        if message.tool_calls:
            calls = []
            for j, call in enumerate(message.tool_calls):
                call_id = call.id or f"call_{i}_{j}"
                unanswered.setdefault(call.function.name, []).append(call_id)
                calls.append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": call.function.name,
                            "arguments": json.dumps(call.function.arguments),
                        },
                    }
                )
            item["tool_calls"] = calls
        if message.tool_name is not None:
            if message.role != "tool":
                raise BadRequestError(f"{where}: tool_name is for tool messages", param=where)
            item["name"] = message.tool_name
            pending = unanswered.get(message.tool_name)
            if pending:
                item["tool_call_id"] = pending.pop(0)
        out.append(item)
    return out


def _content(message: Message, where: str, vision: bool) -> str | list[dict[str, Any]]:
    if not message.images:
        return message.content
    if not vision:
        # The engine would answer a 500 for it; it is the request that cannot be served.
        raise BadRequestError(f"{where}: this model takes no images", param=f"{where}.images")
    parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}]
    for k, image in enumerate(message.images):
        url = f"data:{_image_type(image, f'{where}.images[{k}]')};base64,{image}"
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return parts


_IMAGE_MAGIC: Final = (
    (b"\x89PNG", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"RIFF", "image/webp"),
    (b"BM", "image/bmp"),
)


def _image_type(data: str, where: str) -> str:
    """The MIME type of a base64 image, by its first bytes (Ollama sends no type)."""
    try:
        head = base64.b64decode(data[:16], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestError(f"{where}: an image must be base64", param=where) from None
    for magic, kind in _IMAGE_MAGIC:
        if head.startswith(magic):
            return kind
    raise BadRequestError(f"{where}: not a PNG, JPEG, GIF, WebP or BMP image", param=where)


def _text_bytes(messages: list[dict[str, Any]]) -> int:
    size = 0
    for message in messages:
        content = message["content"]
        text = content if isinstance(content, str) else content[0]["text"]
        size += len(text.encode("utf-8", "replace"))
    return size


# -- answers ---------------------------------------------------------------------------------


@dataclass
class Answer:
    """The engine's answer, gathered from its events (or from its one whole answer), and
    written out as Ollama's lines."""

    kind: Literal["chat", "generate"]
    model: str
    record: RequestRecord
    text: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, str]] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)

    def take(self, data: dict[str, Any]) -> tuple[str, str]:
        """Note one engine event; its new text and thinking."""
        record = self.record
        if record.first_token_at is None:
            record.first_token_at = time.monotonic()
        if isinstance(data.get("timings"), dict):
            self.timings = data["timings"]
        usage = data.get("usage")
        if isinstance(usage, dict):
            record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            record.completion_tokens = int(usage.get("completion_tokens") or 0)
        text = thinking = ""
        for choice in data.get("choices") or ():
            part = choice.get("delta") or choice.get("message") or {}
            text += part.get("content") or choice.get("text") or ""
            thinking += part.get("reasoning_content") or ""
            for j, call in enumerate(part.get("tool_calls") or ()):
                self._take_call(int(call.get("index", j)), call)
            if choice.get("finish_reason"):
                record.finish_reason = str(choice["finish_reason"])
        self.text.append(text)
        self.thinking.append(thinking)
        return text, thinking

    def _take_call(self, index: int, call: dict[str, Any]) -> None:
        so_far = self.calls.setdefault(index, {"name": "", "arguments": ""})
        function = call.get("function") or {}
        so_far["name"] += function.get("name") or ""
        so_far["arguments"] += function.get("arguments") or ""

    def line(self, text: str, thinking: str, *, calls: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": _now()}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls and self.calls:
                message["tool_calls"] = self.tool_calls()
            out["message"] = message
        else:
            out["response"] = text
            if thinking:
                out["thinking"] = thinking
        out["done"] = False
        return out

    def tool_calls(self) -> list[dict[str, Any]]:
        return [
            {
                "function": {
                    "index": index,
                    "name": call["name"],
                    "arguments": _arguments(call["arguments"]),
                }
            }
            for index, call in sorted(self.calls.items())
        ]

    def last(self, *, whole: bool) -> dict[str, Any]:
        """The final line; ``whole``: with all the text (the answer not streamed)."""
        record = self.record
        if whole:
            out = self.line("".join(self.text), "".join(self.thinking), calls=True)
        else:
            out = self.line("", "")
        reason = record.finish_reason or "stop"
        out.update(
            done=True,
            done_reason="length" if reason == "length" else "stop",
            total_duration=int((time.monotonic() - record.started) * 1e9),
            load_duration=0,
            prompt_eval_count=record.prompt_tokens,
            prompt_eval_duration=int(float(self.timings.get("prompt_ms") or 0) * 1e6),
            eval_count=record.completion_tokens,
            eval_duration=int(float(self.timings.get("predicted_ms") or 0) * 1e6),
        )
        return out


def _arguments(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise InternalError("the model answered a tool call whose arguments are not an object")
    return value


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _ndjson(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode("utf-8") + b"\n"


# -- the text routes -------------------------------------------------------------------------


@router.post("/chat", summary="Chat (Ollama-compatible)")
async def chat(
    body: ChatRequest, request: Request, state: State, record: Record, _key: KeyName
) -> Response:
    model = _begin(state, record, body.model, stream=body.streamed)
    payload = {**body.sampling(), **body.shaping()}
    if not body.messages:
        return _loaded(model, "chat")
    messages = engine_messages(body.messages, vision=_vision(state.engine.holder.get()))
    payload["messages"] = messages
    if body.tools:
        payload["tools"] = body.tools
    if state.settings.log_prompts:
        record.prompt = body.model_dump(include={"messages"}, exclude_none=True)["messages"]
    return await _answer(
        request, state, record, body, Answer("chat", model, record),
        path="/v1/chat/completions", payload=payload, prompt_bytes=_text_bytes(messages),
    )  # fmt: skip


@router.post("/generate", summary="Generate (Ollama-compatible)")
async def generate(
    body: GenerateRequest, request: Request, state: State, record: Record, _key: KeyName
) -> Response:
    model = _begin(state, record, body.model, stream=body.streamed)
    payload = body.sampling()
    if not body.prompt and not body.images:
        return _loaded(model, "generate")
    if state.settings.log_prompts:
        record.prompt = body.prompt if body.raw or not body.system else [body.system, body.prompt]
    if body.raw:
        if body.system or body.images or body.think is not None:
            raise BadRequestError("a raw prompt takes no system, images or think", param="raw")
        if body.format == "json":
            payload["json_schema"] = {"type": "object"}
        elif isinstance(body.format, dict):
            payload["json_schema"] = body.format
        payload["prompt"] = body.prompt
        path, size = "/v1/completions", len(body.prompt.encode("utf-8", "replace"))
    else:
        turns = [Message(role="user", content=body.prompt, images=body.images)]
        if body.system:
            turns.insert(0, Message(role="system", content=body.system))
        messages = engine_messages(turns, vision=_vision(state.engine.holder.get()))
        payload.update(body.shaping(), messages=messages)
        path, size = "/v1/chat/completions", _text_bytes(messages)
    return await _answer(
        request, state, record, body, Answer("generate", model, record),
        path=path, payload=payload, prompt_bytes=size,
    )  # fmt: skip


def _begin(state: AppState, record: RequestRecord, name: str, *, stream: bool) -> str:
    record.stream = stream
    model = served_model(state.engine, name)
    record.model = model
    if not isinstance(state.engine.holder.get(), LlamaServerBackend):
        raise BackendNotSupportedError(
            "the Ollama chat and generate routes need the llama.cpp engine; "
            "use /v1/chat/completions for this model"
        )
    return model


def served_model(engine: Engine, name: str) -> str:
    """The served model's id, for ``name`` that is it, with or without ``:latest``."""
    served = engine.model_id()
    if name in (served, served + DEFAULT_TAG):
        return served
    raise ModelNotFoundError(
        f"model {name!r} not found: this server serves {served!r}", param="model"
    )


def _loaded(model: str, kind: Literal["chat", "generate"]) -> JSONResponse:
    """Ollama's answer to a request with nothing to say: the model is loaded (it always is)."""
    out: dict[str, Any] = {"model": model, "created_at": _now()}
    if kind == "chat":
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    return JSONResponse({**out, "done": True, "done_reason": "load"})


async def _answer(
    request: Request,
    state: AppState,
    record: RequestRecord,
    body: _TextRequest,
    answer: Answer,
    *,
    path: str,
    payload: dict[str, Any],
    prompt_bytes: int,
) -> Response:
    engine = state.engine
    payload.update(model=answer.model, stream=body.streamed)
    if body.streamed:
        payload["stream_options"] = {"include_usage": True}
    deadline = engine.deadline(record)
    lease = await unless_disconnected(request.receive, engine.admit(record, deadline))
    release = Release(state, lease)
    try:
        backend = serving(lease.backend)
        if body.options is not None:
            body.options.check_context(backend.context_size)
        backend.check_prompt_bytes(prompt_bytes)
        client = backend.async_http()
        upstream = client.build_request("POST", path, content=json.dumps(payload).encode())
        record.generation_started = time.monotonic()
        response = await unless_disconnected(
            request.receive, within(deadline, client.send(upstream, stream=True))
        )
    except BaseException:
        release()
        raise
    if response.status_code != 200:
        try:
            failed = await response.aread()
        finally:
            await response.aclose()
            release()
        raise engine_failure(response.status_code, failed)
    if body.streamed:
        return StreamingResponse(
            _lines(state, answer, response, release, deadline=deadline), media_type=NDJSON
        )
    try:
        whole = await unless_disconnected(request.receive, within(deadline, response.aread()))
        answer.take(json.loads(whole))
        out = answer.last(whole=True)
    except BaseException as exc:
        outcome = "cancelled" if isinstance(exc, ClientClosedError) else "failed"
        finish(state, record, "timeout" if isinstance(exc, RequestTimeoutError) else outcome)
        raise
    finally:
        await response.aclose()
        release()
    finish(state, record, "finished")
    return JSONResponse(out)


async def _lines(
    state: AppState,
    answer: Answer,
    response: httpx.Response,
    release: Callable[[], None],
    *,
    deadline: float,
) -> AsyncIterator[bytes]:
    """The engine's SSE events as Ollama's NDJSON lines (module docstring)."""
    record = answer.record
    outcome = "cancelled"
    try:
        async with asyncio.timeout_at(deadline):
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    raise engine_failure(500, line[6:].encode())
                text, thinking = answer.take(data)
                if text or thinking:
                    yield _ndjson(answer.line(text, thinking))
        if record.finish_reason is None:
            log.error("the llama.cpp engine ended a stream without a finish reason")
            raise InternalError("the model's answer ended early; the server log says why")
        if answer.calls:
            yield _ndjson(answer.line("", "", calls=True))
        yield _ndjson(answer.last(whole=False))
        outcome = "finished"
    except TimeoutError:
        outcome = "timeout"
        yield _error_line(record, RequestTimeoutError("request timed out while generating"))
    except httpx.TransportError as exc:
        outcome = "failed"
        log.error("the llama.cpp engine broke off a stream: %s", exc)  # noqa: TRY400
        yield _error_line(record, InternalError("the model failed on this request"))
    except APIError as exc:
        outcome = "failed"
        yield _error_line(record, exc)
    except ValueError as exc:
        outcome = "failed"
        log.error("the llama.cpp engine sent an event that is not JSON: %s", exc)  # noqa: TRY400
        yield _error_line(record, InternalError("the model failed; the server log says why"))
    finally:
        with contextlib.suppress(Exception):
            await response.aclose()  # a client that left: the engine stops generating
        release()
        if outcome == "cancelled":
            record.error = ClientClosedError.code
        finish(state, record, outcome)


def _error_line(record: RequestRecord, error: APIError) -> bytes:
    record.error = error.code or error.type
    return _ndjson({"error": error.message})


# -- embeddings ------------------------------------------------------------------------------


@router.post("/embed", summary="Embed (Ollama-compatible)")
async def embed(body: EmbedRequest, state: State, record: Record, _key: KeyName) -> dict[str, Any]:
    model = served_model(state.engine, body.model)
    body.refuse_unknown()
    texts = [body.input] if isinstance(body.input, str) else body.input
    vectors, tokens = await _embed(state, record, model, texts, body.options)
    return {
        "model": model,
        "embeddings": vectors,
        "total_duration": int((time.monotonic() - record.started) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": tokens,
    }


@router.post("/embeddings", summary="Embed one prompt (Ollama's older route)")
async def embeddings(
    body: EmbeddingsRequest, state: State, record: Record, _key: KeyName
) -> dict[str, Any]:
    model = served_model(state.engine, body.model)
    body.refuse_unknown()
    if not body.prompt:
        record.model = model
        return {"embedding": []}
    (vector,), _ = await _embed(state, record, model, [body.prompt], body.options)
    return {"embedding": vector}


async def _embed(
    state: AppState, record: RequestRecord, model: str, texts: list[str], options: Options | None
) -> tuple[list[list[float]], int]:
    record.model = model
    given = sorted(options.model_dump(exclude_none=True)) if options is not None else []
    for name in given:
        if name != "num_ctx":
            raise UnsupportedParameterError(
                f"options.{name} does not apply to embeddings", param=f"options.{name}"
            )
    if state.settings.log_prompts:
        record.prompt = texts
    if not texts:
        return [], 0

    def run(backend: Backend) -> tuple[list[list[float]], int]:
        if not backend.supports_embeddings:
            raise EmbeddingsNotSupportedError(
                f"the model {backend.model_id!r} does not support embeddings", param="model"
            )
        if options is not None:
            options.check_context(backend.context_size)
        return backend.embed(texts), sum(backend.count_tokens(t) for t in texts)

    vectors, tokens = await state.engine.call(record, run)
    record.prompt_tokens = tokens
    return vectors, tokens


# -- the model -------------------------------------------------------------------------------


@router.get("/tags", summary="List the served model (Ollama-compatible)")
async def tags(engine: EngineDep, _key: KeyName) -> dict[str, Any]:
    backend = engine.holder.get()
    return {"models": [] if backend is None else [_describe(engine, backend)]}


@router.get("/ps", summary="The loaded model (Ollama-compatible)")
async def ps(engine: EngineDep, _key: KeyName) -> dict[str, Any]:
    backend = engine.holder.get()
    if backend is None:
        return {"models": []}
    return {"models": [{**_describe(engine, backend), "context_length": backend.context_size}]}


@router.post("/show", summary="Describe the served model (Ollama-compatible)")
async def show(body: ShowRequest, engine: EngineDep, _key: KeyName) -> dict[str, Any]:
    name = body.model or body.name
    if not name:
        raise BadRequestError("missing required parameter: model", param="model")
    served_model(engine, name)
    backend = engine.holder.get()
    if backend is None:  # taken out just now
        raise NotReadyError("no model is loaded")
    described = _describe(engine, backend)
    props = _props(backend)
    capabilities = ["completion"]
    caps = props.get("chat_template_caps") or {}
    if caps.get("supports_tools") or caps.get("supports_tool_calls"):
        capabilities.append("tools")
    if _vision(backend):
        capabilities.append("vision")
    if backend.supports_embeddings:
        capabilities.append("embedding")
    return {
        "modelfile": "",
        "parameters": "",
        "template": str(props.get("chat_template") or ""),
        "details": described["details"],
        "model_info": {"general.context_length": backend.context_size},
        "capabilities": capabilities,
        "modified_at": described["modified_at"],
    }


@router.get("/version", summary="The server's version (Ollama-compatible)")
async def server_version(_key: KeyName) -> dict[str, str]:
    return {"version": version("airgap-appliance")}


def _describe(engine: Engine, backend: Backend) -> dict[str, Any]:
    loaded = datetime.fromtimestamp(engine.holder.loaded_at() or 0, UTC)
    size = 0
    if isinstance(backend, LlamaServerBackend):
        with contextlib.suppress(OSError):
            size = backend.settings.model_path.stat().st_size
    return {
        "name": backend.model_id,
        "model": backend.model_id,
        "modified_at": loaded.isoformat().replace("+00:00", "Z"),
        "size": size,
        "digest": "",
        "details": {
            "parent_model": "",
            "format": "gguf" if isinstance(backend, LlamaServerBackend) else "safetensors",
            "family": "",
            "families": None,
            "parameter_size": "",
            "quantization_level": str(_props(backend).get("model_ftype") or ""),
        },
    }


def _props(backend: Backend | None) -> dict[str, Any]:
    """What the engine says of itself at start (llama-server's ``/props``)."""
    return backend.engine.props if isinstance(backend, LlamaServerBackend) else {}


def _vision(backend: Backend | None) -> bool:
    return bool((_props(backend).get("modalities") or {}).get("vision"))
