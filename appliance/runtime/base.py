"""The interface between the REST server and a model runtime (llama.cpp, transformers).

A backend owns the model and its compute; the server owns HTTP, auth, queueing and metrics.
Generation is a blocking iterator run on a worker thread: the server pulls chunks and sets the
``cancel`` event when the client goes away or the request times out, and the backend must stop
within one token of that.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from signing.errors import InputError, ModelError
from signing.requirements import MemoryEstimate

FinishReason = Literal["stop", "length"]
DEFAULT_CONTEXT = 2048
# For models without a chat template of their own. The last newline is an expression because
# Jinja drops a template's final newline.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}{{ '<|assistant|>\\n' }}"
)


class ContextLengthError(InputError):
    """The prompt plus requested tokens do not fit in the model's context."""

    def __init__(self, prompt_tokens: int, context: int) -> None:
        super().__init__(
            f"this model's maximum context length is {context} tokens, "
            f"but the prompt has {prompt_tokens} tokens"
        )
        self.prompt_tokens = prompt_tokens
        self.context = context


class PromptTooLongError(ContextLengthError):
    """The prompt has more bytes than the context's tokens can stand for: refused untokenized."""

    def __init__(self, prompt_bytes: int, *, context: int, token_bytes: int) -> None:
        # Not ContextLengthError's message: the token count is what was not computed.
        InputError.__init__(
            self,
            f"this model's maximum context length is {context} tokens, and no token stands for "
            f"more than {token_bytes} bytes of text, but the prompt has {prompt_bytes} bytes "
            f"or more (at most {context * token_bytes} can fit)",
        )
        self.prompt_tokens = 0  # unknown: never tokenized
        self.context = context


def encode_prompt(text: str, *, context: int, token_bytes: int) -> bytes:
    """``text`` as UTF-8 for a tokenizer, refused first if it cannot fit in ``context`` tokens.

    ``token_bytes`` is the most bytes of text one token of the model stands for, so a text of
    more than ``context * token_bytes`` bytes has more than ``context`` tokens whatever the
    tokenizer makes of it: refusing it costs nothing, while tokenizing it can cost a great deal
    (llama.cpp's tokenizer is quadratic on byte-fallback text: docs/adr/0009-server-limits.md).
    Every backend encodes prompts and embedding inputs here, before it tokenizes them.
    """
    limit = context * token_bytes
    if len(text) > limit:  # a character is at least one byte: no need to encode to know
        raise PromptTooLongError(len(text), context=context, token_bytes=token_bytes)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:  # the server refuses these earlier, naming the field
        raise InputError(
            f"the prompt is not valid Unicode text: a lone surrogate at character {exc.start}"
        ) from None
    if len(data) > limit:
        raise PromptTooLongError(len(data), context=context, token_bytes=token_bytes)
    return data


@dataclass(frozen=True)
class RuntimeSettings:
    """What the signed manifest's ``runtime`` table says, resolved against the slot."""

    backend: Literal["llama.cpp", "transformers"]
    model_path: Path
    model_id: str
    context_size: int | None = None
    gpu_layers: int | None = None  # None: all layers when a GPU and a GPU build exist, else 0
    threads: int | None = None
    dtype: str | None = None
    parallel: int = 4  # sequences generated at once
    slot: Path | None = None  # the slot it comes from (its remembered CPU variant: cpuvariant)
    # The signed memory table, logged beside what the runtime allocates (none in old bundles).
    memory_estimate: MemoryEstimate | None = None
    # LoRA adapters applied to the model (llama.cpp only; bound to its weights by the manifest).
    adapters: tuple[Path, ...] = ()

    @classmethod
    def from_manifest(
        cls,
        runtime: Mapping[str, Any],
        *,
        model_path: Path,
        model_id: str,
        parallel: int = 4,
        memory_estimate: MemoryEstimate | None = None,
    ) -> RuntimeSettings:
        return cls(
            backend=runtime["backend"],
            model_path=model_path,
            model_id=model_id,
            context_size=runtime.get("context_size"),
            gpu_layers=runtime.get("gpu_layers"),
            threads=runtime.get("threads"),
            dtype=runtime.get("dtype"),
            parallel=parallel,
            memory_estimate=memory_estimate,
        )


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the end of the context
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass
class GenerationChunk:
    """Newly generated text; the last chunk of a generation carries ``finish_reason``."""

    text: str
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0  # running count, including this chunk


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass
class Generation:
    """A generation in progress: the prompt's token count is known before the first chunk."""

    prompt_tokens: int
    chunks: Iterator[GenerationChunk]
    cancel: threading.Event = field(default_factory=threading.Event)


class Backend(Protocol):
    """A loaded model. Thread-safe: the server calls it from many worker threads."""

    @property
    def model_id(self) -> str: ...

    @property
    def context_size(self) -> int: ...

    @property
    def supports_embeddings(self) -> bool: ...

    def format_chat(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt for a chat, by the model's own chat template when it has one."""

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text``; ContextLengthError, untokenized, if it cannot fit the context."""

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        """Start generating; raises ContextLengthError before any work if it cannot fit (a
        prompt longer than the context can hold is refused before it is tokenized)."""

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text; ContextLengthError, untokenized, for a text that cannot fit."""

    def close(self) -> None: ...


__all__ = [
    "DEFAULT_CONTEXT",
    "FALLBACK_CHAT_TEMPLATE",
    "Backend",
    "ChatMessage",
    "ContextLengthError",
    "FinishReason",
    "Generation",
    "GenerationChunk",
    "ModelError",
    "PromptTooLongError",
    "RuntimeSettings",
    "SamplingParams",
    "encode_prompt",
]
