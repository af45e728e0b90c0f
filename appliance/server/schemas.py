"""Request bodies of the OpenAI-compatible routes, and their translation to SamplingParams.

Fields we cannot honour are refused (400, ``param`` naming them) rather than ignored: a client
that asks for tools or log probabilities must not get an answer that silently lacks them.

JSON may carry a lone surrogate (``"\\ud800"``), which Python's parser keeps in the string but
which is not Unicode text: nothing after it (pydantic, the tokenizer, the request log) can
encode it. Every body is searched for one before its fields are validated; it is a 400 naming
the field, never a 500.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from appliance.runtime.base import ChatMessage, SamplingParams
from appliance.server.errors import BadRequestError, UnsupportedParameterError

MAX_STOP = 16
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


class RequestBody(BaseModel):
    """A JSON request body, searched for a lone surrogate before its fields are validated
    (module docstring): the base of the OpenAI routes' bodies (here) and of the Ollama routes'
    (appliance.server.ollama_schemas)."""

    # Unknown fields are kept (clients send many optional ones); subclasses refuse them by name.
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _refuse_lone_surrogates(cls, data: Any) -> Any:
        where = lone_surrogate_at(data)
        if where is not None:
            # An APIError, not a ValueError: pydantic lets it through as it is, param and all.
            raise BadRequestError(
                f"invalid value for {where or 'the request body'}: it contains a lone surrogate "
                "(a \\ud800 to \\udfff escape that is not half of a pair), which is not text",
                param=where or None,
            )
        return data


class _Request(RequestBody):
    # (field, the one value of it that is fine to send, e.g. logprobs=false)
    UNSUPPORTED: ClassVar[tuple[tuple[str, Any], ...]] = ()

    def reject_unsupported(self) -> None:
        given = {**(self.model_extra or {}), **self.__dict__}
        for name, harmless in self.UNSUPPORTED:
            value = given.get(name)
            if value is not None and value != harmless:
                raise UnsupportedParameterError(f"{name} is not supported", param=name)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(_Request):
    """What the two text routes share: the model, sampling, streaming."""

    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repeat_penalty: Annotated[float, Field(gt=0.0)] | None = None  # llama.cpp extension
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        self.reject_unsupported()
        if self.n not in (None, 1):
            raise BadRequestError("only n=1 is supported", param="n")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        defaults = SamplingParams()
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=_or(self.temperature, defaults.temperature),
            top_p=_or(self.top_p, defaults.top_p),
            stop=tuple(s for s in stop if s),
            seed=self.seed,
            repeat_penalty=_or(self.repeat_penalty, defaults.repeat_penalty),
            presence_penalty=_or(self.presence_penalty, defaults.presence_penalty),
            frequency_penalty=_or(self.frequency_penalty, defaults.frequency_penalty),
        )


class ContentPart(BaseModel):
    """A part of a message's content: text, or media the engine may take (an image for a model
    with a projector); the in-process backends take text only."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text", "image_url", "input_audio", "file"]
    text: str | None = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""

    def to_message(self) -> ChatMessage:
        """The message for an in-process backend, which knows text only."""
        if isinstance(self.content, list):
            for part in self.content:
                if part.type != "text":
                    raise UnsupportedParameterError(
                        f"content of type {part.type} needs the llama.cpp engine",
                        param="messages",
                    )
        if self.tool_calls or self.tool_call_id:
            raise UnsupportedParameterError(
                "tool calls need the llama.cpp engine", param="messages"
            )
        return ChatMessage(role=self.role, content=self.text())


# What the llama.cpp engine (llama-server) takes beyond the fields declared below: OpenAI's
# optional fields it implements, and llama.cpp's own sampling and template extensions
# (docs/api.md lists them). Any other field is refused by name: never silently ignored.
ENGINE_CHAT_FIELDS: Final = frozenset(
    {
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "chat_template_kwargs",
        "reasoning_format",
    }
)
ENGINE_SAMPLING_FIELDS: Final = frozenset(
    {
        "top_k",
        "min_p",
        "typical_p",
        "repeat_last_n",
        "dry_multiplier",
        "dry_base",
        "dry_allowed_length",
        "dry_penalty_last_n",
        "xtc_probability",
        "xtc_threshold",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "grammar",
        "json_schema",
        "n_probs",
        "min_keep",
        "ignore_eos",
        "cache_prompt",
        "samplers",
    }
)
# OpenAI fields the engine does not implement: refused with the reason.
ENGINE_REFUSED: Final = {
    "functions": "the deprecated functions API: use tools",
    "function_call": "the deprecated functions API: use tool_choice",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "store": "stored completions are not supported",
    "metadata": "stored completions are not supported",
    "service_tier": "there is one service tier",
    "web_search_options": "web search is not available on an isolated host",
    "reasoning_effort": "use chat_template_kwargs (e.g. enable_thinking) for reasoning models",
    "echo": "echo is not supported",
    "suffix": "suffix (fill-in-the-middle) is not supported on /v1/completions",
    "best_of": "best_of is not supported",
}
_HARMLESS: Final = {
    "modalities": (["text"],),
    "store": (False,),
    "echo": (False,),
    "best_of": (1,),
    "service_tier": ("auto", "default"),
    "function_call": ("none",),
}


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    UNSUPPORTED = (
        ("tools", None),
        ("tool_choice", "none"),
        ("functions", None),
        ("function_call", "none"),
        ("response_format", {"type": "text"}),
        ("logprobs", False),
        ("top_logprobs", None),
        ("logit_bias", None),
        ("audio", None),
        ("modalities", ["text"]),
        ("prediction", None),
    )

    def params(self) -> SamplingParams:
        return self.sampling(self.max_completion_tokens or self.max_tokens)

    def chat(self) -> list[ChatMessage]:
        return [m.to_message() for m in self.messages]

    def engine_payload(self) -> dict[str, Any]:
        """The body for the llama.cpp engine, after refusing what it cannot honour."""
        return engine_payload(self, ENGINE_CHAT_FIELDS | ENGINE_SAMPLING_FIELDS)

    def prompt_bytes(self) -> int:
        """Bytes of text in the messages: a lower bound of the prompt (the template adds to
        it), for the byte bound that refuses a prompt that cannot fit before it is tokenized."""
        return sum(len(m.text().encode("utf-8", "replace")) for m in self.messages)


class CompletionRequest(SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

    UNSUPPORTED = (
        ("echo", False),
        ("suffix", None),
        ("best_of", 1),
        ("logprobs", None),
        ("logit_bias", None),
    )

    def params(self) -> SamplingParams:
        return self.sampling(self.max_tokens)

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def engine_payload(self) -> dict[str, Any]:
        """The body for the llama.cpp engine, after refusing what it cannot honour."""
        return engine_payload(self, frozenset({"logprobs", "logit_bias"}) | ENGINE_SAMPLING_FIELDS)

    def prompt_bytes(self) -> int:
        return len(self.text().encode("utf-8", "replace"))


class EmbeddingRequest(_Request):
    model: str
    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    UNSUPPORTED = (("dimensions", None),)

    def texts(self) -> list[str]:
        self.reject_unsupported()
        return [self.input] if isinstance(self.input, str) else list(self.input)


def engine_payload(request: SamplingRequest, allowed: frozenset[str]) -> dict[str, Any]:
    """``request`` as the engine's body: every field given must be declared or ``allowed``;
    one the engine does not implement is refused with the reason, an unknown one as unknown."""
    for name, value in (request.model_extra or {}).items():
        if name in allowed or value in _HARMLESS.get(name, ()):
            continue
        if name in ENGINE_REFUSED:
            raise UnsupportedParameterError(
                f"{name} is not supported: {ENGINE_REFUSED[name]}", param=name
            )
        if name == "modalities":
            raise UnsupportedParameterError("only text output is supported", param=name)
        raise UnsupportedParameterError(f"unknown parameter: {name}", param=name)
    if request.n not in (None, 1):
        raise BadRequestError("only n=1 is supported", param="n")
    return request.model_dump(exclude_unset=True)


def lone_surrogate_at(data: Any) -> str | None:
    """Where the first lone surrogate in parsed JSON is (``messages[0].content``), or None.

    Keys count too (the path of their object, "" for the top level). Iterative: the nesting
    depth of a body is the client's choice.
    """
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path
        elif isinstance(value, dict):
            for key in value:
                if isinstance(key, str) and _SURROGATE.search(key):
                    return path
            stack.extend(
                (f"{path}.{key}" if path else str(key), item)
                for key, item in reversed(value.items())
            )
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
