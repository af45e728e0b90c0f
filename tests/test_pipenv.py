"""builder.pipenv against real components: wheels and sdists made by pkgfactory, a simple index
served by the loopback server, real ``uv pip compile``, real ``pip wheel`` and ``pip install``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import pytest
from localhttp import LocalServer
from pipenv_helpers import closed_port_url, make_flag_sdist, pip_env, serve_index
from pkgfactory import make_sdist, make_wheel
from uv import find_uv_bin

from builder.artifacts import Artifact
from builder.piplock import lock_pip, uv_python_platform
from builder.pipread import TOOL_KEY, load_pip_lock
from builder.sdist import build_wheels
from builder.target import target_tags
from builder.wheels import LockedFile, LockedPackage, pip_install_list, select_pip_artifacts
from signing.errors import ArtifactError, FetchError, LockError

PY = f"{sys.version_info.major}.{sys.version_info.minor}"
X86 = "manylinux_2_28_x86_64"
LINUX_WHEEL = "cp311-cp311-manylinux_2_17_x86_64"
MAC_WHEEL = "cp311-cp311-macosx_11_0_arm64"
HAVE_SETUPTOOLS = importlib.util.find_spec("setuptools") is not None
needs_setuptools = pytest.mark.skipif(
    not HAVE_SETUPTOOLS,
    reason="building an sdist without isolation needs setuptools in this Python",
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def url_path(url: str) -> Path:
    assert url.startswith("file://")
    return Path(url2pathname(urlsplit(url).path))


@pytest.fixture
def uv_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """uv's cache under tmp_path, so that no test reads or pollutes the user's."""
    cache = tmp_path / "uv-cache"
    monkeypatch.setenv("UV_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe" / "demo.toml"
    path.parent.mkdir()
    path.write_text("# the recipe's content does not matter to builder.pipenv\n")
    return path


@pytest.fixture
def index(local_server: LocalServer, tmp_path: Path) -> str:
    """alpha (pure) needs beta; beta has a Linux x86_64 wheel, a macOS arm64 wheel and an
    sdist; gamma (needed by alpha) exists only as an sdist."""
    made = tmp_path / "made"
    return serve_index(
        local_server,
        [
            make_wheel(made, "alpha", "1.0", requires=["beta>=1", "gamma"]),
            make_wheel(made, "beta", "1.0", tag=LINUX_WHEEL),
            make_wheel(made, "beta", "1.0", tag=MAC_WHEEL),
            make_sdist(made, "beta", "1.0"),
            make_sdist(made, "gamma", "2.0"),
        ],
    )


def www_file(server: LocalServer, name: str) -> Path:
    return server.root / "files" / name


# -- lock ---------------------------------------------------------------------------------------


def test_lock_writes_pylock_with_hashes_and_target(
    recipe: Path, index: str, local_server: LocalServer, uv_cache: Path
) -> None:
    env = pip_env(index_url=index, python="3.11")
    lock = lock_pip(recipe, env, cache_dir=uv_cache)

    assert lock == env.lock_path(recipe)
    data = tomllib.loads(lock.read_text())
    assert data["lock-version"].startswith("1.")
    assert data["tool"][TOOL_KEY] == {"platform": X86, "python": "3.11"}
    by_name = {p["name"]: p for p in data["packages"]}
    assert set(by_name) == {"alpha", "beta", "gamma"}
    for package in data["packages"]:
        for file in [*package.get("wheels", []), *[package.get("sdist")]]:
            if file is None:
                continue
            name = file["url"].rsplit("/", 1)[1]
            assert file["hashes"]["sha256"] == sha256(www_file(local_server, name))
    assert sorted(p.name for p in recipe.parent.iterdir()) == sorted([lock.name, "demo.toml"])

    wheels, sdists = select_pip_artifacts(
        load_pip_lock(lock, env), pip_env(index_url=index, build_from_source=["Gamma"])
    )
    assert [w.filename for w in wheels] == [
        "alpha-1.0-py3-none-any.whl",
        f"beta-1.0-{LINUX_WHEEL}.whl",
    ]
    assert [s.filename for s in sdists] == ["gamma-2.0.tar.gz"]
    assert all(a.url.startswith(local_server.url + "/files/") for a in [*wheels, *sdists])


def test_lock_goes_to_out_and_the_recipe_requirements_file(
    recipe: Path, index: str, uv_cache: Path
) -> None:
    (recipe.parent / "reqs.in").write_text("beta==1.0\n")
    env = pip_env(index_url=index, requirements=[], requirements_file="reqs.in")
    out = recipe.parent / "locks" / "pylock.toml"

    assert lock_pip(recipe, env, out=out, cache_dir=uv_cache) == out
    names = [p["name"] for p in tomllib.loads(out.read_text())["packages"]]
    assert names == ["beta"]
    assert not env.lock_path(recipe).exists()


@pytest.mark.parametrize(
    ("platform", "expected"),
    [
        ("manylinux_2_28_x86_64", "x86_64-manylinux_2_28"),
        ("manylinux_2_17_aarch64", "aarch64-manylinux_2_17"),
        ("manylinux2014_x86_64", "x86_64-manylinux_2_17"),
        ("manylinux_2_27_x86_64", "x86_64-manylinux_2_17"),  # never newer than the target
        ("manylinux_2_35_aarch64", "aarch64-manylinux_2_35"),
        ("musllinux_1_2_x86_64", "x86_64-unknown-linux-musl"),
        ("macosx_11_0_arm64", "aarch64-apple-darwin"),
        ("macosx_12_0_x86_64", "x86_64-apple-darwin"),
        ("win_amd64", "x86_64-pc-windows-msvc"),
        ("win_arm64", "aarch64-pc-windows-msvc"),
    ],
)
def test_uv_platform_names(platform: str, expected: str) -> None:
    assert uv_python_platform(platform) == expected


@pytest.mark.parametrize("platform", ["linux_x86_64", "solaris_11_sparc", "manylinux_2_28_ppc64le"])
def test_unknown_platform_is_a_lock_error_naming_it(platform: str) -> None:
    with pytest.raises(LockError, match=platform):
        uv_python_platform(platform)


def test_lock_for_a_mac_target_picks_the_mac_wheel(
    recipe: Path, index: str, uv_cache: Path
) -> None:
    env = pip_env(index_url=index, platform="macosx_11_0_arm64", requirements=["beta"])
    lock = lock_pip(recipe, env, cache_dir=uv_cache)
    wheels, sdists = select_pip_artifacts(load_pip_lock(lock, env), env)
    assert [w.filename for w in wheels] == [f"beta-1.0-{MAC_WHEEL}.whl"]
    assert sdists == []


def test_lock_for_aarch64_finds_only_the_sdist_and_selection_refuses(
    recipe: Path, index: str, uv_cache: Path
) -> None:
    env = pip_env(index_url=index, platform="manylinux_2_28_aarch64", requirements=["beta"])
    lock = lock_pip(recipe, env, cache_dir=uv_cache)
    packages = load_pip_lock(lock, env)
    assert [(p.name, p.wheels, p.sdist is not None) for p in packages] == [("beta", [], True)]
    with pytest.raises(LockError) as caught:
        select_pip_artifacts(packages, env)
    message = caught.value.diagnostics()
    assert message == (
        "package beta 1.0 has no wheel for cp311-manylinux_2_28_aarch64 and is not in "
        "build_from_source (only an sdist)"
    )


def test_lock_for_another_target_is_refused_naming_both(
    recipe: Path, index: str, uv_cache: Path
) -> None:
    made_for = pip_env(index_url=index, requirements=["beta"])
    lock = lock_pip(recipe, made_for, cache_dir=uv_cache)
    for other in (
        pip_env(index_url=index, platform="manylinux_2_28_aarch64"),
        pip_env(index_url=index, python="3.12"),
    ):
        with pytest.raises(LockError) as caught:
            load_pip_lock(lock, other)
        message = caught.value.diagnostics()
        assert f"{X86} / Python 3.11" in message
        assert f"{other.platform} / Python {other.python}" in message


def test_foreign_wheels_in_an_unrecorded_lock_are_named(
    recipe: Path, index: str, uv_cache: Path
) -> None:
    """A pylock made elsewhere (no [tool] table) for x86_64: selection for aarch64 names the
    tags the lock does have."""
    lock = lock_pip(recipe, pip_env(index_url=index, requirements=["beta"]), cache_dir=uv_cache)
    text = lock.read_text()
    lock.write_text(text[: text.index(f"[tool.{TOOL_KEY}]")])
    aarch64 = pip_env(index_url=index, platform="manylinux_2_28_aarch64")
    packages = [  # without the sdist, so that only the foreign wheel is left
        LockedPackage(p.name, p.version, p.wheels, None) for p in load_pip_lock(lock, aarch64)
    ]
    with pytest.raises(LockError, match=rf"the lock's wheels are for {LINUX_WHEEL}\)$"):
        select_pip_artifacts(packages, aarch64)


def test_sdist_only_dependency_without_build_from_source_is_refused(
    recipe: Path, index: str, uv_cache: Path
) -> None:
    env = pip_env(index_url=index)
    lock = lock_pip(recipe, env, cache_dir=uv_cache)
    with pytest.raises(LockError, match=r"^package gamma 2\.0 has no wheel for cp311-") as caught:
        select_pip_artifacts(load_pip_lock(lock, env), env)
    assert caught.value.exit_code == 2
    assert "(only an sdist)" in caught.value.diagnostics()


def test_unreachable_index_is_a_fetch_error_naming_it(recipe: Path, uv_cache: Path) -> None:
    url = closed_port_url()
    with pytest.raises(FetchError, match=url):
        lock_pip(recipe, pip_env(index_url=url), cache_dir=uv_cache)
    assert not pip_env().lock_path(recipe).exists()


def test_unsolvable_lock_keeps_the_previous_lock(recipe: Path, index: str, uv_cache: Path) -> None:
    env = pip_env(index_url=index, requirements=["alpha==9.9"])
    previous = env.lock_path(recipe)
    previous.write_bytes(b"# the committed lock\n")
    with pytest.raises(LockError) as caught:
        lock_pip(recipe, env, cache_dir=uv_cache)
    message = caught.value.diagnostics()
    assert "alpha==9.9" in message
    assert "\n" not in message
    assert previous.read_bytes() == b"# the committed lock\n"
    assert sorted(p.name for p in recipe.parent.iterdir()) == sorted([previous.name, "demo.toml"])


# -- other lock forms ---------------------------------------------------------------------------


def uv_requirements_lock(recipe: Path, index: str, cache: Path, *requirements: str) -> Path:
    """A hashed requirements.txt exactly as ``uv pip compile --generate-hashes`` writes it."""
    source = recipe.parent / "requirements.in"
    source.write_text("".join(f"{r}\n" for r in requirements))
    out = recipe.parent / "requirements.txt"
    subprocess.run(
        [
            find_uv_bin(),
            "pip",
            "compile",
            str(source),
            "--generate-hashes",
            "--python-platform",
            "x86_64-manylinux_2_28",
            "--python-version",
            "3.11",
            "--index-url",
            index,
            "--no-config",
            "--quiet",
            "-o",
            str(out),
        ],
        check=True,
        env=os.environ | {"UV_CACHE_DIR": str(cache)},
    )
    return out


@pytest.mark.parametrize("json_api", [False, True], ids=["pep503-html", "pep691-json"])
def test_hashed_requirements_lock_finds_files_by_hash(
    recipe: Path,
    tmp_path: Path,
    local_server: LocalServer,
    uv_cache: Path,
    json_api: bool,
) -> None:
    made = tmp_path / "made"
    index = serve_index(
        local_server,
        [
            make_wheel(made, "alpha", "1.0", requires=["beta"]),
            make_wheel(made, "beta", "1.0", tag=LINUX_WHEEL),
            make_wheel(made, "beta", "1.0", tag=MAC_WHEEL),
            make_wheel(made, "beta", "0.9"),  # on the index, not in the lock
        ],
        json_api=json_api,
    )
    lock = uv_requirements_lock(recipe, index, uv_cache, "alpha")
    assert "--hash=sha256:" in lock.read_text()

    env = pip_env(index_url=index, lock="requirements.txt")
    packages = load_pip_lock(lock, env)
    assert [(p.name, p.version) for p in packages] == [("alpha", "1.0"), ("beta", "1.0")]
    beta = packages[1]
    assert sorted(w.filename for w in beta.wheels) == sorted(
        [f"beta-1.0-{LINUX_WHEEL}.whl", f"beta-1.0-{MAC_WHEEL}.whl"]
    )
    for wheel in beta.wheels:
        assert wheel.url == f"{local_server.url}/files/{wheel.filename}"
        assert wheel.sha256 == sha256(www_file(local_server, wheel.filename))
        assert wheel.size == (
            len(www_file(local_server, wheel.filename).read_bytes()) if json_api else None
        )
    wheels, _ = select_pip_artifacts(packages, env)
    assert [w.filename for w in wheels] == [
        "alpha-1.0-py3-none-any.whl",
        f"beta-1.0-{LINUX_WHEEL}.whl",
    ]


def test_requirements_lock_with_a_hash_no_index_has(
    recipe: Path, tmp_path: Path, local_server: LocalServer
) -> None:
    index = serve_index(local_server, [make_wheel(tmp_path / "made", "alpha", "1.0")])
    lock = recipe.parent / "requirements.txt"
    lock.write_text(
        "alpha==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n"
        '# a comment\nbeta==1.0 ; sys_platform == "win32" --hash=sha256:' + "1" * 64 + "\n"
    )
    with pytest.raises(LockError, match=rf"no file of alpha 1\.0 on {index} has one"):
        load_pip_lock(lock, pip_env(index_url=index))
    # The beta line's marker is false on Linux: it is skipped, not looked up.
    alpha = sha256(www_file(local_server, "alpha-1.0-py3-none-any.whl"))
    lock.write_text(lock.read_text().replace("--hash=sha256:" + "0" * 64, f"--hash sha256:{alpha}"))
    assert [p.name for p in load_pip_lock(lock, pip_env(index_url=index))] == ["alpha"]
    windows = pip_env(index_url=index, platform="win_amd64")
    with pytest.raises(LockError, match=r"no file of beta 1\.0"):
        load_pip_lock(lock, windows)


def test_find_links_relative_to_the_recipe(recipe: Path, index: str, uv_cache: Path) -> None:
    """A local find-links directory (relative to the recipe) in uv's lock and, by hash, in a
    requirements lock."""
    wheel = make_wheel(recipe.parent / "local-wheels", "delta", "3.0")
    env = pip_env(index_url=index, requirements=["delta"], find_links=["local-wheels"])
    wheels, _ = select_pip_artifacts(load_pip_lock(lock_pip(recipe, env), env), env)
    assert [(w.filename, w.url) for w in wheels] == [(wheel.name, wheel.resolve().as_uri())]

    txt = recipe.parent / "requirements.txt"
    txt.write_text(f"delta==3.0 --hash=sha256:{sha256(wheel)}\n")
    (package,) = load_pip_lock(txt, env.model_copy(update={"lock": "requirements.txt"}))
    assert package.wheels == [
        LockedFile(wheel.name, wheel.resolve().as_uri(), sha256(wheel), wheel.stat().st_size)
    ]


def test_requirements_lock_needs_pins_and_hashes(recipe: Path) -> None:
    lock = recipe.parent / "requirements.txt"
    for text, match in [
        ("alpha>=1.0 --hash=sha256:" + "0" * 64 + "\n", "not pinned"),
        ("alpha==1.0\n", "has no --hash=sha256"),
        ("-r other.txt\n", "'-r' is not allowed"),
    ]:
        lock.write_text(text)
        with pytest.raises(LockError, match=match):
            load_pip_lock(lock, pip_env())


def test_requirements_lock_on_an_unreachable_index(recipe: Path) -> None:
    lock = recipe.parent / "requirements.txt"
    lock.write_text("alpha==1.0 --hash=sha256:" + "0" * 64 + "\n")
    url = closed_port_url()
    with pytest.raises(FetchError, match=url):
        load_pip_lock(lock, pip_env(index_url=url))


def test_pylock_relative_paths_resolve_against_the_lock(recipe: Path, tmp_path: Path) -> None:
    wheel = make_wheel(recipe.parent / "wheels", "alpha", "1.0")
    sdist = make_sdist(recipe.parent / "sdists", "alpha", "1.0")
    lock = recipe.parent / "pylock.toml"
    lock.write_text(
        'lock-version = "1.0"\ncreated-by = "hand"\n\n[[packages]]\nname = "alpha"\n'
        f'version = "1.0"\nwheels = [{{ path = "wheels/{wheel.name}", '
        f'hashes = {{ sha256 = "{sha256(wheel)}" }} }}]\n'
        f'sdist = {{ url = "sdists/{sdist.name}", size = {sdist.stat().st_size}, '
        f'hashes = {{ sha256 = "{sha256(sdist).upper()}" }} }}\n'
    )
    (package,) = load_pip_lock(lock, pip_env())
    assert package.wheels == [LockedFile(wheel.name, wheel.resolve().as_uri(), sha256(wheel))]
    assert package.sdist == LockedFile(
        sdist.name, sdist.resolve().as_uri(), sha256(sdist), sdist.stat().st_size
    )
    wheels, _ = select_pip_artifacts([package], pip_env())
    assert url_path(wheels[0].url).read_bytes() == wheel.read_bytes()


def test_pylock_file_without_hash_is_refused(recipe: Path) -> None:
    lock = recipe.parent / "pylock.toml"
    lock.write_text(
        'lock-version = "1.0"\n[[packages]]\nname = "alpha"\nversion = "1.0"\n'
        'wheels = [{ url = "https://example.invalid/alpha-1.0-py3-none-any.whl" }]\n'
    )
    with pytest.raises(LockError, match="has no sha256"):
        load_pip_lock(lock, pip_env())


# -- selection ----------------------------------------------------------------------------------


def locked(name: str, version: str, *tags: str, sdist: bool = False) -> LockedPackage:
    files = [
        LockedFile(f"{name}-{version}-{tag}.whl", f"https://x.invalid/{tag}.whl", f"{i:064x}")
        for i, tag in enumerate(tags, start=1)
    ]
    source = LockedFile(f"{name}-{version}.tar.gz", "https://x.invalid/s", "f" * 64)
    return LockedPackage(name, version, files, source if sdist else None)


def test_target_tags_accept_older_manylinux_and_generic_wheels() -> None:
    tags = [str(t) for t in target_tags(X86, "3.11")]
    for accepted in (
        "cp311-cp311-manylinux_2_28_x86_64",
        "cp311-cp311-manylinux_2_17_x86_64",
        "cp311-cp311-manylinux2014_x86_64",
        "cp311-cp311-manylinux1_x86_64",
        "cp311-cp311-linux_x86_64",
        "cp38-abi3-manylinux_2_17_x86_64",
        "py3-none-any",
    ):
        assert accepted in tags
    for refused in (
        "cp311-cp311-manylinux_2_29_x86_64",
        "cp312-cp312-manylinux_2_28_x86_64",
        "cp311-cp311-manylinux_2_28_aarch64",
        "cp311-cp311-musllinux_1_2_x86_64",
    ):
        assert refused not in tags
    assert tags.index("cp311-cp311-manylinux_2_28_x86_64") < tags.index("py3-none-any")


def test_selection_prefers_the_most_specific_compatible_wheel() -> None:
    package = locked(
        "delta",
        "1.0",
        "py3-none-any",
        "cp38-abi3-manylinux_2_17_x86_64",
        "cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64",
        "cp311-cp311-manylinux_2_34_x86_64",  # too new a glibc for the target
    )
    wheels, sdists = select_pip_artifacts([package], pip_env())
    assert [w.filename for w in wheels] == [
        "delta-1.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
    ]
    assert sdists == []
    mac, _ = select_pip_artifacts([package], pip_env(platform="macosx_14_0_arm64"))
    assert [w.filename for w in mac] == ["delta-1.0-py3-none-any.whl"]


def test_build_from_source_takes_the_sdist_and_normalizes_names() -> None:
    packages = [
        locked("Llama_CPP.Python", "0.3", sdist=True),
        locked("zeta", "1.0", "py3-none-any"),
    ]
    env = pip_env(build_from_source=["llama-cpp-python"])
    wheels, sdists = select_pip_artifacts(packages, env)
    assert [w.name for w in wheels] == ["zeta"]
    assert [(s.name, s.filename, s.sha256) for s in sdists] == [
        ("Llama_CPP.Python", "Llama_CPP.Python-0.3.tar.gz", "f" * 64)
    ]
    with pytest.raises(LockError, match="in build_from_source, but the lock has no sdist"):
        select_pip_artifacts(
            [locked("zeta", "1.0", MAC_WHEEL)], pip_env(build_from_source=["zeta"])
        )


# -- build --------------------------------------------------------------------------------------


def sdist_artifact(path: Path, name: str, version: str) -> Artifact:
    return Artifact(name, version, path.name, f"https://x.invalid/{path.name}", sha256(path))


@needs_setuptools
def test_build_wheels_makes_a_built_artifact_with_build_env(tmp_path: Path) -> None:
    made = make_flag_sdist(tmp_path / "dl")
    source = sdist_artifact(made, "flagged", "1.0")
    sdist = tmp_path / "cache" / source.sha256  # as builder.fetch keeps it: no file name
    sdist.parent.mkdir()
    shutil.copyfile(made, sdist)
    env = pip_env(python=PY, build_from_source=["flagged"], build_env={"AIRGAP_TEST_FLAG": "cuda"})

    ((artifact, wheel),) = build_wheels([(source, sdist)], env, tmp_path / "work")

    assert wheel.is_relative_to(tmp_path / "work")
    assert artifact.origin == "built"
    assert artifact.filename == wheel.name == "flagged-1.0-py3-none-any.whl"
    assert (artifact.name, artifact.version, artifact.url) == ("flagged", "1.0", source.url)
    assert artifact.source_sha256 == source.sha256
    assert artifact.sha256 == sha256(wheel) != source.sha256
    assert artifact.size == wheel.stat().st_size
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("flagged/flag.txt") == b"cuda"


@needs_setuptools
def test_build_wheels_is_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two builds of one sdist (seconds apart) give one wheel hash: SOURCE_DATE_EPOCH is set."""
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    sdist = make_flag_sdist(tmp_path / "dl")
    source = sdist_artifact(sdist, "flagged", "1.0")
    env = pip_env(python=PY)
    ((first, _),) = build_wheels([(source, sdist)], env, tmp_path / "one")
    time.sleep(1.1)  # zip times have a 2 s resolution; make "now" differ at least sometimes
    ((second, _),) = build_wheels([(source, sdist)], env, tmp_path / "two")
    assert first.sha256 == second.sha256


@needs_setuptools
def test_lock_select_build_and_install_offline(
    recipe: Path, index: str, local_server: LocalServer, uv_cache: Path, tmp_path: Path
) -> None:
    """The whole pip path: lock, select, build gamma from its sdist, then the host's own
    command (pip --no-index --require-hashes) installs from the install list."""
    env = pip_env(index_url=index, python=PY, build_from_source=["gamma"])
    if PY != "3.11":
        pytest.skip("the test index's platform wheels are cp311")
    wheels, sdists = select_pip_artifacts(load_pip_lock(lock_pip(recipe, env), env), env)
    downloads = [(s, www_file(local_server, s.filename)) for s in sdists]
    built = build_wheels(downloads, env, tmp_path / "work")
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    for artifact in wheels:
        shutil.copy(www_file(local_server, artifact.filename), wheel_dir)
    for _, path in built:
        shutil.copy(path, wheel_dir)
    install_list = tmp_path / "requirements.txt"
    install_list.write_bytes(pip_install_list([*wheels, *(a for a, _ in built)], target=X86))
    target = tmp_path / "site"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"),
            *("--no-index", "--require-hashes", "--no-deps", "--find-links", str(wheel_dir)),
            *("-r", str(install_list), "--target", str(target)),
        ],
        check=True,
    )
    assert sorted(p.name for p in target.glob("*.dist-info")) == [
        "alpha-1.0.dist-info",
        "beta-1.0.dist-info",
        "gamma-2.0.dist-info",
    ]


def test_build_wheels_rehashes_the_sdist(tmp_path: Path) -> None:
    sdist = make_sdist(tmp_path / "dl", "gamma", "2.0")
    source = Artifact("gamma", "2.0", sdist.name, "https://x.invalid/g", "a" * 64)
    with pytest.raises(ArtifactError, match=f"{sha256(sdist)} is not the locked {'a' * 64}"):
        build_wheels([(source, sdist)], pip_env(python=PY), tmp_path / "work")


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"python": "3.9" if PY != "3.9" else "3.10"}, "with this builder's Python"),
        ({"platform": "manylinux_2_28_riscv64"}, "on this linux/"),
        ({"platform": "win_amd64"}, "on this "),
    ],
)
def test_build_wheels_refuses_a_cross_build(
    tmp_path: Path, fields: dict[str, str], match: str
) -> None:
    sdist = make_sdist(tmp_path / "dl", "gamma", "2.0")
    with pytest.raises(LockError, match=match):
        build_wheels(
            [(sdist_artifact(sdist, "gamma", "2.0"), sdist)],
            pip_env(**({"python": PY} | fields)),
            tmp_path / "work",
        )
    assert not (tmp_path / "work").exists()


def test_build_failure_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "dl" / "broken-1.0.tar.gz"
    broken.parent.mkdir()
    broken.write_bytes(b"not a tarball")
    with pytest.raises(LockError, match=r"^building broken 1\.0 from its sdist failed: ") as caught:
        build_wheels(
            [(sdist_artifact(broken, "broken", "1.0"), broken)], pip_env(python=PY), tmp_path
        )
    assert "\n" not in str(caught.value)


# -- install list -------------------------------------------------------------------------------


def test_pip_install_list_is_sorted_and_deterministic() -> None:
    a = Artifact("Zeta_Pkg", "2.0", "zeta_pkg-2.0-py3-none-any.whl", "https://x/z", "b" * 64)
    b = Artifact("alpha", "1.0", "alpha-1.0-py3-none-any.whl", "https://x/a", "a" * 64)
    c = Artifact(
        "gamma",
        "2.0",
        "gamma-2.0-py3-none-any.whl",
        "https://x/g.tar.gz",
        "c" * 64,
        origin="built",
        source_sha256="d" * 64,
    )
    text = pip_install_list([a, b, c], target=f"{X86} / Python 3.11")
    assert text == pip_install_list([c, a, b], target=f"{X86} / Python 3.11")
    assert text.decode().splitlines() == [
        f"# Install list made by appliance-builder for {X86} / Python 3.11.",
        f"alpha==1.0 --hash=sha256:{'a' * 64}",
        f"gamma==2.0 --hash=sha256:{'c' * 64}",
        f"zeta-pkg==2.0 --hash=sha256:{'b' * 64}",
    ]
    sdist = Artifact("gamma", "2.0", "gamma-2.0.tar.gz", "https://x/g", "c" * 64)
    with pytest.raises(LockError, match="not a wheel"):
        pip_install_list([sdist])
    other = Artifact("alpha", "1.1", "alpha-1.1-py3-none-any.whl", "https://x/a2", "e" * 64)
    with pytest.raises(LockError, match="two versions"):
        pip_install_list([b, other])


# -- online -------------------------------------------------------------------------------------


@pytest.mark.online
def test_lock_and_fetch_a_small_set_from_pypi(recipe: Path, uv_cache: Path, tmp_path: Path) -> None:
    """The real registry: lock for the target, fetch by hash, install offline from the files."""
    from builder.cache import Cache
    from builder.fetch import fetch_all

    env = pip_env(requirements=["six==1.16.0", "typing-extensions==4.16.0"])
    lock = lock_pip(recipe, env, cache_dir=uv_cache)
    wheels, sdists = select_pip_artifacts(load_pip_lock(lock, env), env)
    assert [(w.name, w.version) for w in wheels] == [
        ("six", "1.16.0"),
        ("typing-extensions", "4.16.0"),
    ]
    assert all(w.url.startswith("https://files.pythonhosted.org/") for w in wheels)
    assert sdists == []
    fetched = fetch_all(wheels, Cache(tmp_path / "cache"), jobs=2)
    for wheel in wheels:
        assert hashlib.sha256(fetched[wheel.sha256].read_bytes()).hexdigest() == wheel.sha256
