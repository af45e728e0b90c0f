"""The CUDA build of llama.cpp compiled the way the builder compiles it, for the tests that need
it (tests/test_cuda_build.py).

``cuda_wheel()`` takes llama-cpp-python's sdist from the committed lock of
``tests/recipes/demo-cuda-sm90.toml`` (bundles/demo-cuda.toml for one GPU architecture) and
builds it through builder.sdist with that recipe's settings: runtime CPU dispatch for the CPU
backends, ``libggml-cuda.so`` for sm_90. The build cache (builder.sdist.build_key) keeps the
wheel, so a machine compiles it once per sdist; ``cached_cuda_wheel()`` answers without
compiling (None on a cold machine, where the tests skip).

The builder needs nvcc and cuBLAS (headers and ``libcublas.so``). A toolkit without cuBLAS (an
nvcc-only install) can take it from the ``nvidia-cublas`` wheel of the same CUDA major:
``CUDA_EXTRAS=DIR`` names a folder with ``include/`` and ``lib/`` (``libcublas.so`` and
``libcublasLt.so``), added to the compile's ``CPATH`` and ``CMAKE_LIBRARY_PATH``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from portable_build import recipe_wheel

from builder.artifacts import Artifact
from builder.cache import Cache
from builder.pipread import load_pip_lock
from builder.recipe import PipEnvironment, Recipe, load_recipe
from builder.sdist import cached_build
from builder.wheels import select_pip_artifacts

REPO = Path(__file__).resolve().parent.parent
CUDA_RECIPE = REPO / "tests" / "recipes" / "demo-cuda-sm90.toml"
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))


def _inputs() -> tuple[Recipe, PipEnvironment, list[Artifact], Cache]:
    recipe, _ = load_recipe(CUDA_RECIPE)
    env = recipe.environment
    assert isinstance(env, PipEnvironment)
    _, sdists = select_pip_artifacts(load_pip_lock(env.lock_path(CUDA_RECIPE), env), env)
    return recipe, env, sdists, Cache()


def cached_cuda_wheel() -> tuple[Artifact, Path] | None:
    """The CUDA build from the build cache, or None when this machine has not compiled it.
    Fetches nothing: llama-cpp-python is known by its name, its sdist is not read."""
    recipe, env, sdists, cache = _inputs()
    (sdist,) = sdists
    return cached_build(
        sdist,
        Path(sdist.filename),
        env,
        isolation=env.build_isolation,
        requires=recipe.requires,
        cache=cache,
    )


def cuda_wheel(work: Path) -> tuple[Artifact, Path]:
    """The CUDA build of llama-cpp-python (module docstring); compiles on a cache miss."""
    with _toolkit():
        return recipe_wheel(CUDA_RECIPE, work)


@contextmanager
def _toolkit() -> Iterator[None]:
    """nvcc on PATH (CUDACXX), and ``$CUDA_EXTRAS`` for a toolkit without cuBLAS."""
    saved = dict(os.environ)
    os.environ["PATH"] = f"{CUDA_HOME / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ.setdefault("CUDACXX", str(CUDA_HOME / "bin" / "nvcc"))
    if extras := os.environ.get("CUDA_EXTRAS"):
        for var, sub in (("CPATH", "include"), ("CMAKE_LIBRARY_PATH", "lib")):
            os.environ[var] = os.pathsep.join(
                p for p in (str(Path(extras) / sub), os.environ.get(var)) if p
            )
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


if __name__ == "__main__":  # compile ahead of the tests: python tests/cuda_build.py DIR
    os.nice(10)
    started = time.monotonic()
    artifact, wheel = cuda_wheel(Path(sys.argv[1]))
    minutes = (time.monotonic() - started) / 60
    sys.stdout.write(f"{wheel} {artifact.cpu_build} {minutes:.1f} min\n")
