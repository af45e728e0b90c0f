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

    @classmethod
    def from_manifest(
        cls, runtime: Mapping[str, Any], *, model_path: Path, model_id: str, parallel: int = 4
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

    def count_tokens(self, text: str) -> int: ...

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        """Start generating; raises ContextLengthError before any work if it cannot fit."""

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...

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
    "RuntimeSettings",
    "SamplingParams",
]
