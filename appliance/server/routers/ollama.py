"""The Ollama API (``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/tags``, ...), for
Ollama's clients, behind the same gateway as the OpenAI routes: the routes.

A chat or generate request is translated into the engine's OpenAI request (``/v1/chat/completions``,
or ``/v1/completions`` for a ``raw`` generate; appliance.server.ollama_schemas) and goes the
relay's way (appliance.server.relay): the model check, the byte bound, a run slot and a lease
(429 when the queue is full), the deadline, the request record and the metrics. The engine's
answer is translated back (appliance.server.ollama_shapes): one JSON object, or NDJSON lines.

Errors on these routes are Ollama's shape, ``{"error": "message"}``, with the status the OpenAI
routes answer: the app's handlers answer it for every path under ``/api/``
(appliance.server.errors.error_payload). The model is named by its id, with or without Ollama's
default tag ``:latest``.
"""

from __future__ import annotations

import contextlib
import json
import time
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any, Final

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from appliance.runtime.base import Backend
from appliance.runtime.llamaserver import LlamaServerBackend
from appliance.server.deps import AppState, EngineDep, KeyName, Record, State
from appliance.server.engine import Engine
from appliance.server.errors import (
    APIError,
    BadRequestError,
    ModelNotFoundError,
    NotReadyError,
    UnsupportedParameterError,
)
from appliance.server.masking import mask_for_log, mask_texts_for_model, note_response
from appliance.server.ollama_schemas import (
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    Message,
    Options,
    ShowRequest,
    TextRequest,
    engine_messages,
    text_bytes,
)
from appliance.server.ollama_shapes import NDJSON, Answer, loaded, ndjson_lines, timestamp
from appliance.server.record import RequestRecord
from appliance.server.relay import finish, open_engine_request
from appliance.server.routers.embeddings import EmbeddingsNotSupportedError

DEFAULT_TAG: Final = ":latest"


class BackendNotSupportedError(APIError):
    status = 501
    code = "not_supported"


router = APIRouter(prefix="/api", tags=["ollama"])


# -- the text routes -------------------------------------------------------------------------


@router.post("/chat", summary="Chat (Ollama-compatible)")
async def chat(
    body: ChatRequest, request: Request, state: State, record: Record, _key: KeyName
) -> Response:
    model = _begin(state, record, body.model, stream=body.streamed)
    payload = {**body.sampling(), **body.shaping()}
    if not body.messages:
        return JSONResponse(loaded(model, "chat"))
    messages = engine_messages(body.messages, vision=_vision(state.engine.holder.get()))
    payload["messages"] = messages
    if body.tools:
        payload["tools"] = body.tools
    if state.settings.log_prompts:
        messages_in = body.model_dump(include={"messages"}, exclude_none=True)["messages"]
        record.prompt = mask_for_log(state, record, messages_in)
    return await _answer(
        request, state, record, body, Answer("chat", model, record),
        path="/v1/chat/completions", payload=payload, prompt_bytes=text_bytes(messages),
    )  # fmt: skip


@router.post("/generate", summary="Generate (Ollama-compatible)")
async def generate(
    body: GenerateRequest, request: Request, state: State, record: Record, _key: KeyName
) -> Response:
    model = _begin(state, record, body.model, stream=body.streamed)
    payload = body.sampling()
    if not body.prompt and not body.images:
        return JSONResponse(loaded(model, "generate"))
    if state.settings.log_prompts:
        text = body.prompt if body.raw or not body.system else [body.system, body.prompt]
        record.prompt = mask_for_log(state, record, text)
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
        path, size = "/v1/chat/completions", text_bytes(messages)
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


async def _answer(
    request: Request,
    state: AppState,
    record: RequestRecord,
    body: TextRequest,
    answer: Answer,
    *,
    path: str,
    payload: dict[str, Any],
    prompt_bytes: int,
) -> Response:
    payload.update(model=answer.model, stream=body.streamed)
    upstream = await open_engine_request(
        request, state, record, path=path, payload=payload, prompt_bytes=prompt_bytes,
        stream=body.streamed, check=body.check_fits,
    )  # fmt: skip
    if body.streamed:
        return StreamingResponse(ndjson_lines(upstream, answer), media_type=NDJSON)
    whole = await upstream.read(request)
    try:
        answer.take(json.loads(whole))
        out = answer.last(whole=True)
    except Exception:
        finish(state, record, "failed")
        raise
    note_response(state, record, "".join(answer.text))
    finish(state, record, "finished")
    return JSONResponse(out)


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
    texts = mask_texts_for_model(state, record, texts)
    if state.settings.log_prompts:
        record.prompt = mask_for_log(state, record, texts)
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
    loaded_at = datetime.fromtimestamp(engine.holder.loaded_at() or 0, UTC)
    size = 0
    if isinstance(backend, LlamaServerBackend):
        with contextlib.suppress(OSError):
            size = backend.settings.model_path.stat().st_size
    return {
        "name": backend.model_id,
        "model": backend.model_id,
        "modified_at": timestamp(loaded_at),
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
