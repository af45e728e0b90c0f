"""The llama.cpp runtime compiled the way the builder compiles it, for the tests that need it.

``portable_wheel()`` takes llama-cpp-python's sdist from the committed lock of
``bundles/demo.toml`` (fetched by hash into the builder's cache) and builds it through
builder.sdist with the recipe's settings: runtime CPU dispatch, no native flags. The build
cache (builder.sdist.build_key) keeps the wheel, so a machine compiles it once per sdist
(about 11 minutes on 2 cores); later runs take it from the cache in a second.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from builder.artifacts import Artifact
from builder.cache import Cache
from builder.fetch import fetch_all
from builder.pipread import load_pip_lock
from builder.recipe import PipEnvironment, load_recipe
from builder.sdist import build_wheels
from builder.wheels import select_pip_artifacts

REPO = Path(__file__).resolve().parent.parent
# An older CPU for the portability tests (qemu-user): AMD Zen 2, AVX2, no AVX-512; and the
# dispatch build's variants that need AVX-512, which it must never get.
EMULATED = ("qemu-x86_64", "-cpu", "EPYC-Rome")
AVX512_VARIANTS = frozenset(
    {"skylakex", "cannonlake", "cascadelake", "icelake", "cooperlake", "zen4", "sapphirerapids"}
)
DEMO_RECIPE = REPO / "bundles" / "demo.toml"


# The demo's pinned llama.cpp packages as a recipe's [environment], for test recipes whose slot
# must run the portable runtime (format with lock=DEMO_LOCK).
DEMO_LOCK = REPO / "lockfiles" / "pylock.llamacpp-cpu.toml"
SLOT_RUNTIME = """[environment]
type = "pip"
platform = "manylinux_2_28_x86_64"
python = "3.11"
requirements = ["llama-cpp-python==0.3.36"]
lock = "{lock}"
build_from_source = ["llama-cpp-python"]
build_isolation = true
smoke_imports = ["llama_cpp"]
"""


def recipe_wheel(recipe_path: Path, work: Path) -> tuple[Artifact, Path]:
    """The llama.cpp sdist of ``recipe_path``'s lock, built through builder.sdist with that
    recipe's settings (compiles on a build-cache miss)."""
    recipe, _ = load_recipe(recipe_path)
    env = recipe.environment
    assert isinstance(env, PipEnvironment)
    _, sdists = select_pip_artifacts(load_pip_lock(env.lock_path(recipe_path), env), env)
    cache = Cache()
    fetched = fetch_all(sdists, cache, jobs=2, progress=False)
    (built,) = build_wheels(
        [(s, fetched[s.sha256]) for s in sdists],
        env,
        work,
        isolation=env.build_isolation,
        requires=recipe.requires,
        cache=cache,
        say=lambda line: sys.stderr.write(line + "\n"),
    )
    return built


def portable_wheel(work: Path) -> tuple[Artifact, Path]:
    """The dispatch build of llama-cpp-python (module docstring); compiles on a cache miss."""
    return recipe_wheel(DEMO_RECIPE, work)


if __name__ == "__main__":  # compile ahead of the tests: python tests/portable_build.py DIR
    os.nice(10)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    artifact, wheel = portable_wheel(out)
    # Under its own name (pip installs a wheel by its file name; the cache's file has none).
    named = out / artifact.filename
    if not named.is_file() or named.stat().st_size != wheel.stat().st_size:
        shutil.copyfile(wheel, named)
    sys.stdout.write(f"{named} {artifact.cpu_build}\n")
