"""appliance.runtime.cpuvariant on a runtime without CPU variants: nothing changes.

The variant choice itself needs a dispatch build and runs in tests/test_portable_runtime.py
(slow: it compiles llama-cpp-python once per machine).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.runtime import cpuvariant


def test_a_build_without_variants_is_left_as_it_is(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    if cpuvariant.find_runtime() is not None:
        pytest.skip("the installed llama-cpp-python is a dispatch build")
    memory = tmp_path / "cpu-variant.json"
    assert cpuvariant.prepare(model_path=tmp_path / "never-read.gguf", memory=memory) is None
    assert not memory.exists()


def test_the_cpu_key_is_stable_and_names_no_one() -> None:
    key = cpuvariant.cpu_key()
    assert key == cpuvariant.cpu_key()
    assert len(key) == 64  # a hash: the model name and flags are not written into the slot
