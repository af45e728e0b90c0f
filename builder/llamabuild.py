"""How the builder compiles llama.cpp for the *target*, never for itself (DESIGN.md, invariant 9;
docs/adr/0012-portable-runtime-builds.md).

llama.cpp's CMake compiles for the machine it runs on unless told otherwise (``GGML_NATIVE`` is
on by default): built on an AVX-512 builder, the runtime dies with SIGILL on a host without
AVX-512, after the bundle has crossed the gap. So every sdist built with llama.cpp's CMake
(llama-cpp-python, or any sdist that carries ``ggml/CMakeLists.txt``) gets one of:

- **runtime CPU dispatch** (the default, as llama.cpp's release builds): ``GGML_NATIVE=OFF``,
  ``GGML_BACKEND_DL=ON``, ``GGML_CPU_ALL_VARIANTS=ON``. The CPU backend is built once per
  x86 microarchitecture (``libggml-cpu-haswell.so``, ``-skylakex``, ...) beside a baseline
  x86-64 one; the host picks the variant it can execute (appliance.runtime.cpuvariant). The
  host needs only x86-64; the manifest says ``dispatch``.
- **an explicit level** the recipe names (``[requires] cpu_level = "x86-64-v3"``): one CPU
  backend, ``GGML_NATIVE=OFF`` and exactly that level's instruction sets, AMX and the optional
  AVX-512 extensions off. The host needs that level.

A CUDA build (``GGML_CUDA=on`` in the recipe's ``build_env``) compiles for the recipe's
``cuda_architectures`` (``CMAKE_CUDA_ARCHITECTURES``), never CMake's ``native``. With runtime
CPU dispatch its CUDA backend is a library of its own (``libggml-cuda.so``) that a host without
the NVIDIA driver fails to load and skips (appliance.runtime.cpuvariant); with a ``cpu_level``
it is linked into ``libggml`` and llama.cpp does not load at all there, so a recipe that allows
``cpu_fallback`` must use dispatch.

The recipe's own ``CMAKE_ARGS`` are merged over these flags: where it sets the same ``-D``
variable, the recipe wins (``-DGGML_NATIVE=ON`` makes a native build, recorded as the builder's
level). Pure: the recipe and the sdist's name (and member names) in, the build environment out.
"""

from __future__ import annotations

import shlex
import tarfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from packaging.utils import canonicalize_name

from builder.recipe import RequiresSection
from signing.errors import RecipeError

DISPATCH: Final = "dispatch"
NATIVE: Final = "native"
CpuBuild = Literal["dispatch", "native", "x86-64-v2", "x86-64-v3", "x86-64-v4"]
"""How a llama.cpp build treats the CPU: what the host then needs (builder.hostreqs)."""

LLAMA_CPP_PACKAGES: Final = frozenset({"llama-cpp-python"})
_GGML_CMAKE: Final = "ggml/CMakeLists.txt"

_DISPATCH_ARGS: Final = {
    "GGML_NATIVE": "OFF",
    "GGML_BACKEND_DL": "ON",
    "GGML_CPU_ALL_VARIANTS": "ON",
}
# llama-server, built beside the bindings from the same sources and flags (the serving engine,
# docs/adr/0014-llama-server-engine.md), installed into the wheel's ``bin/`` with the other
# tools (small executables on the shared libraries; llama-batched-bench among them) and the
# server's own library (``lib/libllama-server-impl.so``, installed only with the tools). No web
# UI (it would be fetched from a hub at build time), no HTTPS client (no libssl on the host).
# llama-cpp-python adds tools/mtmd itself (LLAVA_BUILD), which the tools add too: once is all
# CMake allows, so the tools add it (libmtmd.so still lands in the wheel's ``lib/``).
_SERVER_ARGS: Final = {
    "LLAVA_BUILD": "OFF",
    "LLAMA_BUILD_TOOLS": "ON",
    "LLAMA_BUILD_SERVER": "ON",
    "LLAMA_TOOLS_INSTALL": "ON",
    "LLAMA_BUILD_UI": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",
    "LLAMA_OPENSSL": "OFF",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
}
_ISA: Final = ("GGML_SSE42", "GGML_AVX", "GGML_F16C", "GGML_FMA", "GGML_AVX2", "GGML_BMI2")
_OFF_ALWAYS: Final = (
    "GGML_AVX_VNNI",
    "GGML_AVX512_VBMI",
    "GGML_AVX512_VNNI",
    "GGML_AVX512_BF16",
    "GGML_AMX_TILE",
    "GGML_AMX_INT8",
    "GGML_AMX_BF16",
)
# Each x86-64 psABI level as ggml's switches: v2 is SSE4.2; v3 adds AVX, AVX2, BMI2, FMA, F16C
# (what GCC's -march=x86-64-v3 enables); v4 adds AVX-512 F/CD/VL/DQ/BW (ggml's GGML_AVX512).
_LEVEL_ON: Final[Mapping[str, frozenset[str]]] = {
    "x86-64-v2": frozenset({"GGML_SSE42"}),
    "x86-64-v3": frozenset(_ISA),
    "x86-64-v4": frozenset({*_ISA, "GGML_AVX512"}),
}
_TRUE: Final = frozenset({"on", "1", "true", "yes", "y"})


@dataclass(frozen=True)
class LlamaBuild:
    """The effective build of one llama.cpp sdist: its environment and what it means."""

    build_env: Mapping[str, str]
    cpu: CpuBuild
    cuda_architectures: tuple[str, ...] = ()


def uses_llama_cpp_cmake(name: str, sdist: Path) -> bool:
    """Whether an sdist is built with llama.cpp's CMake: llama-cpp-python by name, any other by
    a ``ggml/CMakeLists.txt`` among its members (False for an archive that cannot be read)."""
    if canonicalize_name(name) in LLAMA_CPP_PACKAGES:
        return True
    try:
        if zipfile.is_zipfile(sdist):
            with zipfile.ZipFile(sdist) as archive:
                return any(n.endswith(f"/{_GGML_CMAKE}") for n in archive.namelist())
        with tarfile.open(sdist, "r|*") as archive:
            return any(m.name.endswith(f"/{_GGML_CMAKE}") for m in archive)
    except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError):
        return False  # not an archive we can read: pip's build says what is wrong with it


def llama_build(build_env: Mapping[str, str], requires: RequiresSection) -> LlamaBuild:
    """The build environment for a llama.cpp sdist (module docstring): ours, then the recipe's
    ``CMAKE_ARGS`` over it."""
    ours: dict[str, str]
    if requires.cpu_level is not None:
        on = _LEVEL_ON[requires.cpu_level]
        ours = {"GGML_NATIVE": "OFF", "GGML_BACKEND_DL": "OFF", "GGML_CPU_ALL_VARIANTS": "OFF"}
        ours |= {flag: "ON" if flag in on else "OFF" for flag in (*_ISA, "GGML_AVX512")}
        ours |= dict.fromkeys(_OFF_ALWAYS, "OFF")
    else:
        ours = dict(_DISPATCH_ARGS)
    ours |= _SERVER_ARGS
    recipe_defines, rest = _split(build_env.get("CMAKE_ARGS", ""))
    cuda = _truthy(recipe_defines.get("GGML_CUDA", "OFF"))
    archs = tuple(requires.cuda_architectures)
    if cuda:
        if not archs:
            raise RecipeError(
                "a CUDA build (GGML_CUDA=on) needs requires.cuda_architectures: the GPUs it is "
                "compiled for, or CMake picks the builder's own"
            )
        ours["CMAKE_CUDA_ARCHITECTURES"] = ";".join(archs)
        given = recipe_defines.get("CMAKE_CUDA_ARCHITECTURES")
        if given is not None and given != ours["CMAKE_CUDA_ARCHITECTURES"]:
            raise RecipeError(
                f"build_env sets CMAKE_CUDA_ARCHITECTURES={given}, but requires."
                f"cuda_architectures is {list(archs)}: name them once, in [requires]"
            )
    defines = ours | recipe_defines  # the recipe wins where it sets the same variable
    cpu = _cpu_build(defines, requires)
    if cuda and requires.cpu_fallback and cpu != DISPATCH:
        raise RecipeError(
            "requires.cpu_fallback needs a CUDA build with runtime CPU dispatch (no cpu_level, "
            "no GGML_NATIVE or GGML_BACKEND_DL override): only there is the CUDA backend a "
            "library of its own that a host without the NVIDIA driver can skip"
        )
    args = [f"-D{key}={value}" for key, value in defines.items()] + rest
    env = dict(build_env) | {"CMAKE_ARGS": shlex.join(args)}
    return LlamaBuild(build_env=env, cpu=cpu, cuda_architectures=archs)


def _cpu_build(defines: Mapping[str, str], requires: RequiresSection) -> CpuBuild:
    native = _truthy(defines.get("GGML_NATIVE", "ON"))
    if not native and requires.cpu_level is not None:
        return requires.cpu_level
    dispatch = _truthy(defines.get("GGML_BACKEND_DL", "OFF")) and _truthy(
        defines.get("GGML_CPU_ALL_VARIANTS", "OFF")
    )
    if not native and dispatch and requires.cpu_level is None:
        return DISPATCH
    # The recipe overrode ours into something else: the host is only safe with this CPU's level.
    return NATIVE


def _split(cmake_args: str) -> tuple[dict[str, str], list[str]]:
    """``-DNAME=VALUE`` (or ``-DNAME:TYPE=VALUE``) keyed by NAME, in order; other arguments."""
    try:
        words = shlex.split(cmake_args)
    except ValueError as exc:
        raise RecipeError(f"build_env CMAKE_ARGS is not a shell word list: {exc}") from None
    defines: dict[str, str] = {}
    rest: list[str] = []
    for word in words:
        name, equals, value = word.removeprefix("-D").partition("=")
        if word.startswith("-D") and equals and name:
            defines[name.partition(":")[0]] = value
        else:
            rest.append(word)
    return defines, rest


def _truthy(value: str) -> bool:
    return value.strip().lower() in _TRUE


def describe_build(build: LlamaBuild) -> str:
    """One line for the builder's progress output."""
    cpu = {
        DISPATCH: "runtime CPU dispatch (every x86-64 variant, chosen on the host)",
        NATIVE: "NATIVE: for this builder's CPU only",
    }.get(build.cpu, f"CPU level {build.cpu}")
    archs: Sequence[str] = build.cuda_architectures
    return cpu + (f", CUDA architectures {', '.join(archs)}" if archs else "")
