"""A portable llama.cpp runtime, built by the builder and run where CPUID lies (issue 10, item 1).

Real components end to end: llama-cpp-python compiled from its locked sdist through builder
code (runtime CPU dispatch; kept in the build cache, so a machine compiles it once per sdist),
a real signed bundle with the real Gemma 3 270M Q4_K_M GGUF, installed by the real installer,
whose health check (step I7) chooses the CPU variant by execution; then the tiny model under
an emulated CPU without AVX-512 (``qemu-x86_64 -cpu EPYC-Rome``).

On the machine this was written on, the native build dies on Gemma (SIGSEGV in ggml's AMX
kernels) and ggml's own CPUID choice (sapphirerapids) dies with SIGILL: the VM advertises AMX
but does not let a process use it. The tests assert the law, not the machine: every variant
ranked above the chosen one fails when run again, and ggml's own choice crashes when it was
refused.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import builder, ok
from portable_build import AVX512_VARIANTS, DEMO_LOCK, EMULATED, SLOT_RUNTIME, portable_wheel
from realmodel import gemma_gguf

from appliance.installer import Appliance, InstallOptions
from appliance.runtime.loader import health_check
from appliance.slots import SlotPaths
from builder.build import build_bundle
from builder.cache import sha256_file
from signing.errors import FetchError
from signing.keys import SigningKey
from signing.manifest import BundleManifest
from signing.metadata import BUNDLE_ROLE, ROOT_ROLE, Role, Root, sign_root

pytestmark = pytest.mark.slow

RECIPE = """[bundle]
name = "gemma"
version = "1.0.0"
[model]
path = "{model}"
[runtime]
backend = "llama.cpp"
context_size = 256
"""
# Run by the slot's interpreter: the runtime's variants, ranked here, or under a launcher.
RANK = """
import json, sys
from appliance.runtime import cpuvariant
runtime = cpuvariant.find_runtime()
launcher = json.loads(sys.argv[1])
print(json.dumps({"variants": sorted(runtime.variants),
                  "ranked": cpuvariant.rank(runtime, launcher=launcher)}))
"""
CHOOSE = """
import json, sys
from pathlib import Path
from appliance.runtime import cpuvariant
runtime = cpuvariant.find_runtime()
choice = cpuvariant.choose(runtime, model_path=Path(sys.argv[1]), memory=None,
                           launcher=json.loads(sys.argv[2]))
print(json.dumps({"variant": choice.variant, "refused": choice.refused}))
"""
GENERATE = """
import sys
from pathlib import Path
from appliance.runtime import cpuvariant
if sys.argv[1] == "ggml":  # ggml's own choice, by CPUID
    import ctypes, llama_cpp
    site = Path(llama_cpp.__file__).parent.parent
    ggml = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml.so.0"))
    ggml.ggml_backend_load_all_from_path(str(site / "bin").encode())
else:
    cpuvariant.load_backends([cpuvariant.find_runtime().variants[sys.argv[1]]])
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[2], n_ctx=256, n_gpu_layers=0, verbose=False)
out = llm.create_completion(sys.argv[3], max_tokens=int(sys.argv[4]) if len(sys.argv) > 4 else 8,
                             temperature=0.0)
print(out["choices"][0]["text"])
"""


class Installed:
    """The Gemma bundle, built with the portable runtime and installed on a host."""

    def __init__(self, base: Path) -> None:
        if sys.version_info[:2] != (3, 11):
            pytest.skip("the demo lock (lockfiles/pylock.llamacpp-cpu.toml) is for CPython 3.11")
        self.model = gemma_gguf()
        key = SigningKey.generate()
        root = Root(
            version=1,
            expires=datetime.now(UTC).replace(microsecond=0) + timedelta(days=30),
            keys={key.keyid: key.public_key},
            roles={
                ROOT_ROLE: Role(keyids=(key.keyid,), threshold=1),
                BUNDLE_ROLE: Role(keyids=(key.keyid,), threshold=1),
            },
        )
        recipe = base / "recipe.toml"
        recipe.write_text(RECIPE.format(model=self.model) + SLOT_RUNTIME.format(lock=DEMO_LOCK))
        self.bundle = base / "gemma.tar"
        started = time.monotonic()
        try:
            self.manifest = build_bundle(recipe, self.bundle, [key])
        except FetchError as exc:
            pytest.skip(f"the locked packages cannot be fetched here: {exc.diagnostics()}")
        self.build_s = time.monotonic() - started
        self.app = Appliance(base / "host")
        self.app.trust_init(sign_root(root, [key]).to_bytes(), fingerprint=None)
        started = time.monotonic()
        self.slot = self.app.install(str(self.bundle), InstallOptions())
        self.install_s = time.monotonic() - started
        self.paths = SlotPaths(self.slot.path)
        self.python = self.paths.env_python

    def run(self, code: str, *args: object, launcher: tuple[str, ...] = ()) -> Any:
        return subprocess.run(
            [*launcher, str(self.python), "-c", code, *map(str, args)],
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )

    def json(self, code: str, *args: object) -> Any:
        result = self.run(code, *args)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout.splitlines()[-1])

    def memory(self) -> dict[str, Any]:
        return json.loads(self.paths.cpu_variant.read_bytes())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    return Installed(tmp_path_factory.mktemp("portable"))


def test_the_builder_compiles_llama_cpp_for_any_x86_64_and_the_manifest_says_so(
    installed: Installed, tmp_path: Path
) -> None:
    manifest = BundleManifest.from_bytes(installed.paths.manifest.read_bytes())
    assert manifest.requires is not None and manifest.requires.cpu is not None
    assert manifest.requires.cpu.to_dict() == {"arch": "x86_64", "dispatch": True}
    ranked = installed.json(RANK, "[]")
    assert {"x64", "haswell", "skylakex", "sapphirerapids"} <= set(ranked["variants"])
    # The build cache: the same sdist and build settings give the cached wheel, no compile.
    started = time.monotonic()
    artifact, wheel = portable_wheel(tmp_path)
    assert time.monotonic() - started < 60
    assert artifact.cpu_build == "dispatch"
    shipped = installed.paths.payload / "env" / "wheels" / artifact.filename
    assert sha256_file(shipped) == artifact.sha256 == sha256_file(wheel)
    sbom = json.loads((installed.paths.payload / "sbom.cdx.json").read_bytes())
    llama = next(c for c in sbom["components"] if c.get("name") == "llama-cpp-python")
    props = {p["name"]: p["value"] for p in llama["properties"]}
    assert props["airgap-appliance:cpu-build"] == "dispatch"


def test_gemma_generates_through_the_bundle_runtime_with_the_variant_chosen_by_execution(
    installed: Installed,
) -> None:
    memory = installed.memory()
    chosen = memory["variant"]
    refused = [name for name, _ in memory["refused"]]
    ranked = installed.json(RANK, "[]")["ranked"]
    # The best ranked variant that runs was chosen; every one above it was refused, by a crash.
    assert ranked[: len(refused) + 1] == [*refused, chosen]
    for name, outcome in memory["refused"]:
        assert outcome.startswith(("killed by", "exit status", "no answer")), outcome
        again = installed.run(GENERATE, name, installed.model, "Hello")
        assert again.returncode != 0, f"{name} was refused at install, but runs now"
    if refused:  # ggml's own choice, by CPUID, is the first refused one: it crashes too
        assert installed.run(GENERATE, "ggml", installed.model, "Hello").returncode != 0
    text = installed.run(GENERATE, chosen, installed.model, "The capital of France is")
    assert text.returncode == 0, text.stderr[-2000:]
    assert text.stdout.strip()
    assert health_check(installed.slot.path).strip()  # the installed slot serves Gemma


def test_the_remembered_variant_is_reused_and_a_bad_memory_is_probed_again(
    installed: Installed,
) -> None:
    memory = installed.paths.cpu_variant
    before = (memory.read_bytes(), memory.stat().st_mtime_ns)
    health_check(installed.slot.path)
    assert (memory.read_bytes(), memory.stat().st_mtime_ns) == before  # reused, not rewritten
    good = installed.memory()

    memory.write_bytes(b"{not json")
    health_check(installed.slot.path)
    assert installed.memory() == good  # ignored, probed again, remembered again

    memory.write_text(json.dumps(good | {"cpu": "0" * 64}))  # another CPU's choice
    health_check(installed.slot.path)
    assert installed.memory() == good

    memory.write_text(json.dumps(good | {"sha256": "0" * 64}))  # another build's library
    health_check(installed.slot.path)
    assert installed.memory() == good


def test_the_tiny_model_generates_under_an_emulated_cpu_without_avx512(
    installed: Installed, tmp_path: Path
) -> None:
    if shutil.which(EMULATED[0]) is None:
        pytest.skip("qemu-user is not installed (scripts/setup.sh installs it as root)")
    tiny = tmp_path / "tiny.gguf"
    ok(builder("tiny-model", tiny, "--seed", "1"))
    # Chosen by running each candidate under the emulation (qemu-user does not follow the
    # children it starts, so the probe runs them under the same launcher).
    emulated = installed.json(CHOOSE, tiny, json.dumps(EMULATED))
    assert emulated["variant"] not in AVX512_VARIANTS
    result = installed.run(GENERATE, emulated["variant"], tiny, "Hello", launcher=EMULATED)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()
    # The emulation is real: this host's own choice, when it uses AVX-512, does not run under
    # it (ggml refuses to load a variant whose score is 0; one that loads dies with SIGILL).
    native = installed.memory()["variant"]
    if native in AVX512_VARIANTS:
        refused = installed.run(GENERATE, native, tiny, "Hello", launcher=EMULATED)
        assert refused.returncode != 0
        assert "cannot load its CPU backend" in refused.stderr or refused.returncode in (-4, 132)


def test_the_real_quantised_model_generates_under_an_emulated_cpu_without_avx512(
    installed: Installed,
) -> None:
    """Gemma's Q4_K_M kernels, not only the tiny model's F32 ones, on a CPU without AVX-512:
    the variant chosen by running Gemma itself under the emulation (about three minutes: qemu
    runs a few million instructions a second)."""
    if shutil.which(EMULATED[0]) is None:
        pytest.skip("qemu-user is not installed (scripts/setup.sh installs it as root)")
    emulated = installed.json(CHOOSE, installed.model, json.dumps(EMULATED))
    assert emulated["variant"] not in AVX512_VARIANTS
    result = installed.run(
        GENERATE, emulated["variant"], installed.model, "The capital of France is", 2,
        launcher=EMULATED,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()


SWAP = """
import sys
from pathlib import Path
from appliance.runtime import cpuvariant
from signing.errors import ModelError
for model in sys.argv[1:]:
    try:
        print(cpuvariant.prepare(model_path=Path(model), memory=None).variant)
    except ModelError as exc:
        print("refused:", exc)
"""


def test_one_process_keeps_its_first_cpu_variant_while_it_runs_the_next_model(
    installed: Installed, tmp_path: Path
) -> None:
    """A hot swap in one process (ggml's registry keeps the CPU backend loaded first): the
    loaded variant stays when it runs the new model, else the load is refused, naming the fix."""
    tiny = tmp_path / "tiny.gguf"
    ok(builder("tiny-model", tiny, "--seed", "1"))
    gemma_first = installed.run(SWAP, installed.model, tiny)
    assert gemma_first.returncode == 0, gemma_first.stderr[-2000:]
    first, second = gemma_first.stdout.split()
    assert first == second == installed.memory()["variant"]
    tiny_first = installed.run(SWAP, tiny, installed.model)
    assert tiny_first.returncode == 0, tiny_first.stderr[-2000:]
    lines = tiny_first.stdout.splitlines()
    if lines[0] in [name for name, _ in installed.memory()["refused"]]:  # runs tiny, not Gemma
        assert lines[1].startswith(f"refused: this process runs llama.cpp CPU variant {lines[0]}")
        assert "restart serve" in lines[1]
    else:
        assert lines[1] == lines[0]
