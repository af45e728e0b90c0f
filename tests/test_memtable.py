"""The memory table (builder.memtable) against what llama.cpp itself allocates.

llama.cpp's allocation is measured with llama.cpp: the served engine (a ``llama-server`` child,
appliance.runtime.llamaserver) loads the model and makes its context as it does in production,
and its accounting comes from the buffer lines of the child's startup log
(appliance.runtime.memreport), never from RSS. The estimate must be within 10% of it, for the
generated tiny model at several context and parallel settings, and for a real quantised model
(Gemma 3 270M Q4_K_M).
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.installer import InstallOptions
from appliance.provenance import describe_provenance
from appliance.runtime import base
from appliance.runtime.llamaengine import EngineProcess
from appliance.runtime.loader import health_check
from appliance.runtime.memreport import (
    MEMORY_PREFIX,
    memory_line,
    parse_allocation,
)
from builder import memtable
from builder.hostreqs import RUNTIME_VRAM, host_requirements
from builder.memtable import ModelShape, estimate_memory, read_model_shape, server_context
from builder.recipe import Recipe
from builder.tinymodel import write_tiny_llama
from signing.errors import FormatError, InputError
from signing.requirements import HostRequirements, MemoryEstimate

MIB = 1 << 20
TOLERANCE = 0.10
# Flags that would change the context llama-server makes from what memtable computes.
_CONTEXT_FLAGS = {
    "-b", "--batch-size", "-ub", "--ubatch-size", "-fa", "--flash-attn", "-kvu", "--kv-unified",
    "--swa-full", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v", "-nkvo", "--no-kv-offload",
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    write_tiny_llama(path)
    return path


def _settings(model: Path, *, context: int, parallel: int) -> base.RuntimeSettings:
    return base.RuntimeSettings(
        backend="llama.cpp",
        model_path=model,
        model_id="m",
        context_size=context,
        parallel=parallel,
        threads=1,
        gpu_layers=0,
    )


def _startup_lines(model: Path, *, context: int, parallel: int) -> list[str]:
    """The engine's log up to readiness, started as serve starts it."""
    pytest.importorskip("llama_cpp")
    engine = EngineProcess(_settings(model, context=context, parallel=parallel))
    try:
        engine.start()
        return list(engine.startup_lines)
    finally:
        engine.close()


def _context_said(lines: Sequence[str]) -> dict[str, str]:
    """llama.cpp's "llama_context: n_batch = 2048" lines, as a dict."""
    found = (re.search(r"llama_context: (\w+)\s+=\s+(\S+)$", line) for line in lines)
    return {m[1]: m[2] for m in found if m}


def _measured(model: Path, estimate: MemoryEstimate) -> list[str]:
    """The engine's log at the estimate's settings; the context llama.cpp says it made must be
    the one memtable computed for."""
    lines = _startup_lines(model, context=estimate.context_size, parallel=estimate.parallel)
    assert parse_allocation(lines) is not None, (
        "the engine's startup log has no buffer sizes: llama-server logs them at "
        "--log-verbosity 4 (llama.cpp's INFO), and startup_lines must reach 'model loaded'"
    )
    plan = server_context(estimate.context_size, estimate.parallel)
    said = _context_said(lines)
    made = {k: said.get(k) for k in ("n_batch", "n_ubatch", "kv_unified", "flash_attn")}
    assert made == {
        "n_batch": str(min(plan.n_batch, estimate.context_size * estimate.parallel)),
        "n_ubatch": str(plan.ubatch),
        "kv_unified": "false",
        "flash_attn": "auto",
    }
    return lines


def _assert_close(estimate: MemoryEstimate, lines: Sequence[str]) -> None:
    allocated = parse_allocation(lines)
    assert allocated is not None
    plan = server_context(estimate.context_size, estimate.parallel)
    assert (allocated.sequences, allocated.cells) == (plan.sequences, plan.cells_per_sequence)
    ratio = estimate.allocated_bytes / allocated.total_bytes
    assert abs(ratio - 1) <= TOLERANCE, memory_line(lines, estimate)
    # The weights are the same count (the tensors' bytes), printed to 0.01 MiB.
    assert abs(estimate.weights_bytes - allocated.weights_bytes) <= 0.005 * MIB
    assert allocated.kv_cache_bytes > 0
    assert allocated.compute_bytes > 0


@pytest.mark.parametrize(("context", "parallel"), [(256, 1), (2048, 4), (300, 3), (4096, 8)])
def test_tiny_model_estimate_is_within_10_percent(tiny: Path, context: int, parallel: int) -> None:
    estimate = estimate_memory(read_model_shape(tiny), context_size=context, parallel=parallel)
    _assert_close(estimate, _measured(tiny, estimate))


@pytest.mark.slow
def test_real_quantised_model_estimate_is_within_10_percent() -> None:
    """Gemma 3: quantised weights, one KV head of 256, sliding-window layers (five of every
    six; llama-server cuts their caches to the window) and a vocabulary of 262,144."""
    pytest.importorskip("gguf")
    from realmodel import gemma_gguf  # assembles 253 MB on first use

    model = gemma_gguf()
    shape = read_model_shape(model)
    assert (shape.architecture, shape.sliding_window, shape.n_vocab) == ("gemma3", 512, 262144)
    assert shape.kv_widths == (512,) * 18
    assert shape.window_layers == ((True,) * 5 + (False,)) * 3
    for context, parallel in [(512, 1), (2048, 4)]:
        estimate = estimate_memory(shape, context_size=context, parallel=parallel)
        _assert_close(estimate, _measured(model, estimate))


def test_the_line_sets_llama_cpp_beside_the_estimate(tiny: Path) -> None:
    estimate = estimate_memory(read_model_shape(tiny), context_size=512, parallel=2)
    line = memory_line(_startup_lines(tiny, context=512, parallel=2), estimate)
    assert line.startswith(f"memory: estimated {estimate.allocated_bytes / MIB:.1f} MiB")
    assert re.search(
        r"for 2 x 512 tokens; llama.cpp allocated [0-9.]+ MiB \(weights 0\.4 MiB, "
        r"KV 0\.5 MiB, compute [0-9.]+ MiB\) for 2 x 512 tokens$",
        line,
    ), line
    assert memory_line(["no buffers here"], None) == (
        "memory: no estimate in the manifest; llama.cpp's log shows no buffer sizes"
    )


def test_the_health_check_logs_the_memory_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The installer logs the line the health check's child prints (at 1 sequence)."""
    from tests.test_health import World  # skips without llama_cpp

    world = World(tmp_path)  # a signed bundle of the tiny model, context 128
    app = world.host(tmp_path / "host")
    slot = app.install(
        str(world.bundle("1.0.0", world.good_model)), InstallOptions(skip_health_check=True)
    )
    with caplog.at_level(logging.INFO, logger="appliance.runtime.loader"):
        health_check(slot.path)
    said = [r.getMessage() for r in caplog.records if MEMORY_PREFIX in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith("health check: memory: estimated ")
    assert "for 4 x 128 tokens; llama.cpp allocated " in said[0]
    assert said[0].endswith(" for 1 x 256 tokens")  # 128 cells, padded


def test_the_estimate_follows_the_engine(tiny: Path) -> None:
    """memtable mirrors how the engine is started; the builder cannot import it. (The batch
    sizes are llama-server's defaults: _measured checks them against its log.)"""
    runtime_default = base.RuntimeSettings.__dataclass_fields__["parallel"].default
    assert runtime_default == memtable.DEFAULT_PARALLEL
    assert memtable.DEFAULT_CONTEXT == base.DEFAULT_CONTEXT
    pytest.importorskip("llama_cpp")
    engine = EngineProcess(_settings(tiny, context=1000, parallel=3))
    try:
        command = engine.command(Path("llama-server"))
    finally:
        engine.close()
    flags = dict(itertools.pairwise(command))
    assert (flags["--ctx-size"], flags["--parallel"]) == ("3000", "3")
    assert not _CONTEXT_FLAGS & set(command)


def test_layers_without_attention_have_no_kv_cache() -> None:
    shape = ModelShape(
        architecture="x", weights_bytes=0, n_embd=64, n_ff=128, n_head=4, n_vocab=100,
        kv_widths=(128, 0), attention_width=64,
    )  # fmt: skip
    one = estimate_memory(shape, context_size=256, parallel=1)
    both = estimate_memory(replace(shape, kv_widths=(128, 128)), context_size=256, parallel=1)
    assert both.kv_cache_bytes == 2 * one.kv_cache_bytes
    # 256 cells, keys and values of 128 f16 values per cell
    assert one.kv_cache_bytes == 256 * 128 * 2
    q8 = estimate_memory(shape, context_size=256, parallel=1, kv_type="q8_0")
    assert q8.kv_cache_bytes == 256 * (128 // 32) * 34


def test_sliding_window_layers_keep_the_window_and_a_micro_batch() -> None:
    full = ModelShape(
        architecture="x", weights_bytes=0, n_embd=64, n_ff=128, n_head=4, n_vocab=100,
        kv_widths=(128, 128), attention_width=64,
    )  # fmt: skip
    sliding = replace(full, sliding_window=300, window_layers=(True, False))
    plan = server_context(4096, 2)
    assert (plan.cells_per_sequence, plan.ubatch, plan.window_cells(300)) == (4096, 512, 1024)
    row = 128 * 2  # bytes of one cell's keys and values
    assert memtable.kv_cache_bytes(full, plan) == 2 * (2 * 4096 * row)
    assert memtable.kv_cache_bytes(sliding, plan) == 2 * 4096 * row + 2 * 1024 * row
    # A window wider than the context: the whole stream.
    assert server_context(512, 1).window_cells(4096) == 512


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
    """llama-server's lines (timestamped), Gemma's on a CPU that repacks some tensors."""
    lines = [
        "0.00.423.071 I print_info: file size   = 235.16 MiB (7.36 BPW)",
        "0.00.604.718 I load_tensors:   CPU_Mapped model buffer size =   235.16 MiB",
        "0.00.604.736 I load_tensors:   CPU_REPACK model buffer size =    12.66 MiB",
        "0.00.617.056 I llama_context: n_seq_max             = 4",
        "0.00.617.057 I llama_context: n_ctx_seq             = 2048",
        "0.00.617.476 I llama_context:        CPU  output buffer size =     4.00 MiB",
        "0.00.617.642 I llama_kv_cache:        CPU KV buffer size =    24.00 MiB",
        "0.00.626.606 I llama_kv_cache: size =   24.00 MiB (  2048 cells,   3 layers,  4/4 seqs)",
        "0.00.626.719 I llama_kv_cache:        CPU KV buffer size =    60.00 MiB",
        "0.00.650.927 I sched_reserve:        CPU compute buffer size =    20.77 MiB",
    ]
    got = parse_allocation(lines)
    assert got is not None
    assert got.weights_bytes == round(235.16 * MIB)
    assert round(got.repacked_bytes / MIB, 2) == 12.66
    assert got.kv_cache_bytes == 84 * MIB
    assert got.compute_bytes == round(24.77 * MIB)
    assert (got.sequences, got.cells) == (4, 2048)
    assert got.total_bytes == round(235.16 * MIB) + 84 * MIB + round(24.77 * MIB)
    assert parse_allocation(lines[3:5]) is None  # below INFO, llama.cpp says none of it


def test_weights_in_gib_are_not_mistaken_for_copies() -> None:
    """Above 1 GiB the loader prints GiB with two decimals: up to 5 MiB of rounding."""
    got = parse_allocation(
        [
            "print_info: file size   = 4.58 GiB (4.89 BPW)",
            "load_tensors:        CUDA0 model buffer size =  4403.49 MiB",
            "load_tensors:   CPU_Mapped model buffer size =   281.81 MiB",
            "llama_kv_cache:      CUDA0 KV buffer size =  1024.00 MiB",
        ]
    )
    assert got is not None
    assert (got.weights_bytes, got.repacked_bytes) == (round(4.58 * (1 << 30)), 0)
    older = parse_allocation(["print_info: model size = 0.44 MiB", "x model buffer size = 1 MiB"])
    assert older is not None
    assert older.weights_bytes == round(0.44 * MIB)


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
