"""Recipe-relative paths resolved once by load_recipe, and PEP 751 locks read through
``packaging.pylock`` (docs/adr/0011-pip-lock-input.md). No network: files and file:// only."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pkgfactory import make_sdist, make_wheel

from builder.pipread import load_pip_lock
from builder.recipe import PipEnvironment, load_recipe
from builder.wheels import LockedFile
from signing.errors import LockError

RECIPE = """\
[bundle]
name = "demo"
version = "1.0.0"

[model]
path = "models/tiny.gguf"

[runtime]
backend = "llama.cpp"

[environment]
type = "pip"
platform = "manylinux_2_28_x86_64"
python = "3.11"
requirements_file = "reqs.in"
lock = "locks/requirements.txt"
index_url = "file:///nonexistent/simple"
find_links = ["wheels", "https://example.invalid/links"]
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "project" / "demo.toml"
    path.parent.mkdir()
    path.write_text(RECIPE)
    return path


def test_load_recipe_resolves_recipe_relative_paths_once(recipe: Path) -> None:
    parsed, _ = load_recipe(recipe)
    env = parsed.environment
    assert isinstance(env, PipEnvironment)
    base = recipe.parent
    assert Path(str(parsed.model.path)) == base / "models" / "tiny.gguf"
    assert env.lock_path(recipe) == base / "locks" / "requirements.txt"
    assert env.lock_path(Path("elsewhere/other.toml")) == env.lock_path(recipe)
    assert env.requirements_file == str(base / "reqs.in")
    assert env.find_links == [str(base / "wheels"), "https://example.invalid/links"]
    assert env.anchored(Path("elsewhere/other.toml")) is env
    assert parsed.anchored(Path("elsewhere/other.toml")) is parsed


def test_the_default_lock_name_is_next_to_the_recipe(recipe: Path) -> None:
    recipe.write_text(RECIPE.replace('lock = "locks/requirements.txt"\n', ""))
    parsed, _ = load_recipe(recipe)
    assert parsed.environment is not None
    assert parsed.environment.lock_path(recipe) == recipe.parent / "pylock.demo.toml"


def test_a_requirements_lock_elsewhere_finds_links_relative_to_the_recipe(recipe: Path) -> None:
    """The lock lives in locks/, the find-links directory next to the recipe: resolved once by
    load_recipe, it is not looked for under locks/."""
    wheel = make_wheel(recipe.parent / "wheels", "delta", "3.0")
    lock = recipe.parent / "locks" / "requirements.txt"
    lock.parent.mkdir()
    lock.write_text(f"delta==3.0 --hash=sha256:{sha256(wheel)}\n")
    parsed, _ = load_recipe(recipe)
    assert isinstance(parsed.environment, PipEnvironment)
    env = parsed.environment.model_copy(update={"find_links": parsed.environment.find_links[:1]})

    (package,) = load_pip_lock(lock, env)

    assert package.wheels == [
        LockedFile(wheel.name, wheel.resolve().as_uri(), sha256(wheel), wheel.stat().st_size)
    ]


def pylock(path: Path, body: str) -> Path:
    path.write_text('lock-version = "1.0"\n' + body)
    return path


def pip_env() -> PipEnvironment:
    return PipEnvironment(
        type="pip", platform="manylinux_2_28_x86_64", python="3.11", requirements=["alpha"]
    )


def test_a_pylock_is_checked_against_pep_751_by_packaging(tmp_path: Path) -> None:
    lock = pylock(
        tmp_path / "pylock.toml",
        '[[packages]]\nname = "Alpha"\nversion = "1.0"\n'
        'wheels = [{ url = "https://x.invalid/alpha-1.0-py3-none-any.whl", '
        f'hashes = {{ sha256 = "{"a" * 64}" }} }}]\n',
    )
    with pytest.raises(LockError) as caught:
        load_pip_lock(lock, pip_env())
    assert caught.value.diagnostics() == (
        f"lock {lock} is not a valid PEP 751 lock: Name 'Alpha' is not normalized in "
        "'packages[0].name'"
    )


@pytest.mark.parametrize(
    "hashes", ["", f', hashes = {{ sha512 = "{"b" * 128}" }}'], ids=["no-hashes", "sha512-only"]
)
def test_an_sdist_without_sha256_is_named(tmp_path: Path, hashes: str) -> None:
    """No hashes at all (refused by packaging) or another algorithm only (refused here): the
    same message, naming the file and the package."""
    lock = pylock(
        tmp_path / "pylock.toml",
        '[[packages]]\nname = "alpha"\nversion = "1.0"\n'
        f'sdist = {{ url = "https://x.invalid/alpha-1.0.tar.gz"{hashes} }}\n',
    )
    with pytest.raises(LockError) as caught:
        load_pip_lock(lock, pip_env())
    assert caught.value.diagnostics() == (
        f"lock {lock}: alpha-1.0.tar.gz of package alpha has no sha256 hash"
    )


def test_markers_are_evaluated_for_the_target_and_files_kept_whatever_their_tags(
    tmp_path: Path,
) -> None:
    sdist = make_sdist(tmp_path / "files", "alpha", "1.0")
    lock = pylock(
        tmp_path / "pylock.toml",
        'created-by = "hand"\n'
        '[[packages]]\nname = "alpha"\nversion = "1.0"\n'
        "marker = \"sys_platform == 'linux'\"\n"
        f'sdist = {{ path = "files/{sdist.name}", hashes = {{ sha256 = "{sha256(sdist)}" }} }}\n'
        "wheels = [\n"
        '  { name = "alpha-1.0-cp311-cp311-macosx_11_0_arm64.whl", url = "https://x.invalid/m", '
        f'hashes = {{ sha256 = "{"c" * 64}" }} }},\n]\n'
        '[[packages]]\nname = "winonly"\nversion = "2.0"\n'
        "marker = \"sys_platform == 'win32'\"\n"
        f'wheels = [{{ url = "https://x.invalid/winonly-2.0-py3-none-any.whl", '
        f'hashes = {{ sha256 = "{"d" * 64}" }} }}]\n',
    )
    (alpha,) = load_pip_lock(lock, pip_env())
    assert (alpha.name, alpha.version) == ("alpha", "1.0")
    assert [w.filename for w in alpha.wheels] == ["alpha-1.0-cp311-cp311-macosx_11_0_arm64.whl"]
    assert alpha.sdist == LockedFile(sdist.name, sdist.resolve().as_uri(), sha256(sdist))
