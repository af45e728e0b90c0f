"""The builder compiles llama.cpp for the target (builder.llamabuild), says so in the manifest
(builder.hostreqs, signing.requirements), and keeps what it compiled (builder.sdist's cache).

Fast: the flags are a pure function; the cache and the flags' way into a real build are shown
with small real sdists built by pip (the real llama-cpp-python compile is in
tests/test_portable_runtime.py).
"""

from __future__ import annotations

import json
import shlex
import sys
import zipfile
from pathlib import Path

import pytest
from pipenv_helpers import pip_env
from pkgfactory import make_sdist

from builder.artifacts import Artifact
from builder.cache import Cache, sha256_file
from builder.hostreqs import host_requirements
from builder.llamabuild import llama_build, uses_llama_cpp_cmake
from builder.recipe import Recipe, RequiresSection
from builder.sdist import build_key, build_wheels
from signing.errors import ArtifactError, FormatError, RecipeError
from signing.requirements import (
    CpuRequirement,
    HostRequirements,
    parse_cpu_flags,
    x86_64_level,
)

PY = f"{sys.version_info.major}.{sys.version_info.minor}"
# llama-server and the tools beside the bindings (docs/adr/0014), in every llama.cpp build.
SERVER = [
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_TOOLS_INSTALL=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
]
DISPATCH = ["-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON", *SERVER]
SETUP_PY = """\
import os
from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def run(self):
        super().run()
        with open(os.path.join(self.build_lib, "ggmlpkg", "cmake_args.txt"), "w") as out:
            out.write(os.environ.get("CMAKE_ARGS", "unset"))


setup(cmdclass={"build_py": BuildPy})
"""


def args(build_env: dict[str, str], **requires: object) -> list[str]:
    return shlex.split(llama_build(build_env, RequiresSection(**requires)).build_env["CMAKE_ARGS"])


def test_the_default_is_runtime_cpu_dispatch_with_no_native_flags() -> None:
    build = llama_build({}, RequiresSection())
    assert shlex.split(build.build_env["CMAKE_ARGS"]) == DISPATCH
    assert build.cpu == "dispatch"


@pytest.mark.parametrize(
    ("level", "on", "off"),
    [
        ("x86-64-v2", {"GGML_SSE42"}, {"GGML_AVX", "GGML_AVX2", "GGML_AVX512"}),
        ("x86-64-v3", {"GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C"}, {"GGML_AVX512"}),
        ("x86-64-v4", {"GGML_AVX2", "GGML_AVX512"}, {"GGML_AVX512_VBMI", "GGML_AMX_INT8"}),
    ],
)
def test_an_explicit_level_builds_one_backend_with_exactly_its_instructions(
    level: str, on: set[str], off: set[str]
) -> None:
    build = llama_build({}, RequiresSection(cpu_level=level))  # type: ignore[arg-type]
    flags = dict(a.removeprefix("-D").split("=") for a in args({}, cpu_level=level))
    assert build.cpu == level
    assert flags["GGML_NATIVE"] == flags["GGML_BACKEND_DL"] == "OFF"
    assert all(flags[f] == "ON" for f in on) and all(flags[f] == "OFF" for f in off)
    assert flags["GGML_AMX_TILE"] == "OFF"


def test_the_recipe_wins_where_it_sets_the_same_flag() -> None:
    mixed = args({"CMAKE_ARGS": "-DGGML_BLAS=ON -DGGML_BACKEND_DL:BOOL=ON -G Ninja"})
    assert mixed == [*DISPATCH, "-DGGML_BLAS=ON", "-G", "Ninja"]
    native = llama_build({"CMAKE_ARGS": "-DGGML_NATIVE=ON", "X": "1"}, RequiresSection())
    assert native.cpu == "native"  # asked for: recorded as the builder's level
    assert native.build_env["X"] == "1"
    one_variant = llama_build({"CMAKE_ARGS": "-DGGML_CPU_ALL_VARIANTS=OFF"}, RequiresSection())
    assert one_variant.cpu == "native"  # ggml's default instructions: we cannot vouch for less


def test_a_cuda_build_takes_its_architectures_from_the_recipe() -> None:
    cuda = {"CMAKE_ARGS": "-DGGML_CUDA=on"}
    with pytest.raises(RecipeError, match=r"needs requires\.cuda_architectures"):
        llama_build(cuda, RequiresSection())
    build = llama_build(cuda, RequiresSection(cuda_architectures=["80", "86"], cuda_version="12.4"))
    assert "-DCMAKE_CUDA_ARCHITECTURES=80;86" in shlex.split(build.build_env["CMAKE_ARGS"])
    assert build.cuda_architectures == ("80", "86")
    clash = {"CMAKE_ARGS": "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=native"}
    with pytest.raises(RecipeError, match="name them once, in \\[requires\\]"):
        llama_build(clash, RequiresSection(cuda_architectures=["90"], cuda_version="12.4"))


def test_llama_cpp_sdists_are_known_by_name_or_by_ggml_cmake(tmp_path: Path) -> None:
    assert uses_llama_cpp_cmake("Llama_CPP.Python", tmp_path / "not-read.tar.gz")
    ggml = make_sdist(tmp_path, "ggmlpkg", "1.0", files={"vendor/ggml/CMakeLists.txt": "x"})
    assert uses_llama_cpp_cmake("ggmlpkg", ggml)
    assert not uses_llama_cpp_cmake("gamma", make_sdist(tmp_path, "gamma", "1.0"))


def _recipe(**requires: object) -> Recipe:
    return Recipe.model_validate(
        {
            "bundle": {"name": "demo", "version": "1.0.0"},
            "model": {"path": "m.gguf"},
            "runtime": {"backend": "llama.cpp"},
            "requires": requires,
            "environment": {
                "type": "pip",
                "platform": "manylinux_2_28_x86_64",
                "python": "3.11",
                "requirements": ["llama-cpp-python"],
            },
        }
    )


def _built(cpu_build: str | None) -> Artifact:
    return Artifact(
        "llama-cpp-python",
        "0.3.36",
        "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl",
        "https://x.invalid/llama_cpp_python-0.3.36.tar.gz",
        "a" * 64,
        origin="built",
        source_sha256="b" * 64,
        cpu_build=cpu_build,
    )


def test_the_manifest_states_what_the_build_needs_not_the_builders_cpu() -> None:
    def cpu(recipe: Recipe, artifact: Artifact) -> CpuRequirement | None:
        return host_requirements(recipe, model_bytes=1, payload_bytes=1, artifacts=[artifact]).cpu

    assert cpu(_recipe(), _built("dispatch")) == CpuRequirement(arch="x86_64", dispatch=True)
    level = cpu(_recipe(cpu_level="x86-64-v2"), _built("x86-64-v2"))
    assert level == CpuRequirement(arch="x86_64", level="x86-64-v2")
    # A native build, or a compiled sdist whose build we do not know: this builder's level.
    builders = x86_64_level(parse_cpu_flags(Path("/proc/cpuinfo").read_text()))
    assert cpu(_recipe(), _built("native")) == CpuRequirement(arch="x86_64", level=builders)
    assert cpu(_recipe(), _built(None)) == CpuRequirement(arch="x86_64", level=builders)


def test_dispatch_in_the_signed_requirements_is_canonical() -> None:
    requires = HostRequirements(memory_bytes=1, disk_bytes=2, cpu=CpuRequirement("x86_64", None))
    assert "dispatch" not in json.dumps(requires.to_dict())
    cpu = {"arch": "x86_64", "dispatch": True}
    assert CpuRequirement.from_dict(cpu) == CpuRequirement("x86_64", dispatch=True)
    assert CpuRequirement.from_dict(cpu).to_dict() == cpu
    for bad in (False, 1, "true", None):
        with pytest.raises(FormatError, match="dispatch must be true or left out"):
            CpuRequirement.from_dict({"arch": "x86_64", "dispatch": bad})


def test_the_build_key_covers_the_effective_build_environment() -> None:
    sdist = _built(None)
    env = pip_env()
    base = build_key(sdist, env, {}, isolation=True)
    assert build_key(sdist, env, {}, isolation=True) == base
    dispatch = llama_build({}, RequiresSection()).build_env
    level = llama_build({}, RequiresSection(cpu_level="x86-64-v3")).build_env
    keys = {
        base,
        build_key(sdist, env, dispatch, isolation=True),
        build_key(sdist, env, level, isolation=True),
        build_key(sdist, env, {}, isolation=False),
        build_key(sdist, pip_env(platform="manylinux_2_17_x86_64"), {}, isolation=True),
    }
    assert len(keys) == 5


def test_a_llama_cpp_sdist_is_built_with_the_portable_flags_once(tmp_path: Path) -> None:
    pytest.importorskip("setuptools", reason="the offline sdist build uses setuptools")
    made = make_sdist(
        tmp_path / "dl",
        "ggmlpkg",
        "1.0",
        files={"setup.py": SETUP_PY, "vendor/llama.cpp/ggml/CMakeLists.txt": "# ggml\n"},
    )
    sdist = Artifact(
        "ggmlpkg", "1.0", made.name, f"https://x.invalid/{made.name}", sha256_file(made)
    )
    cache = Cache(tmp_path / "cache")
    env = pip_env(python=PY)
    said: list[str] = []
    ((wheel, path),) = build_wheels([(sdist, made)], env, tmp_path / "one", cache=cache)
    assert wheel.cpu_build == "dispatch"
    assert path.is_relative_to(cache.root)
    with zipfile.ZipFile(path) as archive:
        assert shlex.split(archive.read("ggmlpkg/cmake_args.txt").decode()) == DISPATCH
    # Again: from the cache, without running pip (nothing is staged in the work folder).
    again = build_wheels([(sdist, made)], env, tmp_path / "two", cache=cache, say=said.append)
    assert again == [(wheel, path)]
    assert not (tmp_path / "two").exists()
    assert any("built before" in line for line in said)
    # Another CPU level is another build.
    level = RequiresSection(cpu_level="x86-64-v3")
    ((other, _),) = build_wheels(
        [(sdist, made)], env, tmp_path / "three", requires=level, cache=cache
    )
    assert other.cpu_build == "x86-64-v3"
    assert (tmp_path / "three").exists()


def test_a_tampered_cached_wheel_is_named_and_dropped(tmp_path: Path) -> None:
    pytest.importorskip("setuptools", reason="the offline sdist build uses setuptools")
    made = make_sdist(tmp_path / "dl", "ggmlpkg", "1.0", files={"ggml/CMakeLists.txt": "x"})
    sdist = Artifact(
        "ggmlpkg", "1.0", made.name, f"https://x.invalid/{made.name}", sha256_file(made)
    )
    cache = Cache(tmp_path / "cache")
    ((wheel, path),) = build_wheels([(sdist, made)], pip_env(python=PY), tmp_path, cache=cache)
    path.chmod(0o644)
    path.write_bytes(b"X" + path.read_bytes()[1:])
    with pytest.raises(ArtifactError, match=wheel.sha256):
        build_wheels([(sdist, made)], pip_env(python=PY), tmp_path / "again", cache=cache)
    assert not path.exists()
