"""llama.cpp's own memory accounting, set beside the signed estimate in one log line.

llama.cpp says what it allocates only in its log: one line per buffer as a model loads and a
context is made ("load_tensors: CPU_Mapped model buffer size = 235.16 MiB", "llama_kv_cache:
CPU KV buffer size = 24.00 MiB", "sched_reserve: CPU compute buffer size = 20.77 MiB",
"llama_context: CPU output buffer size = 4.00 MiB"). The engine is a ``llama-server`` child
(appliance.runtime.llamaserver), whose log up to readiness is ``EngineProcess.startup_lines``;
:func:`parse_allocation` reads those lines and :func:`memory_line` sets them beside the estimate.

The weights are the loader's count of the model's tensor bytes ("print_info: file size =
235.16 MiB", "model size" in older llama.cpp; the same figure as ``llama_model_size``), which is
what the estimate counts too. The model buffers add up to more where some CPUs' kernels repack
tensors into a second copy beside the mapped file (CPU_REPACK, AMX): that excess is reported
apart, as ``repacked``, not as weights.

The lines are llama.cpp's accounting for the engine's context, read for a log line only: nothing
is decided from them, and a buffer llama.cpp stops printing shows as 0, not as an error. They are
logged at llama.cpp's INFO level, which ``llama-server`` prints from ``--log-verbosity 4`` on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from signing.requirements import MemoryEstimate, format_mib

MIB: Final = 1 << 20
GIB: Final = 1 << 30
MEMORY_PREFIX: Final = "memory: "  # how the line starts (the installer picks it from stderr)
_BUFFER_RE: Final = re.compile(
    r"(?P<where>\S+)\s+(?P<kind>model|KV|RS|compute|output) buffer size\s*=\s*"
    r"(?P<mib>[0-9]+(?:\.[0-9]+)?) MiB"
)
_WEIGHTS_RE: Final = re.compile(
    r"print_info: (?:file|model) size\s*=\s*(?P<size>[0-9]+(?:\.[0-9]+)?) (?P<unit>MiB|GiB)"
)
_CONTEXT_RE: Final = re.compile(r"llama_context: (?P<key>n_seq_max|n_ctx_seq)\s*=\s*(?P<n>[0-9]+)")
_ROUNDING: Final = 0.005  # the log prints sizes with two decimals


@dataclass(frozen=True)
class LlamaAllocation:
    """What llama.cpp allocated: the model's weights, the repacked copies beside them, the KV
    (and recurrent state) buffers, the compute and output buffers, for ``sequences`` streams
    of ``cells`` cells each (0 where the log does not say)."""

    weights_bytes: int
    repacked_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    sequences: int = 0
    cells: int = 0

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.compute_bytes


def parse_allocation(lines: Iterable[str]) -> LlamaAllocation | None:
    """The buffers in llama.cpp's log lines; None when the log shows none of them (the engine
    logged below llama.cpp's INFO level)."""
    text = "\n".join(lines)
    sizes = {"model": 0, "KV": 0, "RS": 0, "compute": 0, "output": 0}
    model_buffers = 0
    for match in _BUFFER_RE.finditer(text):
        sizes[match["kind"]] += round(float(match["mib"]) * MIB)
        model_buffers += match["kind"] == "model"
    if not any(sizes.values()):
        return None
    weights_line = _WEIGHTS_RE.search(text)
    if weights_line is None:  # no loader line: the model buffers are all there is
        weights, precision = sizes["model"], 0
    else:
        unit = MIB if weights_line["unit"] == "MiB" else GIB
        weights = round(float(weights_line["size"]) * unit)
        precision = round(_ROUNDING * (unit + model_buffers * MIB))
    # Beyond the rounding of the lines, what the model buffers hold over the weights is copies.
    repacked = sizes["model"] - weights
    context = {m["key"]: int(m["n"]) for m in _CONTEXT_RE.finditer(text)}
    return LlamaAllocation(
        weights_bytes=weights,
        repacked_bytes=repacked if repacked > max(precision, MIB) else 0,
        kv_cache_bytes=sizes["KV"] + sizes["RS"],
        compute_bytes=sizes["compute"] + sizes["output"],
        sequences=context.get("n_seq_max", 0),
        cells=context.get("n_ctx_seq", 0),
    )


def memory_line(lines: Iterable[str], estimate: MemoryEstimate | None) -> str:
    """ "memory: estimated X MiB (...) for P x C tokens; llama.cpp allocated Y MiB (...) for
    P x C tokens", from the engine's startup log ``lines`` and the signed ``estimate``."""
    if estimate is None:
        said = "no estimate in the manifest"
    else:
        said = (
            f"estimated {format_mib(estimate.allocated_bytes)} "
            f"({_parts(estimate.weights_bytes, estimate.kv_cache_bytes, estimate.compute_bytes)})"
            f" for {estimate.parallel} x {estimate.context_size} tokens"
        )
    allocated = parse_allocation(lines)
    if allocated is None:
        return f"{MEMORY_PREFIX}{said}; llama.cpp's log shows no buffer sizes"
    parts = _parts(allocated.weights_bytes, allocated.kv_cache_bytes, allocated.compute_bytes)
    if allocated.repacked_bytes:
        parts += f", repacked copies {format_mib(allocated.repacked_bytes)}"
    return (
        f"{MEMORY_PREFIX}{said}; llama.cpp allocated {format_mib(allocated.total_bytes)} "
        f"({parts}) for {allocated.sequences} x {allocated.cells} tokens"
    )


def _parts(weights: int, kv_cache: int, compute: int) -> str:
    return (
        f"weights {format_mib(weights)}, KV {format_mib(kv_cache)}, compute {format_mib(compute)}"
    )
