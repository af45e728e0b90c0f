"""appliance.runtime.cpuvariant on a runtime without CPU variants: nothing changes.

The variant choice itself needs a dispatch build and runs in tests/test_portable_runtime.py
(slow: it compiles llama-cpp-python once per machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from appliance.runtime import cpuvariant

REPO = Path(__file__).resolve().parent.parent


def test_a_build_without_variants_is_left_as_it_is(tmp_path: Path) -> None:
    """A build with one CPU backend linked in (a recipe's ``cpu_level``) ships no variants:
    nothing is chosen, probed or remembered. The venv's own build is a dispatch build, so the
    child imports a llama_cpp package laid out like such a build's: no ``libggml-cpu-*``."""
    site = tmp_path / "site"
    (site / "llama_cpp" / "lib").mkdir(parents=True)
    (site / "llama_cpp" / "__init__.py").write_text("")
    (site / "llama_cpp" / "lib" / "libggml.so").write_bytes(b"")
    memory = tmp_path / "cpu-variant.json"
    code = (
        "import sys; from pathlib import Path; from appliance.runtime import cpuvariant; "
        "assert cpuvariant.find_runtime() is None; "
        "print(cpuvariant.prepare(model_path=Path(sys.argv[1]), memory=Path(sys.argv[2])))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "never-read.gguf"), str(memory)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
    assert not memory.exists()


def test_the_cpu_key_is_stable_and_names_no_one() -> None:
    key = cpuvariant.cpu_key()
    assert key == cpuvariant.cpu_key()
    assert len(key) == 64  # a hash: the model name and flags are not written into the slot
