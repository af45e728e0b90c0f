"""What every environment lock resolves to, whatever its kind: a list of artifacts to fetch.

The pip and conda lock readers (builder.pipread with builder.wheels, builder.condaenv) turn a
lock into :class:`Artifact` values for the recipe's target platform; builder.fetch downloads
them into the content-addressed cache (builder.cache), checking each against ``sha256`` before
it is used; the build puts them in the bundle. Nothing downstream of the lock readers knows
which kind of lock it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Artifact:
    """One file of a locked environment.

    ``url`` is where it comes from (``https://``, ``http://`` or ``file://``); ``sha256`` is
    what the lock pins, and the only thing that decides whether the bytes are accepted.
    ``origin`` is ``"built"`` for a wheel the builder compiled from an sdist: then ``url``
    names the sdist it came from and ``sha256`` is the new wheel's hash.
    """

    name: str
    version: str
    filename: str
    url: str
    sha256: str
    size: int | None = None
    md5: str | None = None
    subdir: str | None = None  # conda only: linux-64, noarch, ...
    origin: Literal["index", "built"] = "index"
    source_sha256: str | None = None  # for origin "built": the sdist's locked sha256
    # for a llama.cpp build: how it treats the CPU (builder.llamabuild.CpuBuild)
    cpu_build: str | None = None
    # for a CUDA build: the GPU architectures (CMake's "80;90") and nvcc's CUDA version X.Y
    cuda_architectures: str | None = None
    cuda_version: str | None = None

    def __post_init__(self) -> None:
        if "/" in self.filename or self.filename in ("", ".", ".."):
            raise ValueError(f"artifact file name {self.filename!r} is not a plain file name")
        if len(self.sha256) != 64:
            raise ValueError(f"artifact {self.filename}: sha256 must be 64 hex digits")


def describe(artifact: Artifact) -> str:
    """``package numpy 2.4.6 (numpy-2.4.6-....whl)``: how every message names an artifact."""
    return f"package {artifact.name} {artifact.version} ({artifact.filename})"
