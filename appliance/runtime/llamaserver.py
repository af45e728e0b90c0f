"""llama.cpp's own server as the engine of a served slot: the model behind the REST layer.

:class:`LlamaServerBackend` starts the slot's ``llama-server`` (appliance.runtime.llamaengine)
and is the served model: the REST layer relays the OpenAI and Ollama routes to it
(appliance.server.relay), and its :class:`~appliance.runtime.base.Backend` methods serve the
install health check. Serving through llama-server brings what llama.cpp maintains family by
family: chat templates, tool-call parsers, grammars and JSON schemas, reasoning output split into
``reasoning_content``, and its batch scheduler (docs/adr/0014).

Before the engine starts, the GGUF header says whether the model carries a chat template (a
family's published one is given where it does not: appliance.runtime.chattemplates); while it
loads, the vocabulary alone is read for the prompt byte bound (base.encode_prompt).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Final

import httpx

from appliance.runtime.base import (
    DEFAULT_CONTEXT,
    ChatMessage,
    ContextLengthError,
    FinishReason,
    Generation,
    GenerationChunk,
    RuntimeSettings,
    SamplingParams,
    encode_prompt,
)
from appliance.runtime.chattemplates import fallback_template
from appliance.runtime.llamaengine import SERVER_NAME, EngineProcess
from appliance.runtime.memreport import memory_line
from signing.errors import InputError, ModelError

LOG: Final = logging.getLogger(__name__)


class LlamaServerBackend:
    """The served llama.cpp model: a supervised ``llama-server`` (:class:`EngineProcess`).

    The REST layer relays the OpenAI routes to it (appliance.server.relay); :meth:`generate`
    and :meth:`embed` are the same engine through the :class:`~appliance.runtime.base.Backend`
    interface, for the install health check and the in-process callers.
    """

    relay = True  # the REST layer passes requests through (appliance.server.relay)

    def __init__(self, settings: RuntimeSettings) -> None:
        self.settings = settings
        architecture, has_template = _gguf_facts(settings.model_path)
        template = None if has_template else fallback_template(architecture)
        if not has_template:
            LOG.warning(
                "%s has no chat template: %s",
                settings.model_path.name,
                f"{architecture}'s format is used"
                if template
                else "llama-server's default (ChatML) is used, which this model may not know",
            )
        self.engine = EngineProcess(settings, chat_template=template)
        # The vocabulary (a second for the largest) loads while the engine does.
        scan: Future[int] = Future()
        threading.Thread(
            target=_settle, args=(scan, _token_bytes, settings.model_path), daemon=True
        ).start()
        self.engine.start()
        try:
            LOG.info("%s", memory_line(self.engine.startup_lines, settings.memory_estimate))
            served = self.engine.props.get("default_generation_settings", {})
            self._context = int(served.get("n_ctx") or settings.context_size or DEFAULT_CONTEXT)
            self._token_bytes = scan.result()
        except BaseException:
            self.engine.close()  # never a child without an owner
            raise
        self._embedder: EngineProcess | None = None
        self._embed_lock = threading.Lock()
        self._async: dict[int, httpx.AsyncClient] = {}

    def async_http(self) -> httpx.AsyncClient:
        """A pooled client to the engine for the running event loop (the relay's)."""
        import asyncio  # noqa: PLC0415

        loop = id(asyncio.get_running_loop())
        client = self._async.get(loop)
        if client is None:
            client = self._async[loop] = self.engine.async_client()
        return client

    @property
    def model_id(self) -> str:
        return self.settings.model_id

    @property
    def context_size(self) -> int:
        return self._context

    @property
    def token_bytes(self) -> int:
        return self._token_bytes

    @property
    def supports_embeddings(self) -> bool:
        return True

    @property
    def ready(self) -> bool:
        return self.engine.ready

    def check_prompt_bytes(self, size: int) -> None:
        """Refuse, untokenized, a prompt of ``size`` bytes that cannot fit (base.encode_prompt)."""
        limit = self._context * self._token_bytes
        if size > limit:
            from appliance.runtime.base import PromptTooLongError  # noqa: PLC0415

            raise PromptTooLongError(size, context=self._context, token_bytes=self._token_bytes)

    def format_chat(self, messages: Sequence[ChatMessage]) -> str:
        chat = [{"role": m.role, "content": m.content} for m in messages]
        with self.engine.client() as http:
            response = http.post("/apply-template", json={"messages": chat})
        _raise_for_engine(response)
        return str(response.json()["prompt"])

    def count_tokens(self, text: str) -> int:
        data = encode_prompt(text, context=self._context, token_bytes=self._token_bytes)
        with self.engine.client() as http:
            response = http.post(
                "/tokenize", json={"content": data.decode("utf-8"), "add_special": True}
            )
        _raise_for_engine(response)
        count = len(response.json()["tokens"])
        if count > self._context:
            raise ContextLengthError(count, self._context)
        return count

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        encode_prompt(prompt, context=self._context, token_bytes=self._token_bytes)
        body: dict[str, Any] = {
            "prompt": prompt,
            "stream": True,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stop": list(params.stop),
            "repeat_penalty": params.repeat_penalty,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "n_predict": -1 if params.max_tokens is None else params.max_tokens,
            "return_tokens": False,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        http = self.engine.client(timeout=None)
        stream = http.stream("POST", "/completion", json=body)
        response = stream.__enter__()
        if response.status_code != 200:
            response.read()
            stream.__exit__(None, None, None)
            http.close()
            _raise_for_engine(response)
        events = _sse_json(response.iter_lines())
        first = next(events, None)
        if first is None:
            stream.__exit__(None, None, None)
            http.close()
            raise ModelError(f"{SERVER_NAME} ended the stream before the first token")
        generation = Generation(prompt_tokens=0, chunks=iter(()))
        generation.prompt_tokens = int(first.get("tokens_evaluated") or 0)

        def chunks() -> Iterator[GenerationChunk]:
            count = 0
            try:
                event: dict[str, Any] | None = first
                while event is not None:
                    if generation.cancel.is_set():
                        return
                    text = str(event.get("content", ""))
                    if text:
                        count += 1
                    if event.get("stop"):
                        predicted = int(event.get("tokens_predicted") or count)
                        generation.prompt_tokens = int(
                            event.get("tokens_evaluated") or generation.prompt_tokens
                        )
                        reason: FinishReason = (
                            "length" if event.get("stop_type") == "limit" else "stop"
                        )
                        yield GenerationChunk(text, reason, predicted)
                        return
                    yield GenerationChunk(text, None, count)
                    event = next(events, None)
            finally:
                stream.__exit__(None, None, None)
                http.close()

        generation.chunks = chunks()
        return generation

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        for text in texts:
            encode_prompt(text, context=self._context, token_bytes=self._token_bytes)
        embedder = self.embedder()
        with embedder.client(timeout=None) as http:
            response = http.post("/v1/embeddings", json={"input": list(texts)})
        _raise_for_engine(response)
        data = response.json()["data"]
        return [list(map(float, item["embedding"])) for item in data]

    def embedder(self) -> EngineProcess:
        """The embedding engine (a second child with pooling), started on first use."""
        with self._embed_lock:
            if self._embedder is None:
                embedder = EngineProcess(self.settings, embeddings=True)
                embedder.start()
                self._embedder = embedder
            return self._embedder

    def close(self) -> None:
        self.engine.close()
        with self._embed_lock:
            if self._embedder is not None:
                self._embedder.close()
                self._embedder = None


def _settle(future: Future[Any], fn: Any, *args: Any) -> None:
    try:
        future.set_result(fn(*args))
    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
        future.set_exception(exc)


def _sse_json(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line.startswith("data: "):
            payload = line[6:].strip()
            if payload == "[DONE]":
                return
            yield json.loads(payload)


def engine_error(status: int, body: bytes) -> tuple[str, str]:
    """(type, message) of an error answer of llama-server (``{"error": {...}}``)."""
    try:
        error = json.loads(body)["error"]
        return str(error.get("type", "server_error")), str(error.get("message", ""))[:1000]
    except (ValueError, KeyError, TypeError):
        return "server_error", f"status {status}: {body[:200]!r}"


def _raise_for_engine(response: httpx.Response) -> None:
    if response.status_code == 200:
        return
    kind, message = engine_error(response.status_code, response.read())
    if kind == "exceed_context_size_error":
        raise InputError(message)
    if response.status_code == 400:
        raise InputError(message)
    raise ModelError(f"{SERVER_NAME} answered {response.status_code}: {message}")


class _GGUFInitParams(ctypes.Structure):
    _fields_ = (("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p))


def _gguf_facts(model: Path) -> tuple[str, bool]:
    """The model's architecture and whether it carries a chat template, from its GGUF header
    alone (ggml's own reader, no vocabulary built): what the engine's command needs, known in
    milliseconds, so that the engine starts while the vocabulary loads."""
    llama_cpp = _bindings()
    base = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    base.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GGUFInitParams]
    base.gguf_init_from_file.restype = ctypes.c_void_p
    base.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    base.gguf_find_key.restype = ctypes.c_int64
    base.gguf_get_val_str.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    base.gguf_get_val_str.restype = ctypes.c_char_p
    base.gguf_free.argtypes = [ctypes.c_void_p]
    gguf = base.gguf_init_from_file(os.fsencode(model), _GGUFInitParams(True, None))
    if not gguf:
        raise ModelError(f"llama.cpp cannot read {model.name} as a GGUF file")
    try:
        key = base.gguf_find_key(gguf, b"general.architecture")
        value = base.gguf_get_val_str(gguf, key) if key >= 0 else None
        architecture = value.decode("utf-8", "replace") if value else ""
        return architecture, base.gguf_find_key(gguf, b"tokenizer.chat_template") >= 0
    finally:
        base.gguf_free(gguf)


def _bindings() -> Any:
    try:
        import llama_cpp  # noqa: PLC0415 - the bindings beside the server
    except ImportError as exc:
        raise ModelError(f"llama-cpp-python cannot be imported: {exc}") from None
    if not _QUIET:  # llama.cpp's loader would print its lines into serve's log
        _QUIET.append(llama_cpp.llama_log_callback(lambda _level, _text, _data: None))
        llama_cpp.llama_log_set(_QUIET[0], ctypes.c_void_p())
    return llama_cpp


_QUIET: list[Any] = []  # the no-op log callback, kept alive as long as llama.cpp may call it


class _Vocabulary:
    """A model's vocabulary, loaded alone (llama.cpp reads no weights for it and needs no
    backend); :meth:`close` frees it."""

    def __init__(self, model: Path) -> None:
        llama_cpp = _bindings()
        self._lib = llama_cpp
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = llama_cpp.llama_model_load_from_file(str(model).encode(), params)
        if not self._model:
            raise ModelError(f"llama.cpp cannot read the vocabulary of {model.name}")

    def longest_token_bytes(self) -> int:
        """The most bytes of text one token stands for (base.encode_prompt's bound). Special
        tokens count with their text: the engine parses them in prompts, so ``<s>`` written in
        a prompt is that one token. One pass (a few hundred thousand calls for the largest)."""
        lib = self._lib
        vocab = lib.llama_model_get_vocab(self._model)
        buffer = ctypes.create_string_buffer(256)
        longest = 1
        for token in range(int(lib.llama_vocab_n_tokens(vocab))):
            size = lib.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, True)
            longest = max(longest, abs(int(size)))  # negative: the piece needs -size bytes
        return longest

    def close(self) -> None:
        if self._model:
            self._lib.llama_model_free(self._model)
            self._model = None


def _token_bytes(model: Path) -> int:
    vocabulary = _Vocabulary(model)
    try:
        return vocabulary.longest_token_bytes()
    finally:
        vocabulary.close()


def load_llama_server(settings: RuntimeSettings) -> LlamaServerBackend:
    return LlamaServerBackend(settings)


__all__ = ["LlamaServerBackend", "engine_error", "load_llama_server"]
