"""The engine's answers (OpenAI's chat and text completions) as Ollama's: one JSON object, or
NDJSON lines.

Streamed: one line per engine event that says something, then a last line with ``done: true``,
the reason and the token counts; tool calls as whole objects with their arguments parsed (on a
line of their own, after the text), reasoning as ``thinking``. A failure mid-stream is an
``{"error": ...}`` line, which Ollama's clients raise. Not streamed: the same, gathered into the
last line. The engine's request itself is the relay's (appliance.server.relay).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import httpx

from appliance.server.errors import APIError, InternalError, RequestTimeoutError
from appliance.server.masking import note_response
from appliance.server.record import RequestRecord
from appliance.server.relay import EngineAnswer, engine_failure

log = logging.getLogger(__name__)

NDJSON: Final = "application/x-ndjson"


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
        out: dict[str, Any] = {"model": self.model, "created_at": timestamp()}
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


def timestamp(when: datetime | None = None) -> str:
    """``when`` (now, by default) as Ollama writes times: ISO 8601 in UTC, with a ``Z``."""
    return (when or datetime.now(UTC)).isoformat().replace("+00:00", "Z")


def ndjson(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode("utf-8") + b"\n"


def loaded(model: str, kind: Literal["chat", "generate"]) -> dict[str, Any]:
    """Ollama's answer to a request with nothing to say: the model is loaded (it always is)."""
    out: dict[str, Any] = {"model": model, "created_at": timestamp()}
    if kind == "chat":
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    return {**out, "done": True, "done_reason": "load"}


async def ndjson_lines(upstream: EngineAnswer, answer: Answer) -> AsyncIterator[bytes]:
    """The engine's SSE events as Ollama's NDJSON lines (module docstring)."""
    record = answer.record
    outcome = "cancelled"
    try:
        async with asyncio.timeout_at(upstream.deadline):
            async for line in upstream.response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    raise engine_failure(500, line[6:].encode())
                text, thinking = answer.take(data)
                if text or thinking:
                    yield ndjson(answer.line(text, thinking))
        if record.finish_reason is None:
            log.error("the llama.cpp engine ended a stream without a finish reason")
            raise InternalError("the model's answer ended early; the server log says why")
        if answer.calls:
            yield ndjson(answer.line("", "", calls=True))
        yield ndjson(answer.last(whole=False))
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
        # What was said, even cut short, as the OpenAI routes keep it (log_prompts only).
        note_response(upstream.state, record, "".join(answer.text))
        await upstream.end(outcome)


def _error_line(record: RequestRecord, error: APIError) -> bytes:
    record.error = error.code or error.type
    return ndjson({"error": error.message})
