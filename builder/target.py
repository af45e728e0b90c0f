"""The target of a pip environment: what a wheel platform tag and a Python ``X.Y`` say about the
host a bundle is built for (docs/adr/0007-package-environments.md).

The target (``env.platform``, such as ``manylinux_2_28_x86_64``, and ``env.python``) has
nothing to do with the builder's own platform and Python. Everything here is computed from the
recipe, never read from this machine, except :func:`check_builder_is_target`, which compares
the two before anything is compiled here for the target. Pure: no I/O, no network.

The tags and the marker environment are ``packaging``'s (:func:`packaging.tags.cpython_tags`,
:func:`packaging.tags.compatible_tags`, :func:`packaging.tags.mac_platforms`), fed with the
target instead of ``sys_tags()``'s view of the running interpreter. Every refusal is a
:class:`~signing.errors.LockError` (exit 2) that names the platform.
"""

from __future__ import annotations

import platform as host_platform
import re
import sys
from dataclasses import dataclass

from packaging.tags import Tag, compatible_tags, cpython_tags, mac_platforms

from builder.recipe import PipEnvironment
from signing.errors import LockError

# uv's --python-platform knows these glibc versions for x86_64 and aarch64 (uv 0.13).
_UV_GLIBC_MINORS = (17, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40)
_UV_ARCHES = ("x86_64", "aarch64")
_LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
_LEGACY_GLIBC = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}
_WINDOWS = {
    "win_amd64": ("x86_64", "AMD64", "x86_64-pc-windows-msvc"),
    "win_arm64": ("aarch64", "ARM64", "aarch64-pc-windows-msvc"),
    "win32": ("i686", "x86", "i686-pc-windows-msvc"),
}


@dataclass(frozen=True)
class TargetPlatform:
    """What a wheel platform tag says about the machine it runs on."""

    tag: str  # manylinux_2_28_x86_64
    os: str  # sys.platform of the target: linux, darwin, win32
    libc: str | None  # glibc or musl on linux, else None
    arch: str  # the machine, normalized: x86_64, aarch64, i686, ...
    machine: str  # platform.machine() on the target (the PEP 508 platform_machine)
    platforms: tuple[str, ...]  # wheel platform tags the target accepts, best first
    uv_platform: str | None  # uv's --python-platform, None when uv has none for it
    uv_env: tuple[tuple[str, str], ...] = ()  # environment uv needs for it


def parse_target_platform(tag: str) -> TargetPlatform:
    """Interpret a recipe's ``platform``; LockError naming it when it is not one we know.

    ``manylinux_2_X_<arch>`` (and the legacy ``manylinux2014/2010/1_<arch>``) also accepts every
    older glibc, the legacy aliases and ``linux_<arch>``, like pip on such a host;
    ``musllinux_1_X_<arch>`` every older musl; ``macosx_X_Y_<arch>`` what :func:`packaging.tags
    .mac_platforms` lists; ``win_amd64``, ``win_arm64`` and ``win32`` only themselves.
    """
    if m := re.fullmatch(r"manylinux(1|2010|2014)_([a-z0-9_]+)", tag):
        return _manylinux(tag, _LEGACY_GLIBC[f"manylinux{m[1]}"], m[2])
    if m := re.fullmatch(r"manylinux_2_(\d+)_([a-z0-9_]+)", tag):
        return _manylinux(tag, int(m[1]), m[2])
    if m := re.fullmatch(r"musllinux_1_(\d+)_([a-z0-9_]+)", tag):
        minor, arch = int(m[1]), m[2]
        plats = (*(f"musllinux_1_{n}_{arch}" for n in range(minor, -1, -1)), f"linux_{arch}")
        uv = f"{arch}-unknown-linux-musl" if arch in _UV_ARCHES else None
        return TargetPlatform(tag, "linux", "musl", arch, arch, plats, uv)
    if m := re.fullmatch(r"macosx_(\d+)_(\d+)_(arm64|x86_64)", tag):
        major, minor, arch = int(m[1]), int(m[2]), m[3]
        plats = tuple(mac_platforms((major, minor), arch))
        uv = "aarch64-apple-darwin" if arch == "arm64" else "x86_64-apple-darwin"
        env = (("MACOSX_DEPLOYMENT_TARGET", f"{major}.{minor}"),)
        norm = "aarch64" if arch == "arm64" else arch
        return TargetPlatform(tag, "darwin", None, norm, arch, plats, uv, env)
    if tag in _WINDOWS:
        arch, machine, uv = _WINDOWS[tag]
        return TargetPlatform(tag, "win32", None, arch, machine, (tag,), uv)
    raise LockError(
        f"target platform {tag!r} is not a wheel platform this builder knows; give "
        "manylinux_2_X_<arch>, musllinux_1_X_<arch>, macosx_X_Y_<arch>, win_amd64, win_arm64 "
        "or win32"
    )


def _manylinux(tag: str, minor: int, arch: str) -> TargetPlatform:
    floor = 4 if arch in ("x86_64", "i686") else 16  # as packaging.tags: nothing older exists
    plats: list[str] = []
    for n in range(minor, floor, -1):
        plats.append(f"manylinux_2_{n}_{arch}")
        if n in _LEGACY_MANYLINUX:
            plats.append(f"{_LEGACY_MANYLINUX[n]}_{arch}")
    plats.append(f"linux_{arch}")
    uv = None
    usable = [n for n in _UV_GLIBC_MINORS if n <= minor]
    if arch in _UV_ARCHES and usable:
        # The newest glibc uv knows that is not newer than the target's: never too new.
        uv = f"{arch}-manylinux_2_{usable[-1]}"
    return TargetPlatform(tag, "linux", "glibc", arch, arch, tuple(plats), uv)


def _python_version(python: str) -> tuple[int, int]:
    major, minor = python.split(".")
    return int(major), int(minor)


def target_tags(platform: str, python: str) -> list[Tag]:
    """The wheel tags a CPython ``python`` on ``platform`` accepts, best first (as pip ranks
    them): ``cp311-cp311-<plat>``, ``cp311-abi3-<plat>``, older ``abi3``, ``py3-none-<plat>``,
    ..., ``py3-none-any``."""
    version = _python_version(python)
    interpreter = f"cp{version[0]}{version[1]}"
    plats = list(parse_target_platform(platform).platforms)
    tags = [
        *cpython_tags(version, abis=[interpreter], platforms=plats),
        *compatible_tags(version, interpreter, plats),
    ]
    return list(dict.fromkeys(tags))


def target_marker_environment(platform: str, python: str) -> dict[str, str]:
    """The PEP 508 marker environment of the target, to evaluate a lock's markers with.

    ``python_full_version`` is taken as ``X.Y.0``: the recipe pins no patch level.
    """
    target = parse_target_platform(platform)
    system = {"linux": "Linux", "darwin": "Darwin", "win32": "Windows"}[target.os]
    return {
        "implementation_name": "cpython",
        "implementation_version": f"{python}.0",
        "os_name": "nt" if target.os == "win32" else "posix",
        "platform_machine": target.machine,
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": system,
        "platform_version": "",
        "python_full_version": f"{python}.0",
        "python_version": python,
        "sys_platform": target.os,
    }


def target_label(env: PipEnvironment) -> str:
    """How messages name the target: ``cp311-manylinux_2_28_x86_64``."""
    major, minor = _python_version(env.python)
    return f"cp{major}{minor}-{env.platform}"


def check_builder_is_target(env: PipEnvironment) -> None:
    """Refuse (LockError) to compile for a target this machine is not: Python ``X.Y``, OS,
    libc (glibc or musl) and machine must all be the target's."""
    target = parse_target_platform(env.platform)
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    if mine != env.python:
        raise LockError(
            f"cannot build sdists for Python {env.python} with this builder's Python {mine}; "
            "run the build with a Python of the target's version"
        )
    machine = host_platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64", "x86": "i686"}.get(machine, machine)
    libc = None
    if sys.platform == "linux":
        libc = "glibc" if host_platform.libc_ver()[0] == "glibc" else "musl"
    if (sys.platform, libc, machine) != (target.os, target.libc, target.arch):
        ours = "/".join(p for p in (sys.platform, libc, machine) if p)
        theirs = "/".join(p for p in (target.os, target.libc, target.arch) if p)
        raise LockError(
            f"cannot build sdists for {env.platform} ({theirs}) on this {ours} builder; "
            "build on a machine like the target"
        )
