"""What the host must offer to run a bundle: the manifest's ``requires`` (format section 2.4).

Made from the recipe (``[requires]``, docs/recipe.md) and the environment as built, never from
the builder's own hardware unless the recipe makes the builder's hardware matter (DESIGN.md,
invariant 9): a package compiled here from its sdist carries this machine's glibc, so that is
recorded, and a host without it is refused before the install writes anything. Its CPU needs
are what the build made of it (builder.llamabuild): a llama.cpp build with runtime CPU dispatch
needs only the architecture's baseline (``dispatch``), one for an explicit ``cpu_level`` that
level, a native one (the recipe's ``build_env`` asked for it) this machine's level; any other
compiled sdist, whose build system we do not know, this machine's level too, to be safe.

- CPU architecture: the environment's platform (``manylinux_2_28_x86_64``, conda ``linux-64``),
  else the recipe's level; none for a bundle without environment or CPU keys.
- glibc floor: per wheel the lowest glibc its manylinux tags accept (a wheel tagged
  ``manylinux_2_17_x86_64.manylinux2014_x86_64`` runs from 2.17), then the highest over the
  wheels; the builder's glibc for a wheel compiled here (platform tag ``linux_*``); for conda,
  the recipe's ``glibc``, the one the solver assumed.
- Disk: the payload plus the environment once set up: a wheel's files (uncompressed sizes from
  its zip directory) and the byte-compiled ``.py`` files (counted at their source size); a
  conda package at four times its size (they are compressed, and rattler hard-links from a
  cache in the slot).
- Memory and GPU memory: ``memory_mib`` and ``gpu_memory_mib`` when the recipe gives them, else
  the memory table of the GGUF (builder.memtable, recorded beside as ``memory_estimate``): its
  total for RAM, and, when every layer is offloaded (``gpu_layers`` unset or -1), its weights,
  KV cache and compute buffers plus ``RUNTIME_VRAM`` for GPU memory. Without a table (not a
  llama.cpp bundle of one GGUF file) or for a partial offload, a rough estimate from the model
  files (``MODEL_OVERHEAD`` of them plus a fixed runtime share).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Final

from packaging.utils import InvalidWheelFilename, parse_wheel_filename

from builder.artifacts import Artifact
from builder.llamabuild import DISPATCH
from builder.pack import PayloadFile
from builder.recipe import CondaEnvironment, PipEnvironment, Recipe, RequiresSection
from builder.target import parse_target_platform
from signing.errors import LockError, RecipeError
from signing.requirements import (
    CPU_ARCHES,
    X86_64_LEVELS,
    CpuRequirement,
    GpuRequirement,
    HostRequirements,
    MemoryEstimate,
    cuda_arch_key,
    parse_cpu_flags,
    version_tuple,
    x86_64_level,
)

MIB: Final = 1 << 20
MODEL_OVERHEAD: Final = 1.1  # weights plus what the runtime keeps beside them, roughly
RUNTIME_RAM: Final = 512 * MIB  # the interpreter, the server and the runtime's buffers
RUNTIME_VRAM: Final = 256 * MIB  # the CUDA context and scratch buffers
CONDA_EXPANSION: Final = 4
_LEGACY_MANYLINUX: Final = {"manylinux1": "2.5", "manylinux2010": "2.12", "manylinux2014": "2.17"}
_MANYLINUX_RE: Final = re.compile(r"manylinux_([0-9]+)_([0-9]+)_.+")
_CONDA_ARCH: Final = {"64": "x86_64", "aarch64": "aarch64", "ppc64le": "ppc64le", "s390x": "s390x"}
_NVCC_RE: Final = re.compile(r"release ([0-9]+\.[0-9]+)")
_CPUINFO: Final = Path("/proc/cpuinfo")


def host_requirements(
    recipe: Recipe,
    *,
    model_bytes: int,
    payload_bytes: int,
    packages: Sequence[PayloadFile] = (),
    artifacts: Sequence[Artifact] = (),
    memory_estimate: MemoryEstimate | None = None,
) -> HostRequirements:
    """The bundle's ``requires`` (module docstring); ``packages`` are the environment's package
    files, ``artifacts`` what they were made from, ``memory_estimate`` the model's memory table."""
    wanted = recipe.requires
    env = recipe.environment
    compiled = [a for a in artifacts if a.origin == "built" and not _is_pure(a.filename)]
    table = memory_estimate
    rough = int(model_bytes * MODEL_OVERHEAD) + RUNTIME_RAM
    memory = _mib(wanted.memory_mib) or (table.total_bytes if table else rough)
    return HostRequirements(
        memory_bytes=memory,
        disk_bytes=payload_bytes + sum(_expansion(p) for p in packages),
        cpu=_cpu(wanted, env, compiled=compiled),
        gpu=_gpu(recipe, model_bytes=model_bytes, compiled=compiled, table=table),
        glibc=_glibc(env, artifacts, compiled=bool(compiled)),
        python=env.python if env is not None else None,
        memory_estimate=table,
    )


def glibc_of_wheel(filename: str) -> str | None:
    """The lowest glibc a wheel's manylinux tags accept; None for a wheel without any."""
    try:
        platforms = {tag.platform for tag in parse_wheel_filename(filename)[3]}
    except InvalidWheelFilename:
        raise LockError(f"{filename!r} is not a wheel file name") from None
    floors = []
    for plat in platforms:
        legacy = plat.partition("_")[0]
        if legacy in _LEGACY_MANYLINUX:
            floors.append(_LEGACY_MANYLINUX[legacy])
        elif (match := _MANYLINUX_RE.fullmatch(plat)) is not None:
            floors.append(f"{int(match.group(1))}.{int(match.group(2))}")
    return min(floors, key=version_tuple) if floors else None


def nvcc_version(output: str) -> str | None:
    """The CUDA version in ``nvcc --version``'s output ("... release 13.0, V13.0.48")."""
    match = _NVCC_RE.search(output)
    return match.group(1) if match else None


def builder_glibc() -> str:
    """This machine's glibc X.Y: a wheel compiled here needs at least that on the host."""
    text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    version = text.removeprefix("glibc ").split(".")
    if not text.startswith("glibc ") or len(version) < 2:
        raise LockError(f"this builder's C library is not glibc ({text or 'unknown'})")
    return f"{int(version[0])}.{int(version[1])}"


# -- the parts ------------------------------------------------------------------------------------


def _cpu(
    wanted: RequiresSection,
    env: PipEnvironment | CondaEnvironment | None,
    *,
    compiled: Sequence[Artifact],
) -> CpuRequirement | None:
    arch = _arch(env) if env is not None else None
    if arch is None and wanted.cpu_level is not None:
        arch = "x86_64"
    if arch is None:
        if wanted.cpu_flags:
            raise RecipeError(
                "requires.cpu_flags need an architecture: an [environment] platform or a cpu_level"
            )
        return None
    level: str | None = wanted.cpu_level
    builds = {a.cpu_build for a in compiled}
    native = bool(builds - {DISPATCH, *X86_64_LEVELS})  # a native build, or one we cannot tell
    if level is None and native and arch == "x86_64":
        # Compiled here for this CPU (llama.cpp's GGML_NATIVE): the host needs its level.
        level = x86_64_level(_builder_flags())
    if level is not None and arch != "x86_64":
        raise RecipeError(f"requires.cpu_level {level} is for x86_64, the target is {arch}")
    return CpuRequirement(
        arch=arch,
        level=level,
        flags=tuple(sorted(set(wanted.cpu_flags))),
        dispatch=DISPATCH in builds,
    )


def _arch(env: PipEnvironment | CondaEnvironment) -> str | None:
    if isinstance(env, PipEnvironment):
        machine = parse_target_platform(env.platform).machine.lower()
        machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    else:
        machine = _CONDA_ARCH.get(env.platform.partition("-")[2], "")
    return machine if machine in CPU_ARCHES else None


def _gpu(
    recipe: Recipe,
    *,
    model_bytes: int,
    compiled: Sequence[Artifact],
    table: MemoryEstimate | None,
) -> GpuRequirement | None:
    wanted = recipe.requires
    if not wanted.cuda_architectures:
        return None
    # The version the CUDA build was compiled with (recorded by builder.sdist, also for a wheel
    # from the build cache), else this builder's nvcc for a build that did not record one.
    built = next((a.cuda_version for a in compiled if a.cuda_version), None)
    version = wanted.cuda_version or built or (nvcc_cuda_version() if compiled else None)
    if version is None:
        raise RecipeError(
            "requires.cuda_architectures needs cuda_version: the CUDA version the runtime was "
            "built with (found by nvcc only when the builder compiles it)"
        )
    if table is not None and recipe.runtime.gpu_layers in (None, -1):  # every layer offloaded
        estimate = table.allocated_bytes + RUNTIME_VRAM
    else:
        estimate = int(model_bytes * MODEL_OVERHEAD) + RUNTIME_VRAM
    memory = _mib(wanted.gpu_memory_mib) or estimate
    return GpuRequirement(
        cuda_architectures=tuple(sorted(set(wanted.cuda_architectures), key=cuda_arch_key)),
        cuda_version=version,
        memory_bytes=memory,
        cpu_fallback=wanted.cpu_fallback,
    )


def _glibc(
    env: PipEnvironment | CondaEnvironment | None,
    artifacts: Iterable[Artifact],
    *,
    compiled: bool,
) -> str | None:
    if isinstance(env, CondaEnvironment):
        return env.glibc if env.platform.startswith("linux-") else None
    floors = [f for a in artifacts if (f := glibc_of_wheel(a.filename)) is not None]
    if compiled:
        floors.append(builder_glibc())
    return max(floors, key=version_tuple) if floors else None


def _expansion(package: PayloadFile) -> int:
    """What a package file adds to the slot once set up (module docstring)."""
    name = package.entry_path
    if not name.endswith(".whl"):
        return CONDA_EXPANSION * package.source.stat().st_size
    try:
        with zipfile.ZipFile(package.source) as wheel:
            infos = wheel.infolist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise LockError(f"cannot read wheel {package.source}: {exc}") from None
    return sum(i.file_size * (2 if i.filename.endswith(".py") else 1) for i in infos)


def _is_pure(filename: str) -> bool:
    try:
        return all(tag.platform == "any" for tag in parse_wheel_filename(filename)[3])
    except InvalidWheelFilename:
        return False


def _builder_flags() -> frozenset[str]:
    try:
        return parse_cpu_flags(_CPUINFO.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return frozenset()


def nvcc_cuda_version(environ: Mapping[str, str] | None = None) -> str | None:
    """The CUDA version X.Y of the nvcc a build in ``environ`` (default: this process's) uses:
    ``CUDACXX``, else ``nvcc`` on ``PATH``, else under ``CUDA_HOME``; None without one."""
    environ = os.environ if environ is None else environ
    home = environ.get("CUDA_HOME") or environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = (
        environ.get("CUDACXX")
        or shutil.which("nvcc", path=environ.get("PATH"))
        or shutil.which("nvcc", path=str(Path(home) / "bin"))
    )
    if nvcc is None:
        return None
    try:
        result = subprocess.run(
            [nvcc, "--version"], capture_output=True, text=True, check=False, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return nvcc_version(result.stdout)


def _mib(value: int | None) -> int | None:
    return None if value is None else value * MIB
