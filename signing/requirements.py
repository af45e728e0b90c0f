"""What a bundle needs of the host that runs it: the manifest's ``requires`` object (format
section 2.4), and the x86-64 levels it may name.

A bundle is built on one machine and runs on another (DESIGN.md, invariant 9): the builder
records here what its runtime needs (CPU, CUDA build, glibc, Python, memory, disk, GPU) and the
host's preflight (appliance.preflight) compares it with the host before anything is written.

Parsing is strict and total, as for the rest of the manifest (signing.manifest): every field's
JSON type is checked before its value is used; lists are sorted and free of duplicates, and
optional fields are absent rather than null or empty, so that a parsed object re-encodes to the
very bytes that were signed.

The memory table (``requires.memory_estimate``) says how ``memory_bytes`` came about when the
builder computed it from the model (builder.memtable): weights, KV cache, compute buffers and
the runtime's overhead, for a context size, a number of parallel sequences and a KV cache type.

The x86-64 microarchitecture levels are those of the x86-64 psABI (the levels GCC's and clang's
``-march=x86-64-vN`` and glibc's ``ld.so --help`` name), spelt with the flag names Linux prints
in ``/proc/cpuinfo``: ``pni`` is SSE3, ``abm`` is LZCNT, ``lahf_lm`` is LAHF/SAHF in long mode,
``cx16`` is CMPXCHG16B; OSXSAVE has no flag of its own there, and the kernel shows ``xsave``
(and AVX at all) only when it has enabled XSAVE, so ``xsave`` stands for it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from signing.bounded import quote
from signing.canonical import MAX_INT, is_int
from signing.errors import FormatError

_V2: Final = frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})
_V3: Final = _V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_V4: Final = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
X86_64_LEVELS: Final[Mapping[str, frozenset[str]]] = {
    "x86-64-v2": _V2,
    "x86-64-v3": _V3,
    "x86-64-v4": _V4,
}
"""Each level's CPU flags (``/proc/cpuinfo`` names), in rising order; each includes the last."""

CPU_ARCHES: Final = frozenset({"x86_64", "aarch64", "ppc64le", "s390x", "riscv64"})
MAX_FLAGS: Final = 64
MAX_CUDA_ARCHITECTURES: Final = 32
# llama.cpp's KV cache types (its --cache-type-k/-v), by ggml's names.
KV_TYPES: Final = frozenset(
    {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"}
)
MAX_PARALLEL: Final = 256  # llama.cpp's LLAMA_MAX_SEQ

_FLAG_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.]{0,31}")
# "80", "86", "90a", "100f", "120": CMake's CUDA_ARCHITECTURES, without -real/-virtual.
_CUDA_ARCH_RE: Final = re.compile(r"([1-9][0-9]{1,2})([af]?)")
_CUDA_VERSION_RE: Final = re.compile(r"[1-9][0-9]?\.[0-9]{1,2}")
_GLIBC_RE: Final = re.compile(r"2\.[0-9]{1,3}")
_PYTHON_RE: Final = re.compile(r"3\.[0-9]{1,2}")
_WHAT: Final = "manifest requires"


def x86_64_level(flags: frozenset[str] | set[str]) -> str | None:
    """The highest x86-64 level whose every flag is in ``flags``; None below x86-64-v2."""
    best = None
    for level, needed in X86_64_LEVELS.items():
        if not needed <= flags:
            break
        best = level
    return best


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The first processor's flags in a ``/proc/cpuinfo`` text (x86 ``flags``, arm64
    ``Features``); empty when there are none."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def version_tuple(text: str) -> tuple[int, ...]:
    """``"2.28"`` as ``(2, 28)``, for comparisons; the text was checked by its regex."""
    return tuple(int(part) for part in text.split("."))


def cuda_arch_key(arch: str) -> tuple[int, str]:
    """The order of CUDA architectures: by number, then suffix ("90" before "90a", "100")."""
    match = _CUDA_ARCH_RE.fullmatch(arch)
    if match is None:
        raise FormatError(f"{_WHAT} gpu: {quote(arch)} is not a CUDA architecture like '86'")
    return int(match.group(1)), match.group(2)


@dataclass(frozen=True)
class CpuRequirement:
    """The CPU the runtime was built for: its architecture, and optionally an x86-64 level
    and single flags beyond it (``/proc/cpuinfo`` names).

    ``dispatch`` says that the runtime ships its CPU kernels in several variants beside a
    baseline one (llama.cpp's ``GGML_CPU_ALL_VARIANTS``) and the host picks the best it can
    execute (appliance.runtime.cpuvariant): ``level`` is then the lowest level a variant
    covers (absent: the architecture's baseline). Encoded as ``"dispatch": true``, or absent.
    """

    arch: str
    level: str | None = None
    flags: tuple[str, ...] = ()
    dispatch: bool = False

    def __post_init__(self) -> None:
        what = f"{_WHAT} cpu"
        if not isinstance(self.arch, str) or self.arch not in CPU_ARCHES:
            raise FormatError(f"{what}: arch must be one of {sorted(CPU_ARCHES)}")
        if self.level is not None:
            if not isinstance(self.level, str) or self.level not in X86_64_LEVELS:
                raise FormatError(f"{what}: level must be one of {sorted(X86_64_LEVELS)}")
            if self.arch != "x86_64":
                raise FormatError(f"{what}: level {self.level} needs arch x86_64")
        _check_names(self.flags, _FLAG_RE, what=f"{what} flags", limit=MAX_FLAGS)
        if not isinstance(self.dispatch, bool):
            raise FormatError(f"{what}: dispatch must be true or false")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"arch": self.arch}
        if self.level is not None:
            out["level"] = self.level
        if self.flags:
            out["flags"] = list(self.flags)
        if self.dispatch:
            out["dispatch"] = True
        return out

    @classmethod
    def from_dict(cls, value: object) -> CpuRequirement:
        what = f"{_WHAT} cpu"
        obj = _object(value, {"arch"}, optional={"level", "flags", "dispatch"}, what=what)
        if "dispatch" in obj and obj["dispatch"] is not True:
            # false would not re-encode to the bytes that were signed: it is left out
            raise FormatError(f"{what}: dispatch must be true or left out")
        return cls(
            arch=obj["arch"],
            level=_optional(obj, "level", what=what),
            flags=_nonempty_list(obj, "flags", what=what),
            dispatch="dispatch" in obj,
        )


@dataclass(frozen=True)
class GpuRequirement:
    """A CUDA build: the architectures it was compiled for, the CUDA version it was compiled
    with (the driver must support at least that), the GPU memory it needs, and whether the
    recipe accepts running on the CPU when the host has no NVIDIA GPU at all."""

    cuda_architectures: tuple[str, ...]
    cuda_version: str
    memory_bytes: int
    cpu_fallback: bool

    def __post_init__(self) -> None:
        what = f"{_WHAT} gpu"
        _check_names(
            self.cuda_architectures,
            _CUDA_ARCH_RE,
            what=f"{what} cuda_architectures",
            limit=MAX_CUDA_ARCHITECTURES,
            key=cuda_arch_key,
        )
        if not self.cuda_architectures:
            raise FormatError(f"{what}: cuda_architectures must name at least one architecture")
        if not isinstance(self.cuda_version, str) or not _CUDA_VERSION_RE.fullmatch(
            self.cuda_version
        ):
            raise FormatError(
                f"{what}: cuda_version must look like '12.4', got {quote(self.cuda_version)}"
            )
        _check_size(self.memory_bytes, what=f"{what} memory_bytes")
        if not isinstance(self.cpu_fallback, bool):
            raise FormatError(f"{what}: cpu_fallback must be true or false")

    def to_dict(self) -> dict[str, Any]:
        return {
            "cuda_architectures": list(self.cuda_architectures),
            "cuda_version": self.cuda_version,
            "memory_bytes": self.memory_bytes,
            "cpu_fallback": self.cpu_fallback,
        }

    @classmethod
    def from_dict(cls, value: object) -> GpuRequirement:
        what = f"{_WHAT} gpu"
        obj = _object(
            value, {"cuda_architectures", "cuda_version", "memory_bytes", "cpu_fallback"}, what=what
        )
        return cls(
            cuda_architectures=_nonempty_list(obj, "cuda_architectures", what=what),
            cuda_version=obj["cuda_version"],
            memory_bytes=obj["memory_bytes"],
            cpu_fallback=obj["cpu_fallback"],
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """The memory table: what the model needs for ``parallel`` sequences of ``context_size``
    tokens each with a KV cache of ``kv_type``; ``total_bytes`` is the sum of the four parts
    (docs/preflight.md, "How memory is estimated")."""

    context_size: int
    parallel: int
    kv_type: str
    weights_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    overhead_bytes: int
    total_bytes: int

    def __post_init__(self) -> None:
        what = f"{_WHAT} memory_estimate"
        if not is_int(self.context_size) or not 16 <= self.context_size <= MAX_INT:
            raise FormatError(f"{what}: context_size must be an integer >= 16")
        if not is_int(self.parallel) or not 1 <= self.parallel <= MAX_PARALLEL:
            raise FormatError(f"{what}: parallel must be an integer from 1 to {MAX_PARALLEL}")
        if not isinstance(self.kv_type, str) or self.kv_type not in KV_TYPES:
            raise FormatError(f"{what}: kv_type must be one of {sorted(KV_TYPES)}")
        for name in ("weights", "kv_cache", "compute", "overhead", "total"):
            _check_size(getattr(self, f"{name}_bytes"), what=f"{what} {name}_bytes")
        parts = self.weights_bytes + self.kv_cache_bytes + self.compute_bytes + self.overhead_bytes
        if self.total_bytes != parts:
            raise FormatError(f"{what}: total_bytes is not the sum of the parts")

    @property
    def allocated_bytes(self) -> int:
        """The part llama.cpp allocates itself: all but the runtime's overhead."""
        return self.weights_bytes + self.kv_cache_bytes + self.compute_bytes

    def summary(self) -> str:
        """One line: the total, what it is for, and its parts in MiB."""
        return (
            f"{format_mib(self.total_bytes)} for {self.parallel} x {self.context_size} tokens "
            f"(weights {format_mib(self.weights_bytes)}, KV {format_mib(self.kv_cache_bytes)} "
            f"{self.kv_type}, compute {format_mib(self.compute_bytes)}, overhead "
            f"{format_mib(self.overhead_bytes)})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "context_size": self.context_size,
            "parallel": self.parallel,
            "kv_type": self.kv_type,
            "weights_bytes": self.weights_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "compute_bytes": self.compute_bytes,
            "overhead_bytes": self.overhead_bytes,
            "total_bytes": self.total_bytes,
        }

    @classmethod
    def from_dict(cls, value: object) -> MemoryEstimate:
        keys = set(cls.__dataclass_fields__)
        obj = _object(value, keys, what=f"{_WHAT} memory_estimate")
        return cls(**obj)


@dataclass(frozen=True)
class HostRequirements:
    """Everything the host must offer before the installer writes a byte (step I3).

    ``memory_bytes`` is the RAM the runtime needs; ``disk_bytes`` the free space a new slot
    takes (the payload and the set-up environment); ``glibc`` the lowest glibc that every
    compiled file of the environment runs on; ``python`` the X.Y the environment was made for.
    """

    memory_bytes: int
    disk_bytes: int
    cpu: CpuRequirement | None = None
    gpu: GpuRequirement | None = None
    glibc: str | None = None
    python: str | None = None
    memory_estimate: MemoryEstimate | None = None  # how memory_bytes came about, when computed

    def __post_init__(self) -> None:
        _check_size(self.memory_bytes, what=f"{_WHAT} memory_bytes")
        _check_size(self.disk_bytes, what=f"{_WHAT} disk_bytes")
        if self.cpu is not None and not isinstance(self.cpu, CpuRequirement):
            raise FormatError(f"{_WHAT}: cpu must be a CpuRequirement")
        if self.gpu is not None and not isinstance(self.gpu, GpuRequirement):
            raise FormatError(f"{_WHAT}: gpu must be a GpuRequirement")
        if self.glibc is not None and (
            not isinstance(self.glibc, str) or not _GLIBC_RE.fullmatch(self.glibc)
        ):
            raise FormatError(f"{_WHAT}: glibc must look like '2.28', got {quote(self.glibc)}")
        if self.python is not None and (
            not isinstance(self.python, str) or not _PYTHON_RE.fullmatch(self.python)
        ):
            raise FormatError(f"{_WHAT}: python must look like '3.11', got {quote(self.python)}")
        if self.memory_estimate is not None and not isinstance(
            self.memory_estimate, MemoryEstimate
        ):
            raise FormatError(f"{_WHAT}: memory_estimate must be a MemoryEstimate")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"memory_bytes": self.memory_bytes, "disk_bytes": self.disk_bytes}
        if self.cpu is not None:
            out["cpu"] = self.cpu.to_dict()
        if self.gpu is not None:
            out["gpu"] = self.gpu.to_dict()
        if self.glibc is not None:
            out["glibc"] = self.glibc
        if self.python is not None:
            out["python"] = self.python
        if self.memory_estimate is not None:
            out["memory_estimate"] = self.memory_estimate.to_dict()
        return out

    @classmethod
    def from_dict(cls, value: object) -> HostRequirements:
        obj = _object(
            value,
            {"memory_bytes", "disk_bytes"},
            optional={"cpu", "gpu", "glibc", "python", "memory_estimate"},
            what=_WHAT,
        )
        return cls(
            memory_bytes=obj["memory_bytes"],
            disk_bytes=obj["disk_bytes"],
            cpu=CpuRequirement.from_dict(obj["cpu"]) if "cpu" in obj else None,
            gpu=GpuRequirement.from_dict(obj["gpu"]) if "gpu" in obj else None,
            glibc=_optional(obj, "glibc", what=_WHAT),
            python=_optional(obj, "python", what=_WHAT),
            memory_estimate=(
                MemoryEstimate.from_dict(obj["memory_estimate"])
                if "memory_estimate" in obj
                else None
            ),
        )


def _object(
    value: object, keys: set[str], *, what: str, optional: frozenset[str] | set[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(f"{what}: must be a JSON object")
    if missing := keys - value.keys():
        raise FormatError(f"{what}: missing field {sorted(missing)[0]!r}")
    if extra := value.keys() - keys - optional:
        raise FormatError(f"{what}: unknown field {quote(sorted(extra)[0])}")
    return value


def _optional(obj: Mapping[str, Any], key: str, *, what: str) -> Any:
    """An optional field's value: absent is None; present must not be null (it would not
    re-encode to the bytes that were signed)."""
    if key in obj and obj[key] is None:
        raise FormatError(f"{what}: {key} must be left out rather than null")
    return obj.get(key)


def _nonempty_list(obj: Mapping[str, Any], key: str, *, what: str) -> tuple[Any, ...]:
    """An optional list field: absent is empty; present must be a non-empty list (an empty one
    would not re-encode to the bytes that were signed)."""
    if key not in obj:
        return ()
    value = obj[key]
    if not isinstance(value, list) or not value:
        raise FormatError(f"{what}: {key} must be a non-empty list")
    return tuple(value)


def _check_names(
    names: object,
    pattern: re.Pattern[str],
    *,
    what: str,
    limit: int,
    key: Any = None,
) -> None:
    if not isinstance(names, tuple):
        raise FormatError(f"{what}: must be a tuple of strings")
    if len(names) > limit:
        raise FormatError(f"{what}: more than {limit} items")
    for name in names:
        if not isinstance(name, str) or not pattern.fullmatch(name):
            raise FormatError(f"{what}: {quote(name)} is not a valid name")
    ordered = sorted(set(names), key=key)
    if list(names) != ordered:
        raise FormatError(f"{what}: must be sorted and without duplicates")


def format_mib(n: int) -> str:
    """``n`` bytes as MiB with one decimal: how the memory table is shown."""
    return f"{n / (1 << 20):.1f} MiB"


def _check_size(value: object, *, what: str) -> None:
    if not is_int(value) or not 0 <= value <= MAX_INT:
        raise FormatError(f"{what} must be a non-negative integer")
