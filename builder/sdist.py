"""Building the sdists a recipe allows into wheels, on the builder, for the target
(docs/adr/0007-package-environments.md, "sdists are built on the builder, never on the host").

A package the recipe lists in ``build_from_source`` is shipped as a wheel compiled here from its
locked sdist, with the recipe's ``build_env`` (``CMAKE_ARGS=-DGGML_CUDA=on``). The builder must
then *be* the target (:func:`builder.target.check_builder_is_target`): same Python ``X.Y``, OS,
libc and machine. The wheel is checked to be the sdist's name and version and to fit the
target's tags, and is built with ``SOURCE_DATE_EPOCH`` set, so that two builds give one hash.
Every refusal is one line: :class:`~signing.errors.ArtifactError` for an sdist that is not the
locked file, :class:`~signing.errors.LockError` for a build that fails or makes the wrong wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from builder.artifacts import Artifact
from builder.cache import sha256_file
from builder.recipe import PipEnvironment
from builder.target import check_builder_is_target, target_label, target_tags
from signing.errors import ArtifactError, LockError

REPRODUCIBLE_EPOCH = "315532800"  # 1980-01-01, the earliest zip time: for builds, if unset


def build_wheels(
    sdists: Sequence[tuple[Artifact, Path]],
    env: PipEnvironment,
    workdir: Path,
    *,
    isolation: bool = False,
) -> list[tuple[Artifact, Path]]:
    """Build each (already fetched) sdist into a wheel on this machine, in order.

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
    built = []
    for sdist, path in sdists:
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
        if isolation and not env.build_env and sdist.url.startswith(("https://", "http://")):
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
        run_env = os.environ | {"PIP_CONFIG_FILE": os.devnull} | dict(env.build_env)
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
        )
        built.append((artifact, wheel))
    return built


def _same_version(version: Version, text: str) -> bool:
    try:
        return version == Version(text)
    except InvalidVersion:
        return False
