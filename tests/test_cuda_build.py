"""The CUDA build of llama.cpp, verified as far as a machine without a GPU allows (issue 10,
item 5).

Pure tests (always run): the flags the builder gives a CUDA build, the ``requires.gpu`` and SBOM
fields that record it, the preflight's verdicts on a host without a GPU, and a GPU backend that
does not load being skipped with a log line.

Real tests: the CUDA build of ``tests/recipes/demo-cuda-sm90.toml`` (bundles/demo-cuda.toml
for sm_90 only) compiled once through builder code (tests/cuda_build.py) and taken from the
build cache; signed bundles built from it by the real builder CLI; ``appliance preflight`` and
``install`` on this host. Compiling takes about half an hour on 2 cores, too long for a cold
CI machine, so these run only when the wheel is in the build cache already, or when
``AIRGAP_TEST_CUDA_BUILD=1`` asks to compile it (``python tests/cuda_build.py DIR`` compiles it
ahead). Tests that need a host without an NVIDIA GPU skip where the host has one.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import struct
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cuda_build import CUDA_HOME, CUDA_RECIPE, REPO, cached_cuda_wheel, cuda_wheel
from helpers_cli import (
    World,
    appliance,
    assert_error,
    build,
    builder,
    clean_env,
    get_world,
    ok,
)

from appliance import hostfacts
from appliance.preflight import NO_DRIVER, HostFacts, check
from appliance.runtime import cpuvariant
from builder.artifacts import Artifact
from builder.hostreqs import host_requirements
from builder.llamabuild import llama_build
from builder.recipe import load_recipe
from builder.sbom import make_sbom
from signing.errors import RecipeError
from signing.requirements import HostRequirements

GIB = 1 << 30
COMPILE_ENV = "AIRGAP_TEST_CUDA_BUILD"
NO_GPU = HostFacts(
    cpu_arch="x86_64",
    cpu_flags=frozenset({"sse4_2"}),
    memory_total_bytes=16 * GIB,
    memory_available_bytes=15 * GIB,
    disk_free_bytes=100 * GIB,
    disk_path="/var/lib/appliance",
    python="3.11",
    glibc="2.36",
    gpus=(),
    driver_version=None,
    cuda_driver_version=None,
    gpu_problem=f"{NO_DRIVER} (NVML Shared Library Not Found)",
)


def _cmake_defines(env: dict[str, str] | Any) -> dict[str, str]:
    words = shlex.split(env["CMAKE_ARGS"])
    return dict(w.removeprefix("-D").partition("=")[::2] for w in words if w.startswith("-D"))


def _built(cuda_version: str | None = "13.0") -> Artifact:
    return Artifact(
        name="llama-cpp-python",
        version="0.3.36",
        filename="llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl",
        url="https://files.example/llama_cpp_python-0.3.36.tar.gz",
        sha256="a" * 64,
        origin="built",
        source_sha256="b" * 64,
        cpu_build="dispatch",
        cuda_architectures="90",
        cuda_version=cuda_version,
    )


# -- pure: flags, manifest and SBOM fields, preflight verdicts, a backend that does not load -----


def test_the_test_recipe_is_the_demo_cuda_recipe_for_one_architecture() -> None:
    demo, _ = load_recipe(REPO / "bundles" / "demo-cuda.toml")
    test, _ = load_recipe(CUDA_RECIPE)
    assert test.requires.cuda_architectures == ["90"]
    assert test.requires.cpu_fallback is True
    assert test.environment is not None and demo.environment is not None
    assert (
        test.environment.lock_path(CUDA_RECIPE).resolve()
        == demo.environment.lock_path(REPO / "bundles" / "demo-cuda.toml").resolve()
    )
    assert test.environment.requirements == demo.environment.requirements
    demo_flags = _cmake_defines(llama_build(demo.environment.build_env, demo.requires).build_env)
    assert demo_flags["CMAKE_CUDA_ARCHITECTURES"] == "80;86;90"
    build = llama_build(test.environment.build_env, test.requires)
    flags = _cmake_defines(build.build_env)
    assert build.cpu == "dispatch" and build.cuda_architectures == ("90",)
    # the CUDA backend is a library of its own (GGML_BACKEND_DL), beside the CPU variants
    assert flags["GGML_CUDA"] == "on" and flags["GGML_BACKEND_DL"] == "ON"
    assert flags["CMAKE_CUDA_ARCHITECTURES"] == "90"
    assert flags["GGML_NATIVE"] == "OFF" and flags["GGML_CPU_ALL_VARIANTS"] == "ON"
    # the test build's shortcuts (docs/adr/0012); bundles/demo-cuda.toml keeps ggml's defaults
    assert flags["GGML_CUDA_FA"] == "OFF" and flags["GGML_CUDA_NO_VMM"] == "ON"
    assert "GGML_CUDA_FA" not in demo_flags


def test_cpu_fallback_needs_the_cuda_backend_as_a_library_of_its_own() -> None:
    test, _ = load_recipe(CUDA_RECIPE)
    assert test.environment is not None
    env = test.environment.build_env
    with pytest.raises(RecipeError, match="cpu_fallback needs a CUDA build with runtime CPU"):
        llama_build(env, test.requires.model_copy(update={"cpu_level": "x86-64-v3"}))
    linked = {"CMAKE_ARGS": env["CMAKE_ARGS"] + " -DGGML_BACKEND_DL=OFF"}
    with pytest.raises(RecipeError, match="cpu_fallback"):
        llama_build(linked, test.requires)
    no_fallback = test.requires.model_copy(update={"cpu_fallback": False, "cpu_level": "x86-64-v3"})
    assert llama_build(env, no_fallback).cpu == "x86-64-v3"  # a GPU-only build may link it


def test_the_manifest_and_the_sbom_record_the_architectures_and_the_cuda_version() -> None:
    recipe, _ = load_recipe(CUDA_RECIPE)
    requires = host_requirements(
        recipe, model_bytes=1 << 20, payload_bytes=1 << 20, artifacts=[_built("13.0")]
    )
    assert requires.gpu is not None
    assert requires.gpu.to_dict() == {
        "cuda_architectures": ["90"],
        "cuda_version": "13.0",  # the version the build recorded, not this builder's nvcc now
        "memory_bytes": requires.gpu.memory_bytes,
        "cpu_fallback": True,
    }
    assert HostRequirements.from_dict(requires.to_dict()) == requires
    sbom = json.loads(
        make_sbom(
            name="demo",
            version="1.0.0",
            created=datetime(2026, 1, 1, tzinfo=UTC),
            model_path="model/tiny.gguf",
            model_files=[],
            model_source=None,
            environment=("pip", "manylinux_2_28_x86_64", "3.11"),
            artifacts=[_built("13.0")],
            locks=[],
        )
    )
    llama = next(c for c in sbom["components"] if c["name"] == "llama-cpp-python")
    props = {p["name"]: p["value"] for p in llama["properties"]}
    assert props["airgap-appliance:cuda-architectures"] == "90"
    assert props["airgap-appliance:cuda-version"] == "13.0"
    assert props["airgap-appliance:cpu-build"] == "dispatch"


@pytest.mark.parametrize("fallback", [False, True])
def test_the_preflight_on_a_host_without_a_gpu(fallback: bool) -> None:
    recipe, _ = load_recipe(CUDA_RECIPE)
    recipe = recipe.model_copy(
        update={"requires": recipe.requires.model_copy(update={"cpu_fallback": fallback})}
    )
    requires = host_requirements(
        recipe, model_bytes=1 << 20, payload_bytes=1 << 20, artifacts=[_built()]
    )
    requires = replace(requires, python="3.11", glibc=None)
    gpu = {c.name: c for c in check(requires, NO_GPU)}["gpu"]
    assert gpu.ok is fallback
    assert gpu.found.startswith("no NVIDIA driver (NVML Shared Library Not Found)")
    assert "sm_90" in gpu.needed
    if fallback:
        assert gpu.found.endswith("the model runs on the CPU (the recipe allows it)")
    else:
        assert gpu.fix.startswith("install the NVIDIA driver and nvidia-ml-py")
        assert "cpu_fallback" in gpu.fix


class _Load:
    """ggml's ``ggml_backend_load`` as a fake: returns ``reg`` (0: the library did not load)."""

    argtypes: object = None
    restype: object = None

    def __init__(self, reg: int) -> None:
        self.reg = reg
        self.asked: list[bytes] = []

    def __call__(self, path: bytes) -> int:
        self.asked.append(path)
        return self.reg


class _Ggml:
    """The bindings' libggml as a fake: a loader, and backends with no device."""

    def __init__(self, reg: int) -> None:
        self.ggml_backend_load = _Load(reg)
        self.ggml_backend_reg_dev_count = _Load(0)


def test_a_gpu_backend_that_does_not_load_is_skipped_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ggml = _Ggml(reg=0)
    monkeypatch.setattr(cpuvariant, "_bindings_ggml", lambda: ggml)
    cuda = tmp_path / "libggml-cuda.so"
    cuda.write_bytes(b"\x7fELF not really")
    with caplog.at_level("WARNING", logger=cpuvariant.__name__):
        cpuvariant.load_backends([cuda])
    assert ggml.ggml_backend_load.asked == [os.fsencode(cuda)]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("llama.cpp backend libggml-cuda.so not loaded (")
    assert line.endswith("): the CPU runs the model")
    assert str(cuda) not in line  # the loader's reason, without the path again
    assert str(cuda) not in cpuvariant._LOADED


def test_a_gpu_backend_that_loads_without_a_device_is_logged(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ggml = _Ggml(reg=0x1000)  # the CUDA libraries are there, the driver is not
    monkeypatch.setattr(cpuvariant, "_bindings_ggml", lambda: ggml)
    monkeypatch.setattr(cpuvariant, "_LOADED", set())
    cuda = tmp_path / "libggml-cuda.so"
    with caplog.at_level("WARNING", logger=cpuvariant.__name__):
        cpuvariant.load_backends([cuda])
    assert ggml.ggml_backend_reg_dev_count.asked == [0x1000]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == (
        "llama.cpp backend libggml-cuda.so loaded, but finds no device: the CPU runs the model"
    )


# -- real: the compiled CUDA build ----------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Artifact, Path]:
    hit = cached_cuda_wheel()
    if hit is not None:
        return hit
    if os.environ.get(COMPILE_ENV) != "1":
        pytest.skip(
            "the CUDA build of llama-cpp-python is not in the build cache and compiling it "
            "takes about half an hour on 2 cores: run 'python tests/cuda_build.py DIR' or set "
            f"{COMPILE_ENV}=1"
        )
    if shutil.which("nvcc") is None and not (CUDA_HOME / "bin" / "nvcc").exists():
        pytest.skip(f"{COMPILE_ENV}=1, but there is no nvcc to compile the CUDA build with")
    return cuda_wheel(tmp_path_factory.mktemp("cuda-build"))


def _fatbin_archs(data: bytes) -> set[tuple[str, int]]:
    """("elf" or "ptx", sm) of every entry of the CUDA fat binaries in a shared library.

    A fat binary is a header (magic 0xBA55ED50, version, header size, size of the entries)
    followed by entries, each with its own header: kind (1 PTX, 2 ELF) at offset 0, its
    header size at 4, its payload size at 8, the architecture at 28."""
    found: set[tuple[str, int]] = set()
    at = data.find(b"\x50\xed\x55\xba")
    while at >= 0:
        _, header, size = struct.unpack_from("<HHQ", data, at + 4)
        entry, end = at + header, at + header + size
        while entry + 32 <= min(end, len(data)):
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            if kind in (1, 2):
                found.add(("ptx" if kind == 1 else "elf", arch))
            if entry_header == 0:
                break
            entry += entry_header + payload
        at = data.find(b"\x50\xed\x55\xba", at + 4)
    return found


def _cuobjdump() -> str | None:
    extras = os.environ.get("CUDA_EXTRAS", "")
    return shutil.which("cuobjdump") or shutil.which(
        "cuobjdump", path=os.pathsep.join([str(CUDA_HOME / "bin"), f"{extras}/bin"])
    )


def test_the_wheel_carries_a_loadable_cuda_backend_for_sm_90(
    cuda_build: tuple[Artifact, Path], tmp_path: Path
) -> None:
    artifact, wheel = cuda_build
    assert artifact.cpu_build == "dispatch"
    assert artifact.cuda_architectures == "90"
    assert artifact.cuda_version is not None
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        # beside the CPU variants (bin/, where the host loads it from) and a copy in the package
        cuda = [n for n in names if n.rsplit("/", 1)[-1] == "libggml-cuda.so"]
        assert "bin/libggml-cuda.so" in cuda, names
        variants = [n for n in names if "/libggml-cpu-" in n]
        assert len(variants) > 5  # the dispatch build's CPU variants beside it
        library = tmp_path / "libggml-cuda.so"
        library.write_bytes(whl.read("bin/libggml-cuda.so"))
    # a backend of its own (GGML_BACKEND_DL): ggml_backend_load finds its entry point
    symbols = subprocess.run(
        ["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True
    ).stdout
    assert " T ggml_backend_init\n" in symbols
    archs = _fatbin_archs(library.read_bytes())
    assert ("elf", 90) in archs, archs  # sm_90 machine code, and nothing for another GPU
    assert {arch for _, arch in archs} == {90}, archs
    if (tool := _cuobjdump()) is not None:
        listed = subprocess.run(
            [tool, "--list-elf", str(library)], capture_output=True, text=True, check=True
        ).stdout
        assert ".sm_90." in listed
        assert not [ln for ln in listed.splitlines() if ".sm_" in ln and ".sm_90." not in ln]


class CudaBundles:
    """Two signed bundles of the CUDA build, with and without CPU fallback, and a tiny model."""

    def __init__(self, world: World, base: Path) -> None:
        self.world = world
        model = base / "tiny.gguf"
        ok(builder("tiny-model", model, "--seed", "1"))
        text = CUDA_RECIPE.read_text()
        text = text.replace('"../../bundles/models/tiny.gguf"', json.dumps(str(model)))
        lock = REPO / "lockfiles" / "pylock.llamacpp-cuda.toml"
        text = text.replace('"../../lockfiles/pylock.llamacpp-cuda.toml"', json.dumps(str(lock)))
        self.bundles: dict[bool, Path] = {}
        for fallback in (True, False):
            recipe = base / f"fallback-{fallback}" / "recipe.toml"
            recipe.parent.mkdir()
            recipe.write_text(
                text.replace("cpu_fallback = true", f"cpu_fallback = {str(fallback).lower()}")
            )
            self.bundles[fallback] = base / f"demo-cuda-{fallback}.tar"
            build(recipe, self.bundles[fallback], world.signers, epoch=world.epoch)


@pytest.fixture(scope="module")
def bundles(
    cuda_build: tuple[Artifact, Path], tmp_path_factory: pytest.TempPathFactory
) -> CudaBundles:
    return CudaBundles(get_world(tmp_path_factory), tmp_path_factory.mktemp("cuda-bundles"))


@pytest.fixture
def gpu_less() -> Iterator[None]:
    facts = hostfacts.gather(Path("/"), with_gpu=True)
    if facts.gpus:
        pytest.skip("this host has an NVIDIA GPU: the GPU-less verdicts need a host without")
    yield


def _payload_json(bundle: Path, entry: str) -> Any:
    with tarfile.open(bundle) as tar:
        member = tar.extractfile(entry)
        assert member is not None
        return json.loads(member.read())


def test_the_bundle_records_the_architecture_and_cuda_version(
    bundles: CudaBundles, cuda_build: tuple[Artifact, Path]
) -> None:
    artifact, _ = cuda_build
    for fallback, bundle in bundles.bundles.items():
        manifest = _payload_json(bundle, "manifest.json")
        gpu = manifest["requires"]["gpu"]
        assert gpu["cuda_architectures"] == ["90"]
        assert gpu["cuda_version"] == artifact.cuda_version
        assert gpu["cpu_fallback"] is fallback
        assert manifest["requires"]["cpu"] == {"arch": "x86_64", "dispatch": True}
        sbom = _payload_json(bundle, "payload/sbom.cdx.json")
        llama = next(c for c in sbom["components"] if c["name"] == "llama-cpp-python")
        props = {p["name"]: p["value"] for p in llama["properties"]}
        assert props["airgap-appliance:cuda-architectures"] == "90"
        assert props["airgap-appliance:cuda-version"] == artifact.cuda_version


def test_preflight_and_install_refuse_it_without_a_gpu_when_the_recipe_needs_one(
    bundles: CudaBundles, gpu_less: None, tmp_path: Path
) -> None:
    host = bundles.world.new_host(tmp_path / "host")
    refused = appliance(host, "preflight", bundles.bundles[False])
    message = assert_error(refused, 11, "gpu: found no NVIDIA driver", "needs NVIDIA GPU (sm_90)")
    assert "install the NVIDIA driver and nvidia-ml-py" in message
    assert "cpu_fallback" in message
    before = sorted(p.relative_to(host) for p in host.rglob("*") if "audit" not in p.name)
    assert_error(appliance(host, "install", bundles.bundles[False]), 11, "no NVIDIA driver")
    after = sorted(p.relative_to(host) for p in host.rglob("*") if "audit" not in p.name)
    assert after == before  # refused at step I3, before any payload byte was written


def test_with_cpu_fallback_it_installs_and_runs_on_the_cpu(
    bundles: CudaBundles, gpu_less: None, tmp_path: Path
) -> None:
    host = bundles.world.new_host(tmp_path / "host")
    shown = ok(appliance(host, "preflight", bundles.bundles[True], "--json")).json()
    gpu = next(c for c in shown["checks"] if c["name"] == "gpu")
    assert shown["ok"] is True and gpu["ok"] is True
    assert gpu["found"].endswith("the model runs on the CPU (the recipe allows it)")
    env = clean_env()
    env.pop("APPLIANCE_SKIP_HEALTH_CHECK")  # the health check (step I7) runs the model
    installed = ok(appliance(host, "install", bundles.bundles[True], env=env, timeout=1800))
    # The CUDA backend did not serve, and install says why in one warning: it did not load
    # (no CUDA libraries), or it loaded and found no device (no driver).
    (warning,) = [ln for ln in installed.err.splitlines() if ln.startswith("warning: ")]
    assert warning.startswith("warning: health check: llama.cpp backend libggml-cuda.so "), warning
    assert warning.endswith(": the CPU runs the model"), warning
    slot = next((host / "slots").iterdir())
    assert json.loads((slot / "cpu-variant.json").read_bytes())["variant"]  # the CPU serves
    assert "health check" not in installed.out
