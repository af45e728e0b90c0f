"""What one request did, filled in as it goes and written out when its response has ended."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.types import Scope

STATE_KEY = "record"


@dataclass
class RequestRecord:
    method: str
    path: str
    started: float = field(default_factory=time.monotonic)
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    route: str | None = None  # the route template, e.g. /v1/models/{model_id}
    status: int | None = None
    key_name: str | None = None
    model: str | None = None
    slot: str | None = None  # which slot answered: "active" or "canary" (appliance.canary)
    stream: bool | None = None
    prompt: str | list[Any] | None = None  # only when the operator turned on log_prompts
    response: str | None = None  # the answer's text: log_prompts only, masked
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    first_token_at: float | None = None
    generation_started: float | None = None
    generation_ended: float | None = None
    error: str | None = None  # the error code (or type) answered

    @classmethod
    def of(cls, request: Request) -> RequestRecord:
        return cls.of_scope(request.scope)

    @classmethod
    def of_scope(cls, scope: Scope) -> RequestRecord:
        state = scope.setdefault("state", {})
        record = state.get(STATE_KEY)
        if not isinstance(record, RequestRecord):
            record = state[STATE_KEY] = cls(method=scope["method"], path=scope["path"])
        return record

    def latency_ms(self, now: float) -> float:
        return round((now - self.started) * 1000.0, 3)

    def to_log(self, now: float) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "time": self.time.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "key": self.key_name,
            "method": self.method,
            "route": self.route or self.path,
            "status": self.status,
            "model": self.model,
            "stream": self.stream,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "latency_ms": self.latency_ms(now),
            "error": self.error,
        }
        if self.slot is not None:
            entry["slot"] = self.slot
        if self.prompt is not None:
            entry["prompt"] = self.prompt
        if self.response is not None:
            entry["response"] = self.response
        return entry
