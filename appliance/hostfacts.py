"""Gathering what this host offers, for the preflight (appliance.preflight holds the rules).

Every source is read once and may be missing: ``/proc/cpuinfo`` and ``/proc/meminfo`` (Linux),
``shutil.disk_usage`` of the host root (or its nearest existing parent, before the first
install), ``os.confstr("CS_GNU_LIBC_VERSION")`` (absent on musl), the running interpreter (the
Python that sets up a bundle's environment at I7), and NVML through ``nvidia-ml-py``, which is
an optional extra (``airgap-appliance[gpu]``) and imported only here, only when asked. A source
that cannot be read becomes ``None`` (the check then fails closed) or, for the GPU, a
``gpu_problem`` that says why there is no GPU: nothing here raises.

NVML lists every GPU, whatever ``CUDA_VISIBLE_DEVICES`` hides from CUDA; the runtime sees only
the visible ones, so they are filtered the way CUDA does: by index or by UUID prefix, the list
ending at the first entry that names no GPU, and an empty or ``-1`` value hiding them all.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any, Final

from appliance.preflight import NO_DRIVER, Check, GpuFacts, HostFacts, check
from signing.bounded import one_line
from signing.requirements import HostRequirements, parse_cpu_flags

_ARCH_ALIASES: Final = {"amd64": "x86_64", "arm64": "aarch64"}
_CPUINFO: Final = Path("/proc/cpuinfo")
_MEMINFO: Final = Path("/proc/meminfo")
_VISIBLE: Final = "CUDA_VISIBLE_DEVICES"


def gather(root: Path, *, with_gpu: bool = True) -> HostFacts:
    """The host's facts; ``root`` is where slots are written (its free space counts).

    ``with_gpu`` False skips NVML (a bundle that needs no GPU need not load the driver).
    """
    memory = _meminfo()
    disk_path = _existing(root)
    gpus: tuple[GpuFacts, ...] = ()
    driver = cuda = None
    problem: str | None = "not checked: the bundle needs no GPU"
    if with_gpu:
        gpus, driver, cuda, problem = _nvml(os.environ.get(_VISIBLE))
    return HostFacts(
        cpu_arch=_ARCH_ALIASES.get(platform.machine().lower(), platform.machine().lower()),
        cpu_flags=_cpu_flags(),
        memory_total_bytes=memory.get("MemTotal"),
        memory_available_bytes=memory.get("MemAvailable"),
        disk_free_bytes=_disk_free(disk_path),
        disk_path=str(disk_path),
        python=f"{sys.version_info.major}.{sys.version_info.minor}",
        glibc=_glibc(),
        gpus=gpus,
        driver_version=driver,
        cuda_driver_version=cuda,
        gpu_problem=problem,
    )


def _cpu_flags() -> frozenset[str]:
    try:
        return parse_cpu_flags(_CPUINFO.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return frozenset()


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        text = _MEMINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if key in ("MemTotal", "MemAvailable") and parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (the root is made by the first install)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _disk_free(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _glibc() -> str | None:
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):
        return None
    if not text or not text.startswith("glibc "):
        return None
    version = text.removeprefix("glibc ").strip()
    parts = version.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 and all(p.isdigit() for p in parts[:2]) else None


def _nvml(
    visible: str | None,
) -> tuple[tuple[GpuFacts, ...], str | None, str | None, str | None]:
    """(GPUs visible to CUDA, driver version, CUDA version of the driver, why no GPU)."""
    if visible is not None and visible.strip() in ("", "-1"):
        return (), None, None, f"no GPU visible ({_VISIBLE}={visible!r})"
    try:
        import pynvml  # noqa: PLC0415 - optional: the [gpu] extra, only for GPU bundles
    except ImportError:
        return (), None, None, f"{NO_DRIVER} found (nvidia-ml-py, which reads it, is not installed)"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return (), None, None, f"{NO_DRIVER} ({_nvml_reason(exc)})"
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda_int = int(pynvml.nvmlSystemGetCudaDriverVersion())
        cuda = f"{cuda_int // 1000}.{cuda_int % 1000 // 10}"
        gpus = [_gpu(pynvml, i) for i in range(int(pynvml.nvmlDeviceGetCount()))]
    except pynvml.NVMLError as exc:
        return (), None, None, f"NVIDIA driver error ({_nvml_reason(exc)})"
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    shown = _visible(gpus, visible)
    problem = (
        None
        if shown
        else "no NVIDIA GPU" + (f" visible ({_VISIBLE}={visible!r})" if visible else "")
    )
    return tuple(g for g, _ in shown), driver, cuda, problem


def _gpu(pynvml: Any, index: int) -> tuple[GpuFacts, str]:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    facts = GpuFacts(
        index=index,
        name=_text(pynvml.nvmlDeviceGetName(handle))[:64],
        compute_capability=(int(major), int(minor)),
        memory_total_bytes=int(memory.total),
        memory_free_bytes=int(memory.free),
    )
    return facts, _text(pynvml.nvmlDeviceGetUUID(handle))


def _visible(gpus: list[tuple[GpuFacts, str]], visible: str | None) -> list[tuple[GpuFacts, str]]:
    """The GPUs CUDA shows under ``CUDA_VISIBLE_DEVICES`` (module docstring), in its order."""
    if visible is None:
        return gpus
    shown: list[tuple[GpuFacts, str]] = []
    for item in (part.strip() for part in visible.split(",")):
        if item.isdigit():
            match = [g for g in gpus if g[0].index == int(item)]
        else:
            match = [g for g in gpus if item and g[1].startswith(item)][:1]
        if not match or match[0] in shown:
            break
        shown.append(match[0])
    return shown


def _nvml_reason(exc: BaseException) -> str:
    return one_line(exc, limit=120) or type(exc).__name__


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def check_host(requirements: HostRequirements, root: Path) -> list[Check]:
    """The preflight on this host: gather its facts (NVML only for a GPU bundle), then
    :func:`appliance.preflight.check`."""
    return check(requirements, gather(root, with_gpu=requirements.gpu is not None))
