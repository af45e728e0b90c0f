"""Building the sdists a recipe allows into wheels, on the builder, for the target
(docs/adr/0007-package-environments.md, "sdists are built on the builder, never on the host").

A package the recipe lists in ``build_from_source`` is shipped as a wheel compiled here from its
locked sdist, with the recipe's ``build_env`` (``CMAKE_ARGS=-DGGML_CUDA=on``). The builder must
then *be* the target (:func:`builder.target.check_builder_is_target`): same Python ``X.Y``, OS,
libc and machine. The wheel is checked to be the sdist's name and version and to fit the
target's tags, and is built with ``SOURCE_DATE_EPOCH`` set, so that two builds give one hash.
Every refusal is one line: :class:`~signing.errors.ArtifactError` for an sdist that is not the
locked file, :class:`~signing.errors.LockError` for a build that fails or makes the wrong wheel.

An sdist built with llama.cpp's CMake is compiled for the target, not for this machine
(builder.llamabuild: runtime CPU dispatch by default, or the recipe's ``cpu_level``; CUDA for
the recipe's ``cuda_architectures``). Compiling llama-cpp-python takes minutes, and pip's own
wheel cache does not key on ``CMAKE_ARGS``, so the wheels built here are kept in the builder's
content-addressed cache (builder.cache) under a key of everything that makes the wheel: the
sdist's sha256, the *effective* build environment, the target, pip's isolation, and this
builder's Python and platform (:func:`build_key`). A second build, or CI, takes the wheel
from there (re-hashed, as every cache hit) instead of compiling again. A CUDA build's record
keeps its architectures and the CUDA version of the nvcc that compiled it, which the manifest
then states (builder.hostreqs), whichever nvcc a later build finds.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from builder.artifacts import Artifact
from builder.cache import Cache, sha256_file, write_atomically
from builder.hostreqs import nvcc_cuda_version
from builder.llamabuild import LlamaBuild, describe_build, llama_build, uses_llama_cpp_cmake
from builder.recipe import PipEnvironment, RequiresSection
from builder.target import check_builder_is_target, target_label, target_tags
from signing.errors import ArtifactError, LockError

REPRODUCIBLE_EPOCH = "315532800"  # 1980-01-01, the earliest zip time: for builds, if unset


def build_wheels(
    sdists: Sequence[tuple[Artifact, Path]],
    env: PipEnvironment,
    workdir: Path,
    *,
    isolation: bool = False,
    requires: RequiresSection | None = None,
    cache: Cache | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> list[tuple[Artifact, Path]]:
    """Build each (already fetched) sdist into a wheel on this machine, in order.

    ``requires`` is the recipe's ``[requires]`` (its ``cpu_level`` and ``cuda_architectures``
    decide how a llama.cpp sdist is compiled); with ``cache``, a wheel built before under the
    same :func:`build_key` is taken from it, and a new one is stored there (the returned path
    is then the cache's file).

    Each sdist is copied under ``workdir`` by its file name (pip recognizes an sdist by its
    name; a content-addressed cache file has none) and hashed there again (ArtifactError when
    it is not the locked file). Runs ``python -m pip wheel --no-deps --no-cache-dir`` with this
    interpreter and ``env.build_env`` added to the environment. By default without build
    isolation and with ``--no-index``: the build backend (setuptools, scikit-build-core,
    cmake, ...) must be installed next to the builder, which keeps the build offline and its
    tools the ones the operator chose. ``isolation=True`` lets pip install the sdist's build
    requirements in an isolated environment from the recipe's indexes instead (unpinned: the
    builder is online).

    The builder must be the target (:func:`check_builder_is_target`), and the wheel must be
    the sdist's name and version and fit the target's tags. Returns ``Artifact(origin=
    "built", url=<the sdist's url>, source_sha256=<the sdist's sha256>, sha256=<the wheel's>)``
    with the wheel's path under ``workdir``.
    """
    if not sdists:
        return []
    check_builder_is_target(env)
    tags = set(target_tags(env.platform, env.python))
    label = target_label(env)
    wanted = requires if requires is not None else RequiresSection()
    built = []
    for sdist, path in sdists:
        build_env, llama = _effective_env(sdist, path, env, wanted, say=say)
        key = build_key(sdist, env, build_env, isolation=isolation)
        if cache is not None and (hit := _cached_wheel(cache, key, llama)) is not None:
            say(f"{sdist.name} {sdist.version}: built before, taken from {hit[1]}")
            built.append(hit)
            continue
        # pip knows an sdist by its file name; a content-addressed cache file has none.
        staged = workdir / "built" / sdist.sha256
        if staged.exists():
            shutil.rmtree(staged)
        out = staged / "wheel"
        out.mkdir(parents=True)
        source = staged / sdist.filename
        shutil.copyfile(path, source)
        actual = sha256_file(source)
        if actual != sdist.sha256:
            raise ArtifactError(
                f"sdist {sdist.filename} of {sdist.name} {sdist.version}: sha256 {actual} is not "
                f"the locked {sdist.sha256}"
            )
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps"]
        command += ["--disable-pip-version-check", "--no-input", "--wheel-dir", str(out)]
        if isolation and not build_env and sdist.url.startswith(("https://", "http://")):
            # pip keys the wheels it built by the sdist's URL and sha256: an sdist that pip
            # already compiled on this machine (llama-cpp-python: minutes) is not compiled
            # again. Never with build_env: a CUDA build must not come from a CPU build's cache.
            command += ["--index-url", env.index_url]
            for url in env.extra_index_urls:
                command += ["--extra-index-url", url]
            command.append(f"{sdist.name} @ {sdist.url}#sha256={sdist.sha256}")
        elif isolation:
            command.append("--no-cache-dir")
            command += ["--index-url", env.index_url]
            for url in env.extra_index_urls:
                command += ["--extra-index-url", url]
        else:
            command += ["--no-cache-dir", "--no-index", "--no-build-isolation"]
        if command[-1] != f"{sdist.name} @ {sdist.url}#sha256={sdist.sha256}":
            command.append(str(source))
        run_env = os.environ | {"PIP_CONFIG_FILE": os.devnull} | dict(build_env)
        run_env.setdefault("SOURCE_DATE_EPOCH", REPRODUCIBLE_EPOCH)  # wheel zip timestamps
        result = subprocess.run(command, capture_output=True, text=True, env=run_env, check=False)
        made = sorted(out.glob("*.whl"))
        if result.returncode != 0 or len(made) != 1:
            lines = [
                ln.strip() for ln in (result.stderr + result.stdout).splitlines() if ln.strip()
            ]
            why = next((ln for ln in reversed(lines) if ln.lower().startswith("error")), None)
            why = why or (lines[-1] if lines else f"pip made {len(made)} wheels")
            raise LockError(f"building {sdist.name} {sdist.version} from its sdist failed: {why}")
        wheel = made[0]
        name, version, _, wheel_tags = parse_wheel_filename(wheel.name)
        if name != canonicalize_name(sdist.name) or not _same_version(version, sdist.version):
            raise LockError(
                f"the sdist of {sdist.name} {sdist.version} built {wheel.name}, another package"
            )
        if not wheel_tags & tags:
            raise LockError(
                f"the wheel built from {sdist.name} {sdist.version} ({wheel.name}) does not fit "
                f"{label}"
            )
        artifact = Artifact(
            name=sdist.name,
            version=sdist.version,
            filename=wheel.name,
            url=sdist.url,
            sha256=sha256_file(wheel),
            size=wheel.stat().st_size,
            origin="built",
            source_sha256=sdist.sha256,
            cpu_build=llama.cpu if llama else None,
            cuda_architectures=_cmake_archs(llama),
            cuda_version=nvcc_cuda_version(run_env) if _cmake_archs(llama) else None,
        )
        if cache is not None:
            wheel = _store_wheel(cache, key, artifact, wheel)
        built.append((artifact, wheel))
    return built


def cached_build(
    sdist: Artifact,
    path: Path,
    env: PipEnvironment,
    *,
    isolation: bool = False,
    requires: RequiresSection | None = None,
    cache: Cache,
) -> tuple[Artifact, Path] | None:
    """The wheel :func:`build_wheels` would take from ``cache`` for this sdist, or None where it
    would compile (nothing built here before with the same :func:`build_key`). Compiles
    nothing: for a caller that only wants a build that is there already (a test that is too
    slow to compile on a cold machine)."""
    wanted = requires if requires is not None else RequiresSection()
    build_env, llama = _effective_env(sdist, path, env, wanted, say=lambda _: None)
    return _cached_wheel(cache, build_key(sdist, env, build_env, isolation=isolation), llama)


def _effective_env(
    sdist: Artifact,
    path: Path,
    env: PipEnvironment,
    requires: RequiresSection,
    *,
    say: Callable[[str], None],
) -> tuple[Mapping[str, str], LlamaBuild | None]:
    """The build environment of one sdist: the recipe's, or builder.llamabuild's (returned
    too) for a llama.cpp sdist."""
    if not uses_llama_cpp_cmake(sdist.name, path):
        return env.build_env, None
    llama = llama_build(env.build_env, requires)
    say(f"{sdist.name} {sdist.version}: {describe_build(llama)}")
    return llama.build_env, llama


def _cmake_archs(llama: LlamaBuild | None) -> str | None:
    return ";".join(llama.cuda_architectures) if llama and llama.cuda_architectures else None


def build_key(
    sdist: Artifact, env: PipEnvironment, build_env: Mapping[str, str], *, isolation: bool
) -> str:
    """What the wheel built from ``sdist`` depends on, hashed (module docstring): the sdist,
    the effective build environment, the target, pip's isolation, and this builder's Python
    (full version) and platform (machine, C library)."""
    settings = {
        "sdist": sdist.sha256,
        "build_env": dict(sorted(build_env.items())),
        "target": [env.platform, env.python],
        "isolation": isolation,
        "builder": [
            sys.implementation.cache_tag,
            platform.python_version(),
            platform.machine(),
            os.confstr("CS_GNU_LIBC_VERSION") or "",
        ],
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _record(cache: Cache, key: str) -> Path:
    return cache.root / "built" / f"{key}.json"


def _cached_wheel(cache: Cache, key: str, llama: LlamaBuild | None) -> tuple[Artifact, Path] | None:
    """The wheel built before under ``key``: its record, and the file re-hashed by the cache."""
    try:
        data = json.loads(_record(cache, key).read_text())
        wheel = Artifact(**data)
    except (OSError, ValueError, TypeError):
        return None  # no record, or one this builder cannot read: build again
    path = cache.lookup(wheel.sha256, wheel)
    if path is None:
        return None
    if (archs := _cmake_archs(llama)) and not wheel.cuda_architectures:
        # A record from before CUDA builds were recorded: the architectures are part of the
        # key; the version is this builder's nvcc (hostreqs asks the same one).
        wheel = replace(wheel, cuda_architectures=archs, cuda_version=nvcc_cuda_version())
    return wheel, path


def _store_wheel(cache: Cache, key: str, wheel: Artifact, path: Path) -> Path:
    stored = cache.add(path, wheel.sha256, verified=True)
    fields = {k: getattr(wheel, k) for k in Artifact.__dataclass_fields__}
    write_atomically(_record(cache, key), json.dumps(fields, sort_keys=True).encode())
    return stored


def _same_version(version: Version, text: str) -> bool:
    try:
        return version == Version(text)
    except InvalidVersion:
        return False
