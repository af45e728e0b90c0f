"""Will this bundle run on this host? The hardware preflight (pure core; docs/preflight.md).

:func:`check` compares what a verified manifest requires (signing.requirements) with what the
host offers (:class:`HostFacts`, gathered by appliance.hostfacts) and returns one
:class:`Check` per question, each with what was found, what is needed and, when it fails, the
fix. Nothing here reads the host: tests build facts directly, and ``appliance preflight`` and
``install`` (step I3, before any payload byte is written) run the very same function.

Rules:

- Fail closed: a fact the host could not read (no ``/proc/meminfo``, say) fails its check.
- CPU: the architecture must match; the x86-64 level (psABI) and every named flag must be in
  the host's ``/proc/cpuinfo`` flags, which the kernel clears for what it has not enabled.
- Memory is the host's total RAM; disk the free space where the slots are.
- GPU, only for a CUDA build: a GPU counts when its compute capability M.m runs one of the
  build's architectures, which is binary compatibility: architecture "Mn" with n <= m
  ("86" runs on 8.6 and 8.9, not on 8.0 or 9.0; "90a" only on 9.0). PTX forward compatibility is
  not counted: a build need not carry PTX. The driver must support the CUDA version the build
  was made with, and one fitting GPU must have the free memory the bundle needs (one GPU: a
  split across several is the runtime's choice, not a promise).
- No NVIDIA GPU at all (no driver, no nvidia-ml-py, none visible) passes only if the recipe
  allows CPU fallback; a GPU that is there but does not fit fails whatever the recipe says:
  the runtime would try it and crash.
- The checks come in a fixed order, so two runs on one host read the same.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from signing.bounded import clip, listing
from signing.errors import HostUnfitError
from signing.requirements import (
    X86_64_LEVELS,
    CpuRequirement,
    GpuRequirement,
    HostRequirements,
    cuda_arch_key,
    version_tuple,
    x86_64_level,
)

NO_DRIVER: Final = "no NVIDIA driver"
# The oldest Linux driver of each CUDA release (NVIDIA's CUDA toolkit release notes, table 3):
# only for the fix text; the check itself reads the CUDA version the driver reports.
_DRIVER_FOR_CUDA: Final = {
    (11, 8): "520.61.05",
    (12, 0): "525.60.13",
    (12, 1): "530.30.02",
    (12, 2): "535.54.03",
    (12, 3): "545.23.06",
    (12, 4): "550.54.14",
    (12, 5): "555.42.02",
    (12, 6): "560.28.03",
    (12, 8): "570.26",
    (12, 9): "575.51.03",
    (13, 0): "580.65.06",
}
_FIELD: Final = 120  # characters of one found/needed/fix text (GPU names come from the driver)


@dataclass(frozen=True)
class GpuFacts:
    """One NVIDIA GPU as the driver reports it."""

    index: int
    name: str
    compute_capability: tuple[int, int]
    memory_total_bytes: int
    memory_free_bytes: int

    @property
    def label(self) -> str:
        major, minor = self.compute_capability
        return f"GPU {self.index} {self.name} ({major}.{minor})"


@dataclass(frozen=True)
class HostFacts:
    """What the host offers. ``None`` is "could not be read"; ``gpu_problem`` says why there
    are no GPUs (``"no NVIDIA driver"``, nvidia-ml-py missing, hidden by
    ``CUDA_VISIBLE_DEVICES``), and is None when the driver answered."""

    cpu_arch: str
    cpu_flags: frozenset[str]
    memory_total_bytes: int | None
    memory_available_bytes: int | None
    disk_free_bytes: int | None
    disk_path: str
    python: str
    glibc: str | None
    gpus: tuple[GpuFacts, ...] = ()
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    gpu_problem: str | None = NO_DRIVER

    @property
    def cpu_level(self) -> str | None:
        """The highest x86-64 level the host's flags reach (None below v2 or not x86_64)."""
        return x86_64_level(self.cpu_flags) if self.cpu_arch == "x86_64" else None


@dataclass(frozen=True)
class Check:
    """One row of the preflight: passed or not, what was found, what is needed, the fix."""

    name: str
    ok: bool
    found: str
    needed: str
    fix: str = ""

    def line(self) -> str:
        """The failure as one short line, for install's refusal."""
        return clip(f"{self.name}: found {self.found}, needs {self.needed}; {self.fix}", 300)

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "ok": self.ok,
            "found": self.found,
            "needed": self.needed,
            "fix": self.fix,
        }


def check(requirements: HostRequirements, facts: HostFacts) -> list[Check]:
    """Every check of ``requirements`` against ``facts``, in a fixed order (module docstring)."""
    checks: list[Check] = []
    if requirements.cpu is not None:
        checks += _cpu(requirements.cpu, facts)
    checks.append(_memory(requirements.memory_bytes, facts))
    checks.append(_disk(requirements.disk_bytes, facts))
    if requirements.python is not None:
        checks.append(_python(requirements.python, facts))
    if requirements.glibc is not None:
        checks.append(_glibc(requirements.glibc, facts))
    if requirements.gpu is not None:
        checks += _gpu(requirements.gpu, facts)
    return [_bounded(c) for c in checks]


def require_fit(checks: Iterable[Check], *, bundle: str) -> None:
    """Raise :class:`HostUnfitError` naming every failed check, one item each."""
    failed = [c.line() for c in checks if not c.ok]
    if failed:
        raise HostUnfitError(
            f"this host cannot run {bundle}: {len(failed)} preflight check(s) failed: "
            + listing(failed, sep=" | ")
            + " (details: 'appliance preflight BUNDLE'; '--skip-preflight' installs anyway)"
        )


# -- the checks ---------------------------------------------------------------------------------


def _cpu(cpu: CpuRequirement, facts: HostFacts) -> list[Check]:
    arch_ok = facts.cpu_arch == cpu.arch
    checks = [
        Check(
            "cpu architecture",
            arch_ok,
            facts.cpu_arch,
            f"{cpu.arch} (CPU dispatch)" if cpu.dispatch else cpu.arch,
            "" if arch_ok else f"use a bundle built for {facts.cpu_arch}, or an {cpu.arch} host",
        )
    ]
    if not arch_ok:
        return checks  # levels and flags of another architecture say nothing
    if cpu.level is not None:
        have = facts.cpu_level
        missing = sorted(X86_64_LEVELS[cpu.level] - facts.cpu_flags)
        checks.append(
            Check(
                "cpu level",
                not missing,
                have or "below x86-64-v2",
                cpu.level,
                ""
                if not missing
                else f"lacks {', '.join(missing)}: rebuild with cpu_level = "
                f"{have or 'x86-64-v2'!r} (or a runtime with CPU dispatch), or use a newer CPU",
            )
        )
    if cpu.flags:
        missing = [f for f in cpu.flags if f not in facts.cpu_flags]
        checks.append(
            Check(
                "cpu features",
                not missing,
                "all present" if not missing else "missing " + ", ".join(missing),
                ", ".join(cpu.flags),
                "" if not missing else "rebuild without cpu_flags these need, or use another CPU",
            )
        )
    return checks


def _memory(needed: int, facts: HostFacts) -> Check:
    total = facts.memory_total_bytes
    ok = total is not None and total >= needed
    found = "unknown (no /proc/meminfo)" if total is None else f"{_size(total)} RAM"
    if total is not None and facts.memory_available_bytes is not None:
        found += f" ({_size(facts.memory_available_bytes)} available)"
    fix = "" if ok else f"add {_size(needed - (total or 0))} of RAM, or pick a smaller model"
    return Check("memory", ok, found, f"{_size(needed)} RAM", fix)


def _disk(needed: int, facts: HostFacts) -> Check:
    free = facts.disk_free_bytes
    ok = free is not None and free >= needed
    found = "unknown" if free is None else f"{_size(free)} free"
    found += f" at {facts.disk_path}"
    fix = (
        ""
        if ok
        else f"free {_size(needed - (free or 0))} at {facts.disk_path} "
        "(older slots: install with a smaller --keep)"
    )
    return Check("disk", ok, found, f"{_size(needed)} free", fix)


def _python(needed: str, facts: HostFacts) -> Check:
    ok = facts.python == needed
    fix = "" if ok else f"rebuild for Python {facts.python}, or run the appliance on {needed}"
    found = facts.python
    if getattr(sys, "frozen", False):
        # The standalone program is the environments' interpreter (docs/adr/0018): the host's
        # own Python, if any, plays no part.
        found += " (the standalone appliance's own; it runs slot environments)"
        if not ok:
            fix = (
                f"rebuild the bundle for Python {facts.python} with 'requires.standalone = true', "
                f"or use a standalone appliance frozen with Python {needed}"
            )
    return Check("python", ok, found, needed, fix)


def _glibc(needed: str, facts: HostFacts) -> Check:
    have = facts.glibc
    ok = have is not None and version_tuple(have) >= version_tuple(needed)
    fix = (
        ""
        if ok
        else f"rebuild for the host's glibc (a manylinux_{(have or '2.17').replace('.', '_')} "
        "platform, and compile sdists on a builder with that glibc), or upgrade the host"
    )
    return Check("glibc", ok, have or "not glibc", f"{needed} or newer", fix)


def _gpu(gpu: GpuRequirement, facts: HostFacts) -> list[Check]:
    archs = ", ".join(f"sm_{a}" for a in gpu.cuda_architectures)
    if not facts.gpus:
        problem = facts.gpu_problem or NO_DRIVER
        if gpu.cpu_fallback:
            return [
                Check(
                    "gpu",
                    True,
                    f"{problem}: the model runs on the CPU (the recipe allows it)",
                    f"NVIDIA GPU ({archs}) or CPU fallback",
                )
            ]
        return [
            Check(
                "gpu",
                False,
                problem,
                f"NVIDIA GPU ({archs})",
                "install the NVIDIA driver and nvidia-ml-py ('pip install airgap-appliance[gpu]'),"
                " or use a bundle whose recipe allows cpu_fallback",
            )
        ]
    fitting = [g for g in facts.gpus if _runs_on(gpu.cuda_architectures, g.compute_capability)]
    hide = "; or hide the GPUs (CUDA_VISIBLE_DEVICES='') for the CPU" if gpu.cpu_fallback else ""
    checks = [
        Check(
            "gpu compute capability",
            bool(fitting),
            ", ".join(g.label for g in (fitting or facts.gpus)),
            archs,
            ""
            if fitting
            else "rebuild with cuda_architectures naming "
            + ", ".join(sorted({_arch_of(g) for g in facts.gpus}))
            + hide,
        )
    ]
    checks.append(_driver(gpu.cuda_version, facts))
    candidates = fitting or list(facts.gpus)
    best = max(candidates, key=lambda g: g.memory_free_bytes)
    vram_ok = best.memory_free_bytes >= gpu.memory_bytes
    checks.append(
        Check(
            "gpu memory",
            vram_ok,
            f"{_size(best.memory_free_bytes)} free of {_size(best.memory_total_bytes)} "
            f"on {best.label}",
            f"{_size(gpu.memory_bytes)} free on one GPU",
            ""
            if vram_ok
            else "stop what else uses the GPU, use a larger GPU, or a smaller or more strongly "
            "quantised model" + hide,
        )
    )
    return checks


def _driver(cuda_version: str, facts: HostFacts) -> Check:
    needed = version_tuple(cuda_version)
    have = facts.cuda_driver_version
    ok = have is not None and version_tuple(have) >= needed
    found = f"driver {facts.driver_version or 'unknown'} (CUDA {have or 'unknown'})"
    driver = next((d for v, d in sorted(_DRIVER_FOR_CUDA.items()) if v >= needed), None)
    fix = (
        ""
        if ok
        else f"upgrade the NVIDIA driver to one for CUDA {cuda_version}"
        + (f" ({driver} or newer)" if driver else "")
    )
    return Check("nvidia driver", ok, found, f"CUDA {cuda_version} or newer", fix)


def _runs_on(architectures: tuple[str, ...], capability: tuple[int, int]) -> bool:
    """Binary compatibility of a build for ``architectures`` with a GPU (module docstring)."""
    major, minor = capability
    for arch in architectures:
        number, suffix = cuda_arch_key(arch)
        arch_major, arch_minor = divmod(number, 10)
        if suffix:  # arch-specific features ("90a") run on exactly that capability
            if (arch_major, arch_minor) == (major, minor):
                return True
        elif arch_major == major and arch_minor <= minor:
            return True
    return False


def _arch_of(gpu: GpuFacts) -> str:
    major, minor = gpu.compute_capability
    return f'"{major}{minor}"'


def _bounded(c: Check) -> Check:
    return Check(c.name, c.ok, clip(c.found, _FIELD), clip(c.needed, _FIELD), clip(c.fix, 240))


def _size(value: int) -> str:
    """Bytes for people: binary units, one decimal ("14.2 GiB")."""
    amount = float(max(value, 0))
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or unit == "TiB":
            break
        amount /= 1024
    return f"{amount:.0f} B" if unit == "B" else f"{amount:.1f} {unit}"
