"""``POST /v1/embeddings``, for models whose backend can embed."""

from __future__ import annotations

import base64
import struct
from typing import Any

from fastapi import APIRouter

from appliance.runtime.base import Backend
from appliance.server.deps import KeyName, Record, State
from appliance.server.errors import APIError
from appliance.server.masking import mask_for_log, mask_texts_for_model
from appliance.server.schemas import EmbeddingRequest

router = APIRouter(prefix="/v1", tags=["embeddings"])


class EmbeddingsNotSupportedError(APIError):
    code = "embeddings_not_supported"


@router.post("/embeddings", summary="Create embeddings (OpenAI-compatible)")
async def create_embeddings(
    body: EmbeddingRequest, state: State, record: Record, _key: KeyName
) -> dict[str, Any]:
    engine = state.engine
    record.model = body.model
    engine.check_model(body.model)
    texts = mask_texts_for_model(state, record, body.texts())
    if state.settings.log_prompts:
        record.prompt = mask_for_log(state, record, texts)

    def embed(backend: Backend) -> tuple[list[list[float]], int]:
        if not backend.supports_embeddings:
            raise EmbeddingsNotSupportedError(
                f"the model {backend.model_id!r} does not support embeddings", param="model"
            )
        return backend.embed(texts), sum(backend.count_tokens(t) for t in texts)

    vectors, tokens = await engine.call(record, embed)
    record.prompt_tokens = tokens
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what the openai client asks for by default
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector
