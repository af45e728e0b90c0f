"""Response bodies in the OpenAI shapes: whole responses, stream chunks, usage, SSE framing."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from appliance.server.record import RequestRecord


def usage(record: RequestRecord) -> dict[str, int]:
    return {
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "total_tokens": record.prompt_tokens + record.completion_tokens,
    }


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class _Shape:
    ID_PREFIX: ClassVar[str]
    OBJECT: ClassVar[str]
    CHUNK_OBJECT: ClassVar[str]

    model: str
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.ID_PREFIX + secrets.token_hex(12)

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _chunk_head(self) -> dict[str, Any]:
        return self._head(self.CHUNK_OBJECT)

    def usage_chunk(self, record: RequestRecord) -> dict[str, Any]:
        return {**self._chunk_head(), "choices": [], "usage": usage(record)}


@dataclass
class ChatShape(_Shape):
    ID_PREFIX = "chatcmpl-"
    OBJECT = "chat.completion"
    CHUNK_OBJECT = "chat.completion.chunk"

    def chunk(self, text: str, finish_reason: str | None, *, first: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text or (first and finish_reason is None):
            delta["content"] = text
        out = {
            **self._chunk_head(),
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if self.include_usage:
            out["usage"] = None
        return out

    def whole(self, text: str, finish_reason: str, record: RequestRecord) -> dict[str, Any]:
        return {
            **self._head(self.OBJECT),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage(record),
            "system_fingerprint": None,
        }


@dataclass
class TextShape(_Shape):
    ID_PREFIX = "cmpl-"
    OBJECT = "text_completion"
    CHUNK_OBJECT = "text_completion"

    def chunk(self, text: str, finish_reason: str | None, *, first: bool) -> dict[str, Any]:
        del first  # completions have no role to announce
        out = {
            **self._chunk_head(),
            "choices": [
                {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if self.include_usage:
            out["usage"] = None
        return out

    def whole(self, text: str, finish_reason: str, record: RequestRecord) -> dict[str, Any]:
        return {
            **self._head(self.OBJECT),
            "choices": [
                {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            ],
            "usage": usage(record),
            "system_fingerprint": None,
        }


Shape = ChatShape | TextShape
