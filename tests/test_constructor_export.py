"""``appliance-builder export constructor``: construct.yaml and an @EXPLICIT list with sha256.

constructor itself is not installable here (its PyPI namesake is another project), so the
emitted ``construct.yaml`` is checked against the keys constructor documents (CONSTRUCT.md,
builder.constructor.CONSTRUCT_KEYS) and parsed as YAML; the list is checked line by line
against the packages' bytes. The channel and the lock are real (tests/pkgfactory, rattler).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from helpers_cli import assert_error, builder, clean_env, ok
from localhttp import LocalServer
from pkgfactory import make_conda_channel, make_conda_package

from builder.constructor import CONSTRUCT_KEYS, REQUIRED_KEYS


def conda_recipe(directory: Path, channel: str, specs: str = '["demotool", "python"]') -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.bin").write_bytes(b"weights")
    recipe = directory / "recipe.toml"
    recipe.write_text(
        '[bundle]\nname = "demo"\nversion = "1.0.0"\n\n[model]\npath = "model.bin"\n\n'
        '[runtime]\nbackend = "llama.cpp"\n\n[environment]\ntype = "conda"\n'
        f'platform = "linux-64"\npython = "3.11"\nchannels = ["{channel}"]\nspecs = {specs}\n'
    )
    return recipe


@pytest.fixture
def channel(tmp_path: Path, local_server: LocalServer) -> tuple[str, list[Path]]:
    made = tmp_path / "made"
    packages = [
        make_conda_package(made, "libdemo", "1.0", build="h0_0", subdir="linux-64"),
        make_conda_package(made, "demotool", "2.0", depends=["libdemo >=1.0"]),
        make_conda_package(made, "python", "3.11.9", build="h2_0", subdir="linux-64"),
    ]
    make_conda_channel(local_server.root / "channel", packages)
    return f"{local_server.url}/channel", packages


def test_export_writes_documented_keys_and_a_sha256_explicit_list(
    tmp_path: Path, channel: tuple[str, list[Path]]
) -> None:
    url, packages = channel
    env = clean_env(AIRGAP_APPLIANCE_CACHE=str(tmp_path / "cache"))
    recipe = conda_recipe(tmp_path / "project", url)
    ok(builder("lock", recipe, env=env))
    out = tmp_path / "ctor"
    shown = ok(builder("export", "constructor", recipe, "-o", out, env=env)).out
    assert "construct.yaml" in shown

    construct = yaml.safe_load((out / "construct.yaml").read_text())
    assert set(construct) <= CONSTRUCT_KEYS, set(construct) - CONSTRUCT_KEYS
    assert set(construct) >= REQUIRED_KEYS
    assert construct["name"] == "demo"
    assert construct["version"] == "1.0.0"
    assert construct["channels"] == [url]
    assert construct["installer_type"] == "sh"
    explicit = out / construct["environment_file"]

    lines = explicit.read_text().splitlines()
    body = lines[lines.index("@EXPLICIT") + 1 :]
    assert "# platform: linux-64" in lines
    expected = set()
    for package in packages:
        subdir = "noarch" if package.name.startswith("demotool") else "linux-64"
        digest = hashlib.sha256(package.read_bytes()).hexdigest()
        expected.add(f"{url}/{subdir}/{package.name}#sha256:{digest}")
    assert set(body) == expected
    assert body == sorted(body)

    again = tmp_path / "ctor2"
    ok(builder("export", "constructor", recipe, "-o", again, env=env))
    for name in ("construct.yaml", explicit.name):
        assert (again / name).read_bytes() == (out / name).read_bytes()


def test_export_refuses_a_recipe_without_a_lock_or_without_python(
    tmp_path: Path, channel: tuple[str, list[Path]]
) -> None:
    url, _ = channel
    env = clean_env(AIRGAP_APPLIANCE_CACHE=str(tmp_path / "cache"))
    recipe = conda_recipe(tmp_path / "project", url, specs='["demotool"]')
    out = tmp_path / "ctor"
    assert_error(builder("export", "constructor", recipe, "-o", out, env=env), 2, "lock")
    ok(builder("lock", recipe, env=env))
    assert_error(
        builder("export", "constructor", recipe, "-o", out, env=env), 2, "no python package"
    )
    assert not (out / "construct.yaml").exists()


def test_export_refuses_a_pip_recipe(tmp_path: Path) -> None:
    directory = tmp_path / "project"
    directory.mkdir()
    (directory / "model.bin").write_bytes(b"weights")
    recipe = directory / "recipe.toml"
    recipe.write_text(
        '[bundle]\nname = "demo"\nversion = "1.0.0"\n\n[model]\npath = "model.bin"\n\n'
        '[runtime]\nbackend = "llama.cpp"\n'
    )
    result = builder("export", "constructor", recipe, "-o", tmp_path / "o", env=clean_env())
    assert_error(result, 2, "no conda environment")
