"""``POST /v1/chat/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from appliance.runtime.base import Backend, Generation
from appliance.runtime.llamaserver import LlamaServerBackend
from appliance.server.completion import respond
from appliance.server.deps import KeyName, Record, State
from appliance.server.openai_shapes import ChatShape
from appliance.server.relay import relay
from appliance.server.schemas import ChatCompletionRequest

router = APIRouter(prefix="/v1", tags=["chat"])


@router.post("/chat/completions", summary="Create a chat completion (OpenAI-compatible)")
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, state: State, record: Record, _key: KeyName
) -> Response:
    if isinstance(state.engine.holder.get(), LlamaServerBackend):
        return await relay(
            request,
            state,
            record,
            body,
            path="/v1/chat/completions",
            payload=body.engine_payload(),
            prompt=body.model_dump(include={"messages"}, exclude_unset=True)["messages"],
            prompt_bytes=body.prompt_bytes(),
        )
    params = body.params()
    messages = body.chat()

    def start(backend: Backend) -> Generation:
        return backend.generate(backend.format_chat(messages), params)

    return await respond(
        request,
        state,
        record,
        body,
        shape=ChatShape(model=body.model, include_usage=body.include_usage),
        prompt=[{"role": m.role, "content": m.content} for m in messages],
        start=start,
    )
