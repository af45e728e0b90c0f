"""A llama.cpp backend of parallel contexts (llama-cpp-python's high-level API).

Not the served backend: ``appliance.runtime.llamacpp_batch`` is (continuous batching, exact
token counts, cancellation every token). This one stays as the reference the batched engine is
tested against (greedy output must match) and benchmarked against (bench/bench_batching.py),
and it holds the helpers both share. Its streaming goes through ``create_completion``, which
holds back text that is not valid UTF-8 and checks ``cancel`` only when text arrives.

Concurrency: llama-cpp-python's own server serialises every request behind one lock. Here a
pool of ``parallel`` contexts shares one memory-mapped copy of the weights, so requests run at
once on their own threads (ctypes releases the GIL inside llama.cpp). Generation is pulled token
by token, so cancelling (client gone, timeout) stops it within one token.

GPU: with ``gpu_layers`` unset, every layer is offloaded when this llama.cpp build can offload
(a CUDA or Metal build); llama.cpp itself keeps layers on the CPU when no device is present.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from appliance.runtime.base import (
    DEFAULT_CONTEXT,
    FALLBACK_CHAT_TEMPLATE,
    ChatMessage,
    ContextLengthError,
    Generation,
    GenerationChunk,
    RuntimeSettings,
    SamplingParams,
    encode_prompt,
)
from signing.errors import ModelError


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp  # noqa: PLC0415 - an optional, heavy runtime
    except ImportError as exc:
        raise ModelError(
            f"the llama.cpp backend needs llama-cpp-python, which cannot be imported: {exc}"
        ) from None
    return llama_cpp


class GGUFChatTemplate:
    """The chat template a GGUF carries (or the fallback), rendered as llama.cpp does."""

    def __init__(self, llama: Any) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: PLC0415

        def text(token: int) -> str:
            return str(llama.detokenize([token]).decode("utf-8", "replace"))

        self._formatter = Jinja2ChatFormatter(
            template=llama.metadata.get("tokenizer.chat_template") or FALLBACK_CHAT_TEMPLATE,
            eos_token=text(llama.token_eos()),
            bos_token=text(llama.token_bos()),
        )

    def format(self, messages: Sequence[ChatMessage]) -> str:
        chat: Any = [{"role": m.role, "content": m.content} for m in messages]
        return str(self._formatter(messages=chat).prompt)


def longest_token_bytes(llama_cpp: Any, vocab: Any) -> int:
    """The most bytes of text that one token of ``vocab`` stands for.

    Special tokens count with their text: prompts are tokenized with ``special=True``, so
    ``<s>`` written in a prompt becomes that one token. One pass over the vocabulary at load
    (a few hundred thousand calls for the largest ones).
    """
    buffer = ctypes.create_string_buffer(256)
    longest = 1
    for token in range(int(llama_cpp.llama_vocab_n_tokens(vocab))):
        size = int(llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, True))
        longest = max(longest, abs(size))  # negative: the piece needs -size bytes
    return longest


def resolve_gpu_layers(settings: RuntimeSettings, llama_cpp: Any) -> int:
    if settings.gpu_layers is not None:
        return settings.gpu_layers
    return -1 if bool(llama_cpp.llama_supports_gpu_offload()) else 0


class LlamaCppBackend:
    """A pool of llama.cpp contexts over one model file."""

    def __init__(self, settings: RuntimeSettings) -> None:
        llama_cpp = _import_llama_cpp()
        self._settings = settings
        self.gpu_layers = resolve_gpu_layers(settings, llama_cpp)
        parallel = max(1, settings.parallel)
        threads = settings.threads or max(1, (os.cpu_count() or 1) // parallel)
        self._kwargs: dict[str, Any] = {
            "model_path": str(settings.model_path),
            "n_ctx": settings.context_size or DEFAULT_CONTEXT,
            "n_gpu_layers": self.gpu_layers,
            "n_threads": threads,
            "n_threads_batch": settings.threads or os.cpu_count() or 1,
            "verbose": False,
        }
        self._pool: queue.Queue[Any] = queue.Queue()
        try:
            first = llama_cpp.Llama(**self._kwargs)
            self._pool.put(first)
            for _ in range(parallel - 1):
                self._pool.put(llama_cpp.Llama(**self._kwargs))
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(f"llama.cpp cannot load {settings.model_path}: {exc}") from None
        self._context = int(first.n_ctx())
        self._token_bytes = longest_token_bytes(
            llama_cpp, llama_cpp.llama_model_get_vocab(first.model)
        )
        self._chat = GGUFChatTemplate(first)
        self._embedder: Any = None
        self._embed_lock = threading.Lock()
        self._llama_cpp = llama_cpp

    @property
    def model_id(self) -> str:
        return self._settings.model_id

    @property
    def context_size(self) -> int:
        return self._context

    @property
    def supports_embeddings(self) -> bool:
        return True

    def format_chat(self, messages: Sequence[ChatMessage]) -> str:
        return self._chat.format(messages)

    def count_tokens(self, text: str) -> int:
        data = self._encode(text)
        with self._context_from_pool() as llama:
            return len(llama.tokenize(data, add_bos=True, special=True))

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        data = self._encode(prompt)
        llama = self._pool.get()
        try:
            tokens = llama.tokenize(data, add_bos=True, special=True)
        except BaseException:
            self._pool.put(llama)
            raise
        if len(tokens) + (params.max_tokens or 1) > self._context:
            self._pool.put(llama)
            raise ContextLengthError(len(tokens), self._context)
        generation = Generation(prompt_tokens=len(tokens), chunks=iter(()))
        generation.chunks = self._run(llama, tokens, params, generation.cancel)
        return generation

    def _run(
        self, llama: Any, tokens: list[int], params: SamplingParams, cancel: threading.Event
    ) -> Iterator[GenerationChunk]:
        stream = llama.create_completion(
            tokens,
            max_tokens=params.max_tokens if params.max_tokens is not None else -1,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=list(params.stop) or None,
            seed=params.seed,
            repeat_penalty=params.repeat_penalty,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            stream=True,
        )
        count = 0
        try:
            for part in stream:
                if cancel.is_set():
                    return
                choice = part["choices"][0]
                text = choice["text"]
                finish = choice.get("finish_reason")
                if text:
                    count += 1
                if text or finish:
                    yield GenerationChunk(text=text, finish_reason=finish, completion_tokens=count)
        finally:
            stream.close()
            self._pool.put(llama)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        for text in texts:
            self._encode(text)
        with self._embed_lock:
            if self._embedder is None:
                self._embedder = self._llama_cpp.Llama(
                    **self._kwargs,
                    embedding=True,
                    pooling_type=self._llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                )
            result = self._embedder.embed(list(texts), normalize=True)
        return [list(map(float, vector)) for vector in result]

    def close(self) -> None:
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                break
        if self._embedder is not None:
            self._embedder.close()

    def _encode(self, text: str) -> bytes:
        return encode_prompt(text, context=self._context, token_bytes=self._token_bytes)

    @contextmanager
    def _context_from_pool(self) -> Iterator[Any]:
        llama = self._pool.get()
        try:
            yield llama
        finally:
            self._pool.put(llama)


def load_llamacpp(settings: RuntimeSettings) -> LlamaCppBackend:
    return LlamaCppBackend(settings)
