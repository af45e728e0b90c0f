"""``POST /v1/completions`` (the legacy text completion API)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from appliance.runtime.base import Backend, Generation
from appliance.runtime.llamaserver import LlamaServerBackend
from appliance.server.completion import respond
from appliance.server.deps import KeyName, Record, State
from appliance.server.openai_shapes import TextShape
from appliance.server.relay import relay
from appliance.server.schemas import CompletionRequest

router = APIRouter(prefix="/v1", tags=["completions"])


@router.post("/completions", summary="Create a text completion (OpenAI-compatible)")
async def create_completion(
    body: CompletionRequest, request: Request, state: State, record: Record, _key: KeyName
) -> Response:
    if isinstance(state.engine.holder.get(), LlamaServerBackend):
        return await relay(
            request,
            state,
            record,
            body,
            path="/v1/completions",
            payload=body.engine_payload(),
            prompt=body.text(),
            prompt_bytes=body.prompt_bytes(),
        )
    params = body.params()
    prompt = body.text()

    def start(backend: Backend) -> Generation:
        return backend.generate(prompt, params)

    return await respond(
        request,
        state,
        record,
        body,
        shape=TextShape(model=body.model, include_usage=body.include_usage),
        prompt=prompt,
        start=start,
    )
