"""The memory table: what a GGUF model needs in memory, for a context size and a number of
parallel sequences, computed on the builder and signed into the manifest (format section 2.4,
``requires.memory_estimate``; docs/preflight.md, "How memory is estimated").

The model's shape comes from the GGUF itself, read with the ``gguf`` package: the tensors' data
sizes (the weights, as llama.cpp maps them), the layers, the key and value heads and their
dimensions (per layer where the file has arrays), the feed-forward width, the vocabulary and
whether the model has sliding-window layers.

The estimate follows llama.cpp's own accounting for the contexts that the served runtime
(appliance.runtime.llamacpp_batch) makes: a small context that only tokenizes
(``HOLDER_CONTEXT`` cells, batches of ``HOLDER_BATCH``, no flash attention, as llama-cpp-python
makes it) and the serving context (``parallel`` streams of ``context_size`` cells each, batches
of ``SERVE_BATCH``, flash attention "auto", which llama.cpp turns on where the device has it).
For each context, as llama.cpp computes it:

- cells: the context per sequence, padded to 256, times the sequences;
- KV cache: per layer, a row of keys and a row of values per cell, of the KV cache type; for
  sliding-window models the window layers get full-size caches too (llama.cpp's ``swa_full``,
  the default our runtime keeps: "llama_kv_cache_iswa: using full-size SWA cache");
- compute buffer: llama.cpp reserves the worst-case graph of one micro-batch and reuses memory
  between its nodes, so the buffer is the larger of two peaks: the logits (every token of the
  micro-batch over the vocabulary, in f32) or one layer (the attention masks, the attention
  scores when there is no flash attention, and the activations of the layer);
- output buffer: one row of logits per sequence.

The figures were checked against llama.cpp's log lines ("model buffer size", "KV buffer size",
"compute buffer size", "output buffer size") for the test models; tests/test_memtable.py keeps
the estimate within 10% of what llama.cpp allocates. What the table leaves out: a second copy
of weights that some CPUs' kernels repack (llama.cpp's AMX and CPU_REPACK buffers; the mapped
pages of those tensors then go unused), the embedding context made on the first embeddings
request, and per-token scratch of the CPU kernels; the overhead share covers the interpreter,
the server and such.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from builder.recipe import Recipe
from signing.errors import InputError
from signing.requirements import MemoryEstimate

MIB: Final = 1 << 20
# How appliance.runtime creates its contexts (tests/test_memtable.py keeps these equal to it).
DEFAULT_PARALLEL: Final = 4  # RuntimeSettings.parallel: sequences served at once
DEFAULT_CONTEXT: Final = 2048  # appliance.runtime.base.DEFAULT_CONTEXT
SERVE_BATCH: Final = 512  # llamacpp_batch.BATCH_TOKENS
HOLDER_CONTEXT: Final = 256  # llamacpp_batch._HOLDER_CONTEXT
HOLDER_BATCH: Final = 32
KV_TYPE: Final = "f16"  # llama.cpp's default, which the runtime keeps
OVERHEAD: Final = 512 * MIB  # the interpreter, the server, llama-cpp-python's own arrays
_CELL_PAD: Final = 256  # llama.cpp pads each sequence's cells to this
_F32: Final = 4
_F16: Final = 2


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of a model; ``kv_widths`` is per layer the width of
    one cell's keys plus values (0 for a layer without attention)."""

    architecture: str
    weights_bytes: int
    n_embd: int
    n_ff: int
    n_head: int
    n_vocab: int
    kv_widths: tuple[int, ...]
    attention_width: int  # the width of a layer's queries (n_head x key length)
    sliding_window: bool


@dataclass(frozen=True)
class ContextPlan:
    """A context as the runtime asks llama.cpp for it."""

    per_sequence: int
    sequences: int
    n_batch: int
    flash_attention: bool

    @property
    def ubatch(self) -> int:
        # llama.cpp: n_batch at most the (unpadded) context, n_ubatch at most n_batch.
        return min(self.n_batch, self.per_sequence * self.sequences)

    @property
    def cells_per_sequence(self) -> int:
        return -(-self.per_sequence // _CELL_PAD) * _CELL_PAD


def runtime_contexts(context_size: int, parallel: int) -> tuple[ContextPlan, ...]:
    """The contexts the served runtime makes (module docstring)."""
    return (
        ContextPlan(HOLDER_CONTEXT, 1, HOLDER_BATCH, flash_attention=False),
        ContextPlan(context_size, parallel, max(SERVE_BATCH, parallel), flash_attention=True),
    )


def read_model_shape(path: Path) -> ModelShape:
    """The shape of the GGUF model at ``path``; InputError if it is not one we can read."""
    try:
        import gguf  # noqa: PLC0415 - the 'model' extra; only llama.cpp bundles need it
    except ImportError:
        raise InputError(
            "the memory table needs the 'gguf' package: pip install 'airgap-appliance[model]'"
        ) from None
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path} as a GGUF file: {exc}") from None
    fields = reader.fields

    def value(key: str, default: Any = None) -> Any:
        field = fields.get(key)
        if field is None:
            if default is None:
                raise InputError(f"{path.name}: the GGUF has no {key}")
            return default
        return field.contents()

    arch = str(value("general.architecture"))
    n_layer = int(value(f"{arch}.block_count"))
    n_embd = int(value(f"{arch}.embedding_length"))
    heads = _per_layer(value(f"{arch}.attention.head_count"), n_layer)
    kv_heads = _per_layer(value(f"{arch}.attention.head_count_kv", heads), n_layer)
    n_head = max(heads)
    key_length = int(value(f"{arch}.attention.key_length", n_embd // max(1, n_head)))
    value_length = int(value(f"{arch}.attention.value_length", key_length))
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        n_vocab = len(tokens.data)
    else:
        n_vocab = next(int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight")
    return ModelShape(
        architecture=arch,
        weights_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        n_embd=n_embd,
        n_ff=max(_per_layer(value(f"{arch}.feed_forward_length", 4 * n_embd), n_layer)),
        n_head=n_head,
        n_vocab=n_vocab,
        kv_widths=tuple(n * (key_length + value_length) for n in kv_heads),
        attention_width=n_head * key_length,
        sliding_window=f"{arch}.attention.sliding_window" in fields,
    )


def estimate_memory(
    shape: ModelShape, *, context_size: int, parallel: int, kv_type: str = KV_TYPE
) -> MemoryEstimate:
    """The memory table of ``shape`` served with ``parallel`` sequences of ``context_size``."""
    plans = runtime_contexts(context_size, parallel)
    kv = sum(kv_cache_bytes(shape, plan, kv_type) for plan in plans)
    compute = sum(compute_bytes(shape, plan) for plan in plans)
    return MemoryEstimate(
        context_size=context_size,
        parallel=parallel,
        kv_type=kv_type,
        weights_bytes=shape.weights_bytes,
        kv_cache_bytes=kv,
        compute_bytes=compute,
        overhead_bytes=OVERHEAD,
        total_bytes=shape.weights_bytes + kv + compute + OVERHEAD,
    )


def kv_cache_bytes(shape: ModelShape, plan: ContextPlan, kv_type: str = KV_TYPE) -> int:
    """llama.cpp's KV buffers of one context: every layer's key and value rows, every cell."""
    block, block_bytes = _type_size(kv_type)
    cells = plan.cells_per_sequence * plan.sequences
    return sum(cells * (-(-width // block)) * block_bytes for width in shape.kv_widths)


def compute_bytes(shape: ModelShape, plan: ContextPlan) -> int:
    """llama.cpp's compute buffer (its worst-case graph) and output buffer of one context."""
    ubatch = plan.ubatch
    cells = plan.cells_per_sequence
    masks = 2 if shape.sliding_window else 1  # a window mask beside the full one
    if plan.flash_attention:
        attention = masks * cells * ubatch * _F16
    else:
        attention = masks * cells * ubatch * _F32 + cells * ubatch * shape.n_head * _F32
    width = max(shape.n_embd, shape.attention_width)
    layer = attention + ubatch * _F32 * (2 * width + 3 * shape.n_ff)
    logits = ubatch * _F32 * (shape.n_vocab + 2 * shape.n_embd)
    output = plan.sequences * shape.n_vocab * _F32
    return max(layer, logits) + output


def model_memory(
    recipe: Recipe, model_source: Path, *, say: Callable[[str], None] = lambda _: None
) -> MemoryEstimate | None:
    """The memory table of a recipe's model, for its context size and the runtime's default
    parallel sequences; None when the bundle is not a llama.cpp one with one GGUF file, or
    when that file cannot be read (said, not refused: the install's health check is what
    decides whether a model loads, and the host then gets the rough estimate)."""
    if recipe.runtime.backend != "llama.cpp":
        return None
    gguf_file = _gguf_file(model_source)
    if gguf_file is None:
        return None
    try:
        shape = read_model_shape(gguf_file)
    except InputError as exc:
        say(f"no memory table: {exc.diagnostics()}")
        return None
    return estimate_memory(
        shape,
        context_size=recipe.runtime.context_size or DEFAULT_CONTEXT,
        parallel=DEFAULT_PARALLEL,
    )


def _gguf_file(source: Path) -> Path | None:
    if source.is_file():
        return source if source.suffix == ".gguf" else None
    found = sorted(source.glob("*.gguf")) if source.is_dir() else []
    return found[0] if len(found) == 1 else None  # none, or split across files


def _per_layer(value: Any, n_layer: int) -> list[int]:
    """A per-layer hyperparameter: one number for all layers, or an array of one per layer."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n_layer:
            raise InputError(f"a per-layer GGUF array has {len(value)} items for {n_layer} layers")
        return [int(v) for v in value]
    return [int(value)] * n_layer


def _type_size(kv_type: str) -> tuple[int, int]:
    """Elements per block and bytes per block of a ggml type ("f16": 1 and 2)."""
    import gguf  # noqa: PLC0415 - read_model_shape has checked that it imports

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kv_type.upper()]]
    return int(block), int(size)
