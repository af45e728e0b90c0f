"""The llama.cpp backend with continuous batching: one context, ``parallel`` sequences at once.

llama-cpp-python's own server serialises requests behind one lock; the pool backend
(:mod:`appliance.runtime.llamacpp`) runs ``parallel`` contexts side by side, each reading the
whole weight matrices for one token at a time. Here one llama.cpp context holds a KV cache of
``parallel`` sequences (one stream of ``context_size`` cells each), and a scheduler thread runs
the loop of llama.cpp's server and ``examples/parallel``: every step it

1. drops cancelled requests and frees their KV cells (``llama_memory_seq_rm``),
2. admits waiting requests into free sequence slots, first come first served,
3. builds one batch: the last sampled token of every generating sequence, then prompt tokens
   of admitted sequences up to ``n_batch`` in all (a long prompt spreads over several steps, so
   the streams already running keep flowing),
4. calls ``llama_decode`` once, so the weights are read once for every sequence in the batch,
5. samples each sequence's next token with its own sampler chain (so a seeded request gives
   the same tokens alone or beside others), turns it into text and hands out a chunk.

Text: each token's bytes go through an incremental UTF-8 decoder (a character split across
tokens comes out whole; bytes that are not UTF-8 come out as U+FFFD, never silently dropped),
and text that could be the start of a stop string is held back until it is known not to be.
Every sampled token is one chunk (its text may be empty while held back) and counts as one
completion token, an end-of-generation token included.

A cancelled request (``Generation.cancel``, or a consumer that closes its chunk iterator) loses
its slot at the next step; ``close()`` ends every stream in flight, then frees the context.

Sampling follows the OpenAI parameters: penalties over the generated tokens (as llama-cpp-python
does; the last 64), then temperature, then top-p, then a draw seeded per request; temperature 0
is greedy. There is no top-k or min-p step (llama-cpp-python adds top-k 40 and min-p 0.05 by
default), so sampled text differs from the pool backend's; greedy text is the same.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import logging
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

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
from appliance.runtime.llamacpp import (
    GGUFChatTemplate,
    _import_llama_cpp,
    longest_token_bytes,
    resolve_gpu_layers,
)
from appliance.runtime.memreport import LlamaAllocation, LlamaLogCapture, memory_line
from signing.errors import InputError, ModelError

log = logging.getLogger(__name__)

# Tokens per llama_decode call (generating tokens first, then prompt chunks).
BATCH_TOKENS = 512
# Penalties look at this many of the last generated tokens (llama-cpp-python's default).
PENALTY_LAST_N = 64
# The Llama object only loads the model and tokenizes; its own context stays unused, so it
# gets the smallest one llama.cpp makes (it pads every context to 256 cells).
_HOLDER_CONTEXT = 256
_HOLDER_BATCH = 32

# What the scheduler puts on a request's queue: chunks; then the last chunk (with a finish
# reason), a ModelError, or None (cancelled or closed: the stream ends with no finish reason).
_Item = GenerationChunk | ModelError | None


@dataclass(eq=False)
class _Request:
    tokens: list[int]
    params: SamplingParams
    cancel: threading.Event
    out: queue.SimpleQueue[_Item] = field(default_factory=queue.SimpleQueue)


class _TextStream:
    """Token bytes in, text out: whole UTF-8 characters, cut at the first stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded, not handed out: a stop string may start with it

    def feed(self, piece: bytes, *, final: bool = False) -> tuple[str, bool]:
        """The text that is ready, and whether a stop string was reached."""
        self._held += self._decoder.decode(piece, final=final)
        found = [i for i in (self._held.find(s) for s in self._stops) if i >= 0]
        if found:
            text, self._held = self._held[: min(found)], ""
            return text, True
        ready = len(self._held) if final else len(self._held) - self._stop_prefix_length()
        text, self._held = self._held[:ready], self._held[ready:]
        return text, False

    def _stop_prefix_length(self) -> int:
        """The length of the longest end of the held text that some stop string starts with."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._held)), longest, -1):
                if stop.startswith(self._held[-n:]):
                    longest = n
                    break
        return longest


@dataclass(eq=False)
class _Sequence:
    """A request in a sequence slot: its KV cells, its sampler chain, its progress."""

    slot: int
    request: _Request
    sampler: Any
    limit: int  # completion tokens allowed: max_tokens, and no more than the context holds
    text: _TextStream
    fed: int = 0  # prompt tokens decoded so far
    last: int = -1  # the sampled token that the next batch decodes
    generated: int = 0
    row: int = -1  # the batch row whose logits this sequence samples from, -1: none this step


class BatchedLlamaCppBackend:
    """One llama.cpp context, ``parallel`` sequences, one decode per step for all of them."""

    def __init__(self, settings: RuntimeSettings) -> None:
        llama_cpp = _import_llama_cpp()
        self._lib = llama_cpp
        self._settings = settings
        self.gpu_layers = resolve_gpu_layers(settings, llama_cpp)
        self._parallel = max(1, settings.parallel)
        if self._parallel > int(llama_cpp.llama_max_parallel_sequences()):
            raise ModelError(
                f"llama.cpp runs at most {llama_cpp.llama_max_parallel_sequences()} sequences "
                f"at once, not {self._parallel}"
            )
        requested = settings.context_size or DEFAULT_CONTEXT
        threads = settings.threads or os.cpu_count() or 1
        self._kwargs: dict[str, Any] = {
            "model_path": str(settings.model_path),
            "n_ctx": requested,
            "n_gpu_layers": self.gpu_layers,
            "n_threads": threads,
            "n_threads_batch": threads,
            "verbose": False,
        }
        # llama.cpp's accounting of what it allocates, for the log beside the signed estimate.
        memory_log = LlamaLogCapture(llama_cpp)
        try:
            with memory_log:
                self._llama = llama_cpp.Llama(
                    **self._kwargs
                    | {"n_ctx": _HOLDER_CONTEXT, "n_batch": _HOLDER_BATCH, "n_threads": 1}
                )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(f"llama.cpp cannot load {settings.model_path}: {exc}") from None
        self._model = self._llama.model
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._token_bytes = longest_token_bytes(llama_cpp, self._vocab)
        self._chat = GGUFChatTemplate(self._llama)
        self._n_batch = max(BATCH_TOKENS, self._parallel)
        with memory_log:
            self._ctx = self._new_context(requested, threads)
        self.memory_allocation: LlamaAllocation = memory_log.allocation(self._model)
        log.info(
            memory_line(
                settings.memory_estimate,
                self.memory_allocation,
                context_size=requested,
                parallel=self._parallel,
            )
        )
        self._context = min(requested, int(llama_cpp.llama_n_ctx_seq(self._ctx)))
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._pieces: dict[int, bytes] = {}
        self._piece_buffer = ctypes.create_string_buffer(64)
        self._embedder: Any = None
        self._embed_lock = threading.Lock()
        # Shared with generate() callers: the waiting requests and the closed flag.
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._closed = False
        self._failure: str | None = None  # why the scheduler stopped, if it failed
        self._tokenizing = 0  # generate() and count_tokens() calls using the tokenizer
        self._freed = False
        # The scheduler thread's own: sequences in slots, and the free slots.
        self._running: list[_Sequence] = []
        self._free = list(range(self._parallel - 1, -1, -1))
        self._thread = threading.Thread(target=self._schedule, name="llama.cpp-batch", daemon=True)
        self._thread.start()

    def _new_context(self, per_sequence: int, threads: int) -> Any:
        lib = self._lib
        params = lib.llama_context_default_params()
        params.n_ctx = per_sequence * self._parallel
        params.n_seq_max = self._parallel
        # One KV stream per sequence: attention reads only the sequence's own cells, and each
        # sequence has a context of its own size whatever the others use.
        params.kv_unified = False
        params.n_batch = self._n_batch
        params.n_ubatch = min(self._n_batch, BATCH_TOKENS)
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        ctx = lib.llama_init_from_model(self._model, params)
        if not ctx:
            self._llama.close()
            raise ModelError(
                f"llama.cpp cannot make a context of {self._parallel} x {per_sequence} tokens "
                f"for {self._settings.model_path}"
            )
        return ctx

    # -- the Backend interface -------------------------------------------------------------

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
        with self._model_in_use():
            return len(self._tokenize(data))

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        data = self._encode(prompt)
        with self._model_in_use():
            tokens = self._tokenize(data) or [int(self._llama.token_bos())]
        if tokens[0] < 0:
            raise InputError("the prompt is empty and this model has no BOS token to start from")
        if len(tokens) + (params.max_tokens or 1) > self._context:
            raise ContextLengthError(len(tokens), self._context)
        generation = Generation(prompt_tokens=len(tokens), chunks=iter(()))
        request = _Request(tokens, params, generation.cancel)
        with self._cond:
            self._raise_if_closed()
            self._waiting.append(request)
            self._cond.notify_all()
        generation.chunks = self._chunks(request)
        return generation

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        for text in texts:
            self._encode(text)
        # Embeddings need a context made for them (pooling, no causal LM head): a second Llama,
        # made on first use, as the pool backend does.
        with self._embed_lock:
            if self._embedder is None:
                self._embedder = self._lib.Llama(
                    **self._kwargs, embedding=True, pooling_type=self._lib.LLAMA_POOLING_TYPE_MEAN
                )
            result = self._embedder.embed(list(texts), normalize=True)
        return [list(map(float, vector)) for vector in result]

    def close(self) -> None:
        """Stop the scheduler (streams in flight end), then free the context and the model."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while self._tokenizing:
                self._cond.wait()
            freed, self._freed = self._freed, True
        self._thread.join()
        if freed:
            return
        self._lib.llama_batch_free(self._batch)
        self._lib.llama_free(self._ctx)
        self._llama.close()
        with self._embed_lock:
            if self._embedder is not None:
                self._embedder.close()
                self._embedder = None

    # -- callers' side ---------------------------------------------------------------------

    @contextmanager
    def _model_in_use(self) -> Iterator[None]:
        """Tokenize outside the lock, but never while close() frees the model."""
        with self._cond:
            self._raise_if_closed()
            self._tokenizing += 1
        try:
            yield
        finally:
            with self._cond:
                self._tokenizing -= 1
                self._cond.notify_all()

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise ModelError(self._failure or "the llama.cpp backend is closed")

    def _encode(self, text: str) -> bytes:
        return encode_prompt(text, context=self._context, token_bytes=self._token_bytes)

    def _tokenize(self, data: bytes) -> list[int]:
        return list(self._llama.tokenize(data, add_bos=True, special=True))

    @staticmethod
    def _chunks(request: _Request) -> Iterator[GenerationChunk]:
        try:
            while True:
                item = request.out.get()
                if item is None:
                    return
                if isinstance(item, ModelError):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            # The consumer is gone (or done): the scheduler frees the slot at its next step.
            request.cancel.set()

    # -- the scheduler thread --------------------------------------------------------------

    def _schedule(self) -> None:
        failure: str | None = None
        try:
            while self._admit():
                self._step()
        except Exception as exc:  # noqa: BLE001 - every stream in flight gets it
            failure = f"llama.cpp generation failed: {type(exc).__name__}: {exc}"
        with self._cond:
            self._closed = True
            self._failure = failure
            waiting = list(self._waiting)
            self._waiting.clear()
        for sequence in list(self._running):
            self._release(sequence, None if failure is None else ModelError(failure))
        for request in waiting:
            request.out.put(None if failure is None else ModelError(failure))

    def _admit(self) -> bool:
        """Drop cancelled requests, fill free slots; wait while there is nothing to do."""
        for sequence in [s for s in self._running if s.request.cancel.is_set()]:
            self._release(sequence, None)
        with self._cond:
            while not self._closed and not self._running and not self._waiting:
                self._cond.wait()
            if self._closed:
                return False
            for request in [r for r in self._waiting if r.cancel.is_set()]:
                self._waiting.remove(request)
                request.out.put(None)
            admitted: list[_Request] = []
            while self._waiting and len(admitted) < len(self._free):
                admitted.append(self._waiting.popleft())
        for request in admitted:
            params = request.params
            self._running.append(
                _Sequence(
                    slot=self._free.pop(),
                    request=request,
                    sampler=self._sampler(params),
                    limit=min(
                        params.max_tokens or self._context, self._context - len(request.tokens)
                    ),
                    text=_TextStream(params.stop),
                )
            )
        return True

    def _step(self) -> None:
        """One llama_decode for every running sequence, then one token for each that is due."""
        lib, batch = self._lib, self._batch
        rows = 0
        for sequence in self._running:
            sequence.row = -1
            if sequence.generated:
                position = sequence.fed + sequence.generated - 1
                self._put(rows, sequence.last, position, sequence.slot, logits=True)
                sequence.row = rows
                rows += 1
        for sequence in self._running:
            prompt = sequence.request.tokens
            while sequence.fed < len(prompt) and rows < self._n_batch:
                done = sequence.fed + 1 == len(prompt)
                self._put(rows, prompt[sequence.fed], sequence.fed, sequence.slot, logits=done)
                if done:
                    sequence.row = rows
                sequence.fed += 1
                rows += 1
        if rows == 0:
            return
        batch.n_tokens = rows
        status = int(lib.llama_decode(self._ctx, batch))
        if status != 0:
            for sequence in list(self._running):
                self._release(sequence, ModelError(f"llama.cpp decode failed (status {status})"))
            return
        for sequence in [s for s in self._running if s.row >= 0]:
            self._advance(sequence)

    def _put(self, row: int, token: int, position: int, slot: int, *, logits: bool) -> None:
        batch = self._batch
        batch.token[row] = token
        batch.pos[row] = position
        batch.n_seq_id[row] = 1
        batch.seq_id[row][0] = slot
        batch.logits[row] = logits

    def _advance(self, sequence: _Sequence) -> None:
        """Sample the sequence's next token and hand out its text; release it when done."""
        lib = self._lib
        token = int(lib.llama_sampler_sample(sequence.sampler, self._ctx, sequence.row))
        sequence.generated += 1
        sequence.last = token
        finish: FinishReason | None = None
        if lib.llama_vocab_is_eog(self._vocab, token):
            text, _ = sequence.text.feed(b"", final=True)
            finish = "stop"
        else:
            text, stopped = sequence.text.feed(self._piece(token))
            if stopped:
                finish = "stop"
            elif sequence.generated >= sequence.limit:
                rest, stopped = sequence.text.feed(b"", final=True)
                text += rest
                finish = "stop" if stopped else "length"
        chunk = GenerationChunk(text, finish, sequence.generated)
        if finish is None:
            sequence.request.out.put(chunk)
        else:
            self._release(sequence, chunk)

    def _release(self, sequence: _Sequence, last: _Item) -> None:
        """Free the sequence's KV cells, sampler and slot; ``last`` goes to its consumer."""
        self._lib.llama_memory_seq_rm(self._memory, sequence.slot, -1, -1)
        self._lib.llama_sampler_free(sequence.sampler)
        self._running.remove(sequence)
        self._free.append(sequence.slot)
        sequence.request.out.put(last)

    def _sampler(self, params: SamplingParams) -> Any:
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            lib.llama_sampler_chain_add(
                chain,
                lib.llama_sampler_init_penalties(
                    self._n_vocab,
                    PENALTY_LAST_N,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                ),
            )
        if params.temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(params.temperature))
        if params.top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
        seed = lib.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        return chain

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buffer = self._piece_buffer
            size = int(self._lib.llama_token_to_piece(self._vocab, token, buffer, 64, 0, False))
            if size < 0:
                buffer = ctypes.create_string_buffer(-size)
                size = int(
                    self._lib.llama_token_to_piece(self._vocab, token, buffer, -size, 0, False)
                )
            piece = self._pieces[token] = buffer.raw[:size]
        return piece


def load_llamacpp_batched(settings: RuntimeSettings) -> BatchedLlamaCppBackend:
    return BatchedLlamaCppBackend(settings)
