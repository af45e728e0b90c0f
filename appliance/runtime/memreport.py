"""llama.cpp's own memory accounting, set beside the signed estimate in one log line.

llama.cpp says what it allocates only in its log: one line per buffer as a model loads and a
context is made ("load_tensors: CPU_Mapped model buffer size = 235.16 MiB", "llama_kv_cache:
CPU KV buffer size = 24.00 MiB", "sched_reserve: CPU compute buffer size = 514.50 MiB",
"llama_context: CPU output buffer size = 4.00 MiB"); its C API has no call that returns them
(``llama_get_memory_breakdown`` is C++ only). So :class:`LlamaLogCapture` listens to the log
while the runtime loads, passing every message on to the callback that was there before
(llama-cpp-python's own), and :func:`parse_allocation` reads the buffer lines. The weights come
from ``llama_model_size`` (the API's count of the model's tensor bytes): the model buffers also
count a second copy of the weights that some CPUs' kernels repack (AMX, CPU_REPACK), which is
reported apart, as ``repacked``.

The lines are llama.cpp's accounting for this process's contexts, read for a log line only:
nothing is decided from them, and a line llama.cpp stops printing shows as 0, not as an error.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from typing import Any, Final, Self

from signing.requirements import MemoryEstimate, format_mib

MIB: Final = 1 << 20
MEMORY_PREFIX: Final = "memory: "  # how the line starts (the installer picks it from stderr)
_BUFFER_RE: Final = re.compile(
    r"(?P<where>\S+)\s+(?P<kind>model|KV|RS|compute|output) buffer size\s*=\s*"
    r"(?P<mib>[0-9]+(?:\.[0-9]+)?) MiB"
)


@dataclass(frozen=True)
class LlamaAllocation:
    """What llama.cpp allocated: the model's weights, the repacked copies beside them, the KV
    (and recurrent state) buffers, and the compute and output buffers."""

    weights_bytes: int
    repacked_bytes: int
    kv_cache_bytes: int
    compute_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.compute_bytes


def parse_allocation(log_text: str, *, weights_bytes: int) -> LlamaAllocation:
    """The buffers in llama.cpp's log text; ``weights_bytes`` is ``llama_model_size``."""
    sizes = {"model": 0, "KV": 0, "RS": 0, "compute": 0, "output": 0}
    for match in _BUFFER_RE.finditer(log_text):
        sizes[match["kind"]] += round(float(match["mib"]) * MIB)
    # The log rounds to 0.01 MiB; less than a MiB over the weights is that rounding.
    repacked = sizes["model"] - weights_bytes
    return LlamaAllocation(
        weights_bytes=weights_bytes,
        repacked_bytes=repacked if repacked >= MIB else 0,
        kv_cache_bytes=sizes["KV"] + sizes["RS"],
        compute_bytes=sizes["compute"] + sizes["output"],
    )


def memory_line(
    estimate: MemoryEstimate | None,
    allocated: LlamaAllocation,
    *,
    context_size: int,
    parallel: int,
) -> str:
    """ "memory: estimated X MiB (...) for P x C tokens; llama.cpp allocated Y MiB (...)"."""
    if estimate is None:
        said = "no estimate in the manifest"
    else:
        said = (
            f"estimated {format_mib(estimate.allocated_bytes)} "
            f"({_parts(estimate.weights_bytes, estimate.kv_cache_bytes, estimate.compute_bytes)})"
            f" for {estimate.parallel} x {estimate.context_size} tokens"
        )
    parts = _parts(allocated.weights_bytes, allocated.kv_cache_bytes, allocated.compute_bytes)
    if allocated.repacked_bytes:
        parts += f", repacked copies {format_mib(allocated.repacked_bytes)}"
    return (
        f"{MEMORY_PREFIX}{said}; llama.cpp allocated {format_mib(allocated.total_bytes)} "
        f"({parts}) for {parallel} x {context_size} tokens"
    )


def _parts(weights: int, kv_cache: int, compute: int) -> str:
    return (
        f"weights {format_mib(weights)}, KV {format_mib(kv_cache)}, compute {format_mib(compute)}"
    )


class LlamaLogCapture:
    """Collects llama.cpp's log while in a ``with`` block; the callback that was set before
    gets every message too, and is set again on the way out."""

    def __init__(self, llama_cpp: Any) -> None:
        self._lib = llama_cpp
        self._pieces: list[bytes] = []
        self._previous: Any = None
        self._user_data = ctypes.c_void_p()
        self._callback = llama_cpp.llama_log_callback(self._on_message)

    def __enter__(self) -> Self:
        lib = self._lib
        previous = lib.llama_log_callback()
        lib.llama_log_get(ctypes.byref(previous), ctypes.byref(self._user_data))
        self._previous = previous if previous else None
        lib.llama_log_set(self._callback, self._user_data)
        return self

    def __exit__(self, *_: object) -> None:
        self._lib.llama_log_set(self._previous, self._user_data)

    @property
    def text(self) -> str:
        return b"".join(self._pieces).decode("utf-8", "replace")

    def allocation(self, model: Any) -> LlamaAllocation:
        """llama.cpp's accounting so far, for the loaded ``model``."""
        weights = int(self._lib.llama_model_size(model))
        return parse_allocation(self.text, weights_bytes=weights)

    def _on_message(self, level: int, text: bytes | None, user_data: Any) -> None:
        if text:
            self._pieces.append(text)
        if self._previous is not None:
            self._previous(level, text, user_data)
