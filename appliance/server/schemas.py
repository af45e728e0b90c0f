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


class _Request(BaseModel):
    # Unknown fields are kept (clients send many optional ones) and checked by reject_unsupported.
    model_config = ConfigDict(extra="allow")

    # (field, the one value of it that is fine to send, e.g. logprobs=false)
    UNSUPPORTED: ClassVar[tuple[tuple[str, Any], ...]] = ()

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


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def to_message(self) -> ChatMessage:
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        return ChatMessage(role=self.role, content=text)


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


class EmbeddingRequest(_Request):
    model: str
    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    UNSUPPORTED = (("dimensions", None),)

    def texts(self) -> list[str]:
        self.reject_unsupported()
        return [self.input] if isinstance(self.input, str) else list(self.input)


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
