"""The committed locks in lockfiles/: readable, for the documented target, and in step with the
pins in pyproject.toml (the environment the tests run with)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from builder.pipread import load_pip_lock
from builder.recipe import PipEnvironment, load_recipe
from builder.wheels import select_pip_artifacts

ROOT = Path(__file__).resolve().parent.parent
LOCKS = sorted((ROOT / "lockfiles").glob("pylock.*.toml"))


def _pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += extra
    pins = {}
    for line in lines:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;]+)", line.strip())
        assert m, f"pyproject.toml pins exactly: {line!r}"
        pins[canonicalize_name(m.group(1))] = m.group(3)
    return pins


def test_the_documented_locks_are_committed() -> None:
    names = {p.name for p in LOCKS}
    assert {
        "pylock.llamacpp-cpu.toml",
        "pylock.llamacpp-cuda.toml",
        "pylock.transformers-cuda.toml",
        "pylock.appliance-cpu.toml",
    } <= names
    readme = (ROOT / "lockfiles" / "README.md").read_text()
    for name in names:
        assert f"`{name}`" in readme, f"{name} is not described in lockfiles/README.md"


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_lock_is_for_the_target_and_matches_pyproject(lock: Path) -> None:
    env = PipEnvironment(
        type="pip", platform="manylinux_2_28_x86_64", python="3.11", lock=str(lock)
    )
    packages = load_pip_lock(lock, env)
    wheels, sdists = select_pip_artifacts(
        packages, env.model_copy(update={"build_from_source": ["llama-cpp-python"]})
    )
    assert wheels
    assert all(len(a.sha256) == 64 for a in [*wheels, *sdists])
    assert {a.name for a in sdists} <= {"llama-cpp-python"}
    pins = _pyproject_pins()
    for package in packages:
        name = canonicalize_name(package.name)
        if name in pins and name != "torch":  # the tests run torch's CPU build (+cpu)
            assert str(package.version) == pins[name], f"{lock.name}: {name}"


@pytest.mark.parametrize("recipe", ["demo.toml", "demo-cuda.toml", "hf-cuda.toml"])
def test_bundled_recipes_point_at_committed_locks(recipe: str) -> None:
    path = ROOT / "bundles" / recipe
    parsed, _ = load_recipe(path)
    assert parsed.environment is not None
    assert parsed.environment.lock_path(path).resolve() in {p.resolve() for p in LOCKS}
