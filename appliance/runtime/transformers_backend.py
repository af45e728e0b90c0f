"""The transformers backend (Hugging Face transformers on PyTorch).

Offline: the hub's offline switches are set before transformers is imported and the model
directory is loaded with ``local_files_only=True``, so loading never touches the network. The
weights must be safetensors (``use_safetensors=True``: nothing is unpickled) and no code from
the model directory runs (``trust_remote_code=False``).

Concurrency: one lock serialises the model's compute (``model.generate`` and the embedding
forward pass), so requests queue for the model. PyTorch's random generator is process-global:
a seeded request is reproducible only if no other sampling runs beside it, and one model copy
per request would multiply the memory. The tokenizer is used outside the lock: it is always
called with the same (default) padding and truncation, so the Rust tokenizer is never mutated
after load and concurrent calls only read it.

Generation runs ``model.generate`` on a thread and streams text through a
``TextIteratorStreamer``; a stopping criterion checks the request's ``cancel`` event and the
stop strings after every token, so a cancelled request stops within one token.

GPU: ``cuda`` when PyTorch sees one, unless ``gpu_layers`` is 0 (the manifest's way of saying
CPU only). dtype ``auto`` is bfloat16 (float16 where bfloat16 is unsupported) on CUDA, float32
on the CPU. The weights are read into host memory and then moved to the device (loading
straight onto the device needs ``accelerate``). ``threads`` sets PyTorch's intra-op thread
count, which is process-wide.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance.runtime.base import (
    DEFAULT_CONTEXT,
    FALLBACK_CHAT_TEMPLATE,
    ChatMessage,
    ContextLengthError,
    FinishReason,
    Generation,
    GenerationChunk,
    RuntimeSettings,
    SamplingParams,
    encode_prompt,
)
from signing.bounded import one_line
from signing.errors import ModelError

# The hub reads these when it is imported: set them first, unless the operator chose otherwise.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
try:
    # This module is imported only when a slot's manifest names the transformers backend
    # (appliance.runtime.loader), so failing here is failing to load that model.
    import torch
    import transformers
except ImportError as exc:
    raise ModelError(
        f"the transformers backend needs torch and transformers, which cannot be imported: {exc}"
    ) from None

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_EMBED_BATCH = 16


def resolve_device(settings: RuntimeSettings) -> str:
    if settings.gpu_layers == 0:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(settings: RuntimeSettings, device: str) -> torch.dtype:
    name = (settings.dtype or "auto").lower()
    if name == "auto":
        if device == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in _DTYPES:
        raise ModelError(
            f"unknown dtype {settings.dtype!r} in the runtime settings; "
            f"use auto or one of {', '.join(sorted(_DTYPES))}"
        )
    return _DTYPES[name]


class TransformersBackend:
    """A causal language model and its tokenizer from one local directory."""

    def __init__(self, settings: RuntimeSettings) -> None:
        self._settings = settings
        self.device = resolve_device(settings)
        self.dtype = resolve_dtype(settings, self.device)
        if settings.threads:
            torch.set_num_threads(settings.threads)
        path = settings.model_path
        if not (path / "config.json").is_file():
            raise ModelError(
                f"transformers cannot load {path}: not a model directory (no config.json)"
            )
        try:
            self._tokenizer: Any = transformers.AutoTokenizer.from_pretrained(
                path, local_files_only=True, trust_remote_code=False
            )
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path,
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=True,
                dtype=self.dtype,
            )
            self._model: Any = model.to(self.device).eval()
        # transformers, the hub, safetensors and torch each raise their own exception types for
        # a bad directory (OSError, ValueError, KeyError, SafetensorError, RuntimeError...).
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"transformers cannot load {path}: {_one_line(exc)}") from None
        self._context = int(
            settings.context_size
            or getattr(self._model.config, "max_position_embeddings", None)
            or DEFAULT_CONTEXT
        )
        eos = self._model.generation_config.eos_token_id
        if eos is None:
            eos = self._tokenizer.eos_token_id
        self._eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        pad = self._model.generation_config.pad_token_id
        if pad is None:
            pad = self._tokenizer.pad_token_id
        self._pad_id: int = pad if pad is not None else min(self._eos_ids, default=0)
        # The one token of an empty text, for a tokenizer that adds no BOS.
        bos = self._tokenizer.bos_token_id
        self._filler: int = bos if bos is not None else min(self._eos_ids, default=self._pad_id)
        # Vocabulary strings are in the tokenizer's own alphabet (byte-level BPE writes a byte
        # as one character, SentencePiece a space as '\u2581'): a character of one stands for
        # at most one character of text, and a character is at most 4 bytes of UTF-8.
        self._token_bytes = 4 * max((len(t) for t in self._tokenizer.get_vocab()), default=1)
        self._lock = threading.Lock()

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
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        template = None if self._tokenizer.chat_template else FALLBACK_CHAT_TEMPLATE
        return str(
            self._tokenizer.apply_chat_template(
                conversation, chat_template=template, tokenize=False, add_generation_prompt=True
            )
        )

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        ids = self._encode(prompt)
        if len(ids) + (params.max_tokens or 1) > self._context:
            raise ContextLengthError(len(ids), self._context)
        # No max_tokens (or 0, as llama.cpp reads it): up to the end of the context.
        max_new = params.max_tokens or self._context - len(ids)
        generation = Generation(prompt_tokens=len(ids), chunks=iter(()))
        generation.chunks = self._stream(ids, max_new, params, generation.cancel)
        return generation

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Mean of the last hidden states over each text's tokens, L2-normalised."""
        encoded = [self._encode(text)[: self._context] for text in texts]
        vectors: list[list[float]] = []
        for start in range(0, len(encoded), _EMBED_BATCH):
            batch = encoded[start : start + _EMBED_BATCH]
            width = max(len(ids) for ids in batch)
            ids = torch.tensor(
                [x + [self._pad_id] * (width - len(x)) for x in batch], device=self.device
            )
            mask = torch.tensor(
                [[1] * len(x) + [0] * (width - len(x)) for x in batch], device=self.device
            )
            with self._lock, torch.inference_mode():
                if self._model is None:
                    raise ModelError("the model is closed")
                # The base model, not the LM head: the head would compute batch x length x
                # vocabulary logits, and only the hidden states are needed.
                output = self._model.base_model(input_ids=ids, attention_mask=mask)
                states = output.last_hidden_state.float()
                weights = mask.unsqueeze(-1).to(states.dtype)
                pooled = (states * weights).sum(dim=1) / weights.sum(dim=1)
                normalised = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
            vectors.extend(normalised.cpu().tolist())
        return vectors

    def close(self) -> None:
        """Free the model, once the generation in progress (if any) has ended."""
        with self._lock:
            self._model = None
        gc.collect()  # modules can hold reference cycles: free their tensors now
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _encode(self, text: str) -> list[int]:
        encode_prompt(text, context=self._context, token_bytes=self._token_bytes)
        # A prompt made by a chat template may already start with the BOS token: do not add a
        # second one.
        bos = self._tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        ids = list(self._tokenizer(text, add_special_tokens=add_special)["input_ids"])
        return ids or [self._filler]

    def _stream(
        self, ids: list[int], max_new: int, params: SamplingParams, cancel: threading.Event
    ) -> Iterator[GenerationChunk]:
        request = _Request(ids, max_new, params, cancel, _Streamer(self._tokenizer))
        worker = threading.Thread(
            target=self._generate, args=(request,), name="transformers-generate", daemon=True
        )
        worker.start()
        stops = tuple(s for s in params.stop if s)
        held = ""  # text not handed out yet, because a stop string may start with it
        try:
            while True:
                piece: _Piece = request.streamer.text_queue.get()
                if cancel.is_set():
                    return
                if isinstance(piece.error, ModelError):
                    raise piece.error
                if piece.error is not None:
                    raise ModelError(f"generation failed: {_one_line(piece.error)}")
                held += piece.text
                cut = _first_stop(held, stops)
                if cut is not None:
                    request.halt.set()
                    yield GenerationChunk(held[:cut], "stop", piece.tokens)
                    return
                if piece.end:
                    yield GenerationChunk(held, self._finish_reason(request), piece.tokens)
                    return
                ready = len(held) - _stop_prefix_length(held, stops)
                if ready > 0:
                    yield GenerationChunk(held[:ready], None, piece.tokens)
                    held = held[ready:]
        finally:
            request.halt.set()
            worker.join()

    def _finish_reason(self, request: _Request) -> FinishReason:
        streamer = request.streamer
        if streamer.tokens >= request.max_new and streamer.last_token not in self._eos_ids:
            return "length"
        return "stop"

    def _generate(self, request: _Request) -> None:
        """The generation thread: every way out of it puts a last piece in the streamer."""
        params = request.params
        try:
            with self._lock:
                if self._model is None:
                    request.streamer.fail(ModelError("the model is closed"))
                    return
                if request.cancel.is_set() or request.halt.is_set():
                    request.streamer.end()
                    return
                # Seeded here, under the lock, for this request alone; an unseeded request gets
                # fresh entropy rather than the state a seeded one left behind.
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                else:
                    torch.seed()
                input_ids = torch.tensor([request.ids], device=self.device)
                prompt_tokens = len(request.ids)
                penalties = [_PenaltyProcessor(prompt_tokens, params)]
                stop = _StopCriteria(self._tokenizer, prompt_tokens, request)
                with torch.inference_mode():
                    self._model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        max_new_tokens=request.max_new,
                        pad_token_id=self._pad_id,
                        streamer=request.streamer,
                        logits_processor=transformers.LogitsProcessorList(
                            penalties if params.presence_penalty or params.frequency_penalty else []
                        ),
                        stopping_criteria=transformers.StoppingCriteriaList([stop]),
                        **_sampling_options(params),
                    )
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises ModelError
            request.streamer.fail(exc)


def load_transformers(settings: RuntimeSettings) -> TransformersBackend:
    if settings.adapters:  # the manifest allows them for a GGUF model only; never ignore one
        raise ModelError("LoRA adapters are applied by the llama.cpp backend only")
    return TransformersBackend(settings)


def _sampling_options(params: SamplingParams) -> dict[str, Any]:
    options: dict[str, Any] = {"do_sample": params.temperature > 0}
    if params.temperature > 0:
        # top_k=0: OpenAI sampling has no top-k, and transformers would otherwise default to 50.
        options |= {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
    if params.repeat_penalty != 1.0:
        options["repetition_penalty"] = params.repeat_penalty
    return options


@dataclass(frozen=True)
class _Piece:
    """What the generation thread hands the consumer: new text and the running token count."""

    text: str
    tokens: int
    end: bool = False
    error: BaseException | None = None


@dataclass
class _Request:
    """One generation, shared by the consumer and the generation thread."""

    ids: list[int]
    max_new: int
    params: SamplingParams
    cancel: threading.Event  # set by the server: client gone, timeout
    streamer: _Streamer
    halt: threading.Event = field(default_factory=threading.Event)  # stop string, consumer gone


class _Streamer(transformers.TextIteratorStreamer):  # type: ignore[misc]
    """A TextIteratorStreamer whose queue carries the completion's token count with the text."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.tokens = 0
        self.last_token: int | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:
            new = value.reshape(-1).tolist()
            self.tokens += len(new)
            self.last_token = new[-1] if new else self.last_token
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text_queue.put(_Piece(text, self.tokens, end=stream_end))

    def fail(self, error: BaseException) -> None:
        self.text_queue.put(_Piece("", self.tokens, end=True, error=error))


class _StopCriteria(transformers.StoppingCriteria):  # type: ignore[misc]
    """Stop after the token that completes a stop string, or once cancelled or halted."""

    def __init__(self, tokenizer: Any, prompt_tokens: int, request: _Request) -> None:
        self._tokenizer = tokenizer
        self._prompt_tokens = prompt_tokens
        self._stops = tuple(s for s in request.params.stop if s)
        # A token is at least one byte and a character at most four: a stop string lies within
        # the last 4 * len(stop) tokens (plus one that may start mid-character).
        self._window = 4 * max((len(s) for s in self._stops), default=0) + 1
        self._cancel = request.cancel
        self._halt = request.halt

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = self._cancel.is_set() or self._halt.is_set()
        if not done and self._stops:
            start = max(self._prompt_tokens, input_ids.shape[1] - self._window)
            tail = self._tokenizer.decode(input_ids[0, start:].tolist(), skip_special_tokens=True)
            done = any(stop in tail for stop in self._stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _PenaltyProcessor(transformers.LogitsProcessor):  # type: ignore[misc]
    """OpenAI presence and frequency penalties, over the completion's tokens only."""

    def __init__(self, prompt_tokens: int, params: SamplingParams) -> None:
        self._prompt_tokens = prompt_tokens
        self._presence = params.presence_penalty
        self._frequency = params.frequency_penalty

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        completion = input_ids[:, self._prompt_tokens :]
        if completion.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(
            1, completion, torch.ones_like(completion, dtype=scores.dtype)
        )
        return scores - self._frequency * counts - self._presence * (counts > 0).to(scores.dtype)


def _one_line(exc: BaseException) -> str:
    text = one_line(exc, limit=300)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of ``text`` that some stop string starts with."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-n:]):
                longest = n
                break
    return longest
