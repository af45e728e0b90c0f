"""The memory table: what a GGUF model needs in memory, for a context size and a number of
parallel sequences, computed on the builder and signed into the manifest (format section 2.4,
``requires.memory_estimate``; docs/preflight.md, "How memory is estimated").

The model's shape comes from the GGUF itself, read with the ``gguf`` package: the tensors' data
sizes (the weights, as llama.cpp maps them), the layers, the key and value heads and their
dimensions (per layer where the file has arrays), the feed-forward width, the vocabulary and
which layers attend to a sliding window, and how wide it is.

The estimate follows llama.cpp's own accounting for the one context that the served engine
makes (appliance.runtime.llamaserver: a ``llama-server`` child started with ``--ctx-size`` of
``context_size x parallel`` and ``--parallel``, everything else at llama-server's defaults): a KV
cache of ``parallel`` streams (not unified), batches of ``SERVER_BATCH`` tokens computed in
micro-batches of ``SERVER_UBATCH``, flash attention "auto" (which llama.cpp turns on where the
device has it), sliding-window caches cut to the window, and one output per sequence. As
llama.cpp computes it:

- cells: the context (``context_size x parallel``) padded to 256, divided among the streams and
  each stream padded to 256 again; a sliding-window layer's stream holds the window plus one
  micro-batch, padded to 256, at most the stream's cells ("llama_kv_cache_iswa: creating SWA
  KV cache");
- KV cache: per layer, a row of keys and a row of values per cell, of the KV cache type;
- compute buffer: llama.cpp reserves the worst-case graph of one micro-batch and reuses memory
  between its nodes, so the buffer is the larger of two peaks: the outputs (one per sequence:
  its logits over the vocabulary in f32, beside the micro-batch's last hidden states) or one
  layer: the attention masks (f16 with flash attention, f32 scores beside them without) and the
  activations, where the feed-forward's tensors (up, gate and their product) sit above the
  holes that attention left (its projection and output), or in them when they fit; calibrated
  on llama.cpp's log for the tiny model, Gemma 3 270M and Qwen2.5 0.5B, to within 1%;
- output buffer: one row of logits per sequence.

tests/test_memtable.py keeps the estimate within 10% of what llama-server's log says it
allocates ("model buffer size", "KV buffer size", "compute buffer size", "output buffer size",
appliance.runtime.memreport). What the table leaves out: a second copy of weights that some CPUs'
kernels repack (llama.cpp's AMX and CPU_REPACK buffers; the mapped pages of those tensors then go
unused), the embeddings engine (a second ``llama-server`` with pooling, started by the first
embeddings request), the prompt cache and context checkpoints that llama-server keeps in host
memory as requests come and go, recurrent state of hybrid models, and per-token scratch of the
CPU kernels; the overhead share covers the serve process, llama-server's own heap and such.
Sliding-window layers are known for the architectures in ``_SWA_PATTERNS`` or from the GGUF's
``sliding_window_pattern``; elsewhere every layer is counted with a full cache (more, not less).
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
# How appliance.runtime starts the engine (tests/test_memtable.py keeps these equal to it and
# to llama-server's log).
DEFAULT_PARALLEL: Final = 4  # RuntimeSettings.parallel: sequences served at once
DEFAULT_CONTEXT: Final = 2048  # appliance.runtime.base.DEFAULT_CONTEXT
SERVER_BATCH: Final = 2048  # llama-server's default --batch-size (common_params.n_batch)
SERVER_UBATCH: Final = 512  # llama-server's default --ubatch-size (common_params.n_ubatch)
KV_TYPE: Final = "f16"  # llama.cpp's default, which the engine keeps
OVERHEAD: Final = 512 * MIB  # the serve process, llama-server's code, threads and heap
_CELL_PAD: Final = 256  # llama.cpp pads the context, each stream and each window to this
_F32: Final = 4
_F16: Final = 2
# Which layers slide, by architecture, where the GGUF does not say (llama.cpp's
# load_swa_pattern defaults): every n-th layer attends to the whole context, the last of each
# n (or the first, "dense first"), the others to the window.
_SWA_PATTERNS: Final[dict[str, tuple[int, bool]]] = {
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "gemma-embedding": (6, False),
    "cohere2": (4, False),
    "exaone4": (4, False),
    "olmo2": (4, False),
    "gpt-oss": (2, False),
    "llama4": (4, False),
    "smallthinker": (4, True),
}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of a model; ``kv_widths`` is per layer the width of
    one cell's keys plus values (0 for a layer without attention), ``window_layers`` per layer
    whether it attends to the last ``sliding_window`` tokens only (0: no layer does)."""

    architecture: str
    weights_bytes: int
    n_embd: int
    n_ff: int
    n_head: int
    n_vocab: int
    kv_widths: tuple[int, ...]
    attention_width: int  # the width of a layer's queries (n_head x key length)
    sliding_window: int = 0
    window_layers: tuple[bool, ...] = ()


@dataclass(frozen=True)
class ContextPlan:
    """The context llama-server makes for ``sequences`` streams of ``per_sequence`` tokens."""

    per_sequence: int
    sequences: int
    n_batch: int = SERVER_BATCH
    n_ubatch: int = SERVER_UBATCH
    flash_attention: bool = True

    @property
    def ubatch(self) -> int:
        # llama.cpp: n_batch at most the (unpadded) context, n_ubatch at most n_batch.
        return min(self.n_ubatch, self.n_batch, self.per_sequence * self.sequences)

    @property
    def outputs(self) -> int:
        """Rows of output a micro-batch may have: one per sequence (llama-server's limit)."""
        return min(self.ubatch, self.sequences)

    @property
    def cells_per_sequence(self) -> int:
        cells = _pad(self.per_sequence * self.sequences)
        return _pad(cells // self.sequences)

    def window_cells(self, window: int) -> int:
        """The cells of a stream of a sliding-window layer."""
        return _pad(min(self.cells_per_sequence, window + self.ubatch))


def server_context(context_size: int, parallel: int) -> ContextPlan:
    """The context the served engine makes (module docstring)."""
    return ContextPlan(context_size, parallel)


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
    window = int(value(f"{arch}.attention.sliding_window", 0))
    pattern = fields.get(f"{arch}.attention.sliding_window_pattern")
    window_layers = _window_layers(arch, n_layer, pattern) if window > 0 else ()
    return ModelShape(
        architecture=arch,
        weights_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        n_embd=n_embd,
        n_ff=max(_per_layer(value(f"{arch}.feed_forward_length", 4 * n_embd), n_layer)),
        n_head=n_head,
        n_vocab=n_vocab,
        kv_widths=tuple(n * (key_length + value_length) for n in kv_heads),
        attention_width=n_head * key_length,
        sliding_window=window,
        window_layers=window_layers,
    )


def estimate_memory(
    shape: ModelShape, *, context_size: int, parallel: int, kv_type: str = KV_TYPE
) -> MemoryEstimate:
    """The memory table of ``shape`` served with ``parallel`` sequences of ``context_size``."""
    plan = server_context(context_size, parallel)
    kv = kv_cache_bytes(shape, plan, kv_type)
    compute = compute_bytes(shape, plan)
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
    """llama.cpp's KV buffers: every layer's key and value rows, every cell of every stream."""
    block, block_bytes = _type_size(kv_type)
    total = 0
    for layer, width in enumerate(shape.kv_widths):
        cells = _layer_cells(shape, plan, layer) * plan.sequences
        total += cells * (-(-width // block)) * block_bytes
    return total


def compute_bytes(shape: ModelShape, plan: ContextPlan) -> int:
    """llama.cpp's compute buffer (its worst-case graph) and output buffer (module docstring)."""
    ubatch = plan.ubatch
    cells = plan.cells_per_sequence
    if shape.sliding_window and any(shape.window_layers):
        cells += plan.window_cells(shape.sliding_window)  # a window mask beside the full one
    if plan.flash_attention:
        attention = cells * ubatch * _F16
    else:
        attention = cells * ubatch * _F32 + plan.cells_per_sequence * ubatch * shape.n_head * _F32
    holes = shape.n_embd + shape.attention_width
    feed_forward = 3 * shape.n_ff + 2 * shape.n_embd
    activations = feed_forward if shape.n_ff <= holes else feed_forward + holes
    layer = attention + ubatch * _F32 * activations
    outputs = _F32 * (plan.outputs * (shape.n_vocab + shape.n_embd) + ubatch * shape.n_embd)
    output_buffer = plan.sequences * shape.n_vocab * _F32
    return max(layer, outputs) + output_buffer


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


def _layer_cells(shape: ModelShape, plan: ContextPlan, layer: int) -> int:
    slides = shape.sliding_window and layer < len(shape.window_layers)
    if slides and shape.window_layers[layer]:
        return plan.window_cells(shape.sliding_window)
    return plan.cells_per_sequence


def _window_layers(architecture: str, n_layer: int, pattern: Any) -> tuple[bool, ...]:
    """Which layers attend to the sliding window: the GGUF's ``sliding_window_pattern`` (one
    flag per layer, or n: every n-th layer attends to all), else the architecture's pattern in
    llama.cpp (``_SWA_PATTERNS``), else none (every layer gets a full cache)."""
    n, dense_first = _SWA_PATTERNS.get(architecture, (0, False))
    if pattern is not None:
        flags = pattern.contents()
        if isinstance(flags, Sequence) and not isinstance(flags, str):
            if len(flags) != n_layer:
                raise InputError(
                    f"sliding_window_pattern has {len(flags)} items for {n_layer} layers"
                )
            return tuple(bool(f) for f in flags)
        n = int(flags)
        if n == 0:  # llama.cpp: every layer slides
            return (True,) * n_layer
    if n <= 1:  # an architecture we do not know (or n = 1): none slides
        return (False,) * n_layer
    if dense_first:
        return tuple(layer % n != 0 for layer in range(n_layer))
    return tuple(layer % n < n - 1 for layer in range(n_layer))


def _pad(cells: int) -> int:
    return -(-cells // _CELL_PAD) * _CELL_PAD


def _type_size(kv_type: str) -> tuple[int, int]:
    """Elements per block and bytes per block of a ggml type ("f16": 1 and 2)."""
    import gguf  # noqa: PLC0415 - read_model_shape has checked that it imports

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kv_type.upper()]]
    return int(block), int(size)
