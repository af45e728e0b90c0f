"""The Ollama API's request bodies, and their translation into the engine's OpenAI request.

What Ollama offers and we cannot honour is refused by name (400), as on the OpenAI routes
(appliance.server.schemas, whose :class:`~appliance.server.schemas.RequestBody` also refuses a
lone surrogate): load-time ``options`` (the signed bundle fixes them), a ``num_ctx`` above the
served context, ``suffix``, ``template``, ``context``, log probabilities. ``keep_alive`` is
accepted and has no effect: the one served model is always loaded.

Messages become OpenAI's: tool calls get ids and a tool's answer the id of its call (Ollama pairs
them by name), images become data URLs typed by their first bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.runtime.base import Backend
from appliance.server.errors import BadRequestError, UnsupportedParameterError
from appliance.server.schemas import MAX_STOP, RequestBody

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


class OllamaRequest(RequestBody):
    """What every Ollama body has: the model, its ``options``, ``keep_alive``."""

    model: str
    options: Options | None = None
    keep_alive: float | str | None = None  # no effect: the model is always loaded

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

    def check_fits(self, backend: Backend) -> None:
        """Refuse an ``options.num_ctx`` above ``backend``'s served context."""
        if self.options is not None:
            self.options.check_context(backend.context_size)


class TextRequest(OllamaRequest):
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


class ChatRequest(TextRequest):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(TextRequest):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None


class EmbedRequest(OllamaRequest):
    input: str | Annotated[list[str], Field(max_length=MAX_EMBED_INPUTS)]
    truncate: bool | None = None  # an input that does not fit is refused, never cut


class EmbeddingsRequest(OllamaRequest):
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


def text_bytes(messages: list[dict[str, Any]]) -> int:
    """The bytes of ``messages``' text (engine_messages' output), for the prompt's byte bound."""
    size = 0
    for message in messages:
        content = message["content"]
        text = content if isinstance(content, str) else content[0]["text"]
        size += len(text.encode("utf-8", "replace"))
    return size
