"""builder.condaenv: conda environments locked for the target platform, read back as artifacts.

Real packages (tests/pkgfactory.py) in a real channel indexed by py-rattler, served from disk
(``file://``) and over loopback HTTP (tests/localhttp.py); real ``rattler.solve``; locks written
and parsed by conda_lock's own model. Nothing of the project is mocked.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import stat
from pathlib import Path

import pytest
import yaml
from conda_lock.lockfile import parse_conda_lock_file
from localhttp import LocalServer
from pkgfactory import make_conda_channel, make_conda_package

from builder.artifacts import Artifact
from builder.condaenv import (
    INSTALL_LIST_HEADER,
    conda_install_list,
    load_conda_artifacts,
    lock_conda,
    solve_specs,
    solver_on_path,
    target_virtual_packages,
)
from builder.recipe import CondaEnvironment
from signing.errors import FetchError, LockError


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A channel with a small graph: ``tool`` (noarch) needs ``libfoo >=1,<2`` (linux-64),
    of which 1.0 and 2.0 exist, so the solver must pick 1.0; two pythons; a package that
    needs a newer glibc than the target has, and one that needs CUDA. Read-only: shared by
    the module's tests."""
    tmp_path = tmp_path_factory.mktemp("conda")
    made = tmp_path / "made"
    packages = [
        make_conda_package(made, "libfoo", "1.0", build="h1_0", subdir="linux-64"),
        make_conda_package(made, "libfoo", "2.0", build="h1_0", subdir="linux-64"),
        make_conda_package(made / "arm", "libfoo", "1.0", build="h1_0", subdir="linux-aarch64"),
        make_conda_package(made, "tool", "0.9", depends=["libfoo"]),
        make_conda_package(made, "tool", "1.0", depends=["libfoo >=1,<2", "__glibc >=2.17"]),
        make_conda_package(made, "python", "3.11.9", build="h2_0", subdir="linux-64"),
        make_conda_package(made, "python", "3.12.4", build="h2_0", subdir="linux-64"),
        make_conda_package(made, "pyapp", "1.0", depends=["python >=3.10", "tool"]),
        make_conda_package(made, "newglibc", "1.0", subdir="linux-64", depends=["__glibc >=2.34"]),
        make_conda_package(made, "gpulib", "1.0", subdir="linux-64", depends=["__cuda >=12"]),
    ]
    return make_conda_channel(tmp_path / "channel", packages)


def conda_env(
    channels: list[str], specs: list[str], *, platform: str = "linux-64", python: str = "3.11"
) -> CondaEnvironment:
    return CondaEnvironment(
        type="conda", platform=platform, python=python, channels=channels, specs=specs
    )


def recipe_in(tmp_path: Path) -> Path:
    recipe = tmp_path / "project" / "demo.toml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text("# the recipe; lock_conda only uses its path\n")
    return recipe


def lock_with_rattler(tmp_path: Path, env: CondaEnvironment, **kwargs: object) -> Path:
    return lock_conda(
        recipe_in(tmp_path),
        env,
        backend="rattler",
        cache_dir=tmp_path / "rattler-cache",
        **kwargs,  # type: ignore[arg-type]
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- locking with rattler ---------------------------------------------------------------------


def test_rattler_lock_is_a_conda_lock_file_with_both_hashes(tmp_path: Path, channel: Path) -> None:
    env = conda_env([channel.as_uri()], ["tool"])
    lock = lock_with_rattler(tmp_path, env)

    assert lock == tmp_path / "project" / "demo.conda-lock.yml"  # env.lock_path(recipe)
    raw = yaml.safe_load(lock.read_text())
    assert raw["version"] == 1
    parsed = parse_conda_lock_file(lock)
    assert parsed.metadata.platforms == ["linux-64"]
    assert [c.url for c in parsed.metadata.channels] == [channel.as_uri()]
    assert parsed.metadata.sources == ["demo.toml"]
    by_name = {p.name: p for p in parsed.package}
    assert set(by_name) == {"tool", "libfoo"}  # no python forced in, no virtual packages
    assert by_name["tool"].version == "1.0"
    assert by_name["libfoo"].version == "1.0"  # 2.0 exists but tool 1.0 needs <2
    for package in parsed.package:
        assert package.manager == "conda"
        assert package.platform == "linux-64"
        assert re.fullmatch(r"[0-9a-f]{64}", package.hash.sha256)
        assert re.fullmatch(r"[0-9a-f]{32}", package.hash.md5)
    assert by_name["tool"].url == f"{channel.as_uri()}/noarch/tool-1.0-0.tar.bz2"
    assert by_name["tool"].dependencies["libfoo"] == ">=1,<2"
    assert "__glibc=2.28=0" in parsed.metadata.custom_metadata["virtual_packages"]


def test_lock_over_http_pins_the_served_files_sha256(
    tmp_path: Path, channel: Path, local_server: LocalServer
) -> None:
    shutil.copytree(channel, local_server.root / "chan")
    url = f"{local_server.url}/chan"
    env = conda_env([url], ["tool"])
    lock = lock_with_rattler(tmp_path, env, out=tmp_path / "out" / "conda-lock.yml")

    assert lock == tmp_path / "out" / "conda-lock.yml"
    assert any("repodata" in path for _, path, _ in local_server.requests)
    artifacts = load_conda_artifacts(lock, env)
    assert [(a.name, a.version, a.subdir) for a in artifacts] == [
        ("libfoo", "1.0", "linux-64"),
        ("tool", "1.0", "noarch"),
    ]
    for artifact in artifacts:
        served = local_server.root / "chan" / str(artifact.subdir) / artifact.filename
        data = served.read_bytes()
        assert artifact.sha256 == hashlib.sha256(data).hexdigest()
        assert artifact.md5 == hashlib.md5(data).hexdigest()  # noqa: S324 - what conda pins
        assert artifact.url == f"{url}/{artifact.subdir}/{artifact.filename}"
        assert artifact.origin == "index"


def test_python_is_pinned_to_the_recipe_python_only_when_asked_for(
    tmp_path: Path, channel: Path
) -> None:
    with_python = conda_env([channel.as_uri()], ["pyapp"], python="3.11")
    assert solve_specs(with_python) == ["pyapp"]  # pyapp needs python, the specs do not name it
    asked = conda_env([channel.as_uri()], ["python", "tool"], python="3.11")
    assert solve_specs(asked) == ["python", "tool", "python 3.11.*"]

    lock = lock_with_rattler(tmp_path, asked, out=tmp_path / "a.yml")
    versions = {a.name: a.version for a in load_conda_artifacts(lock, asked)}
    assert versions == {"python": "3.11.9", "tool": "1.0", "libfoo": "1.0"}  # not 3.12.4

    plain = conda_env([channel.as_uri()], ["tool"], python="3.12")
    lock = lock_with_rattler(tmp_path, plain, out=tmp_path / "b.yml")
    assert "python" not in {a.name for a in load_conda_artifacts(lock, plain)}


def test_locking_twice_gives_the_same_bytes(tmp_path: Path, channel: Path) -> None:
    env = conda_env([channel.as_uri()], ["tool", "python"])
    first = lock_with_rattler(tmp_path, env, out=tmp_path / "one.yml").read_bytes()
    second = lock_with_rattler(tmp_path, env, out=tmp_path / "two.yml").read_bytes()
    assert first.replace(b"one.yml", b"two.yml") == second


def test_lock_is_solved_for_the_target_platform_not_the_builder(
    tmp_path: Path, channel: Path
) -> None:
    env = conda_env([channel.as_uri()], ["tool"], platform="linux-aarch64")
    artifacts = load_conda_artifacts(lock_with_rattler(tmp_path, env), env)
    libfoo = next(a for a in artifacts if a.name == "libfoo")
    assert libfoo.subdir == "linux-aarch64"
    assert "/linux-aarch64/" in libfoo.url


def test_target_glibc_is_the_target_default_not_the_builders(tmp_path: Path, channel: Path) -> None:
    env = conda_env([channel.as_uri()], ["newglibc"])
    with pytest.raises(LockError, match=r"__glibc"):
        lock_with_rattler(tmp_path, env)


def test_cuda_is_only_there_when_asked_for(tmp_path: Path, channel: Path) -> None:
    env = conda_env([channel.as_uri()], ["gpulib"])
    with pytest.raises(LockError, match=r"__cuda"):
        lock_with_rattler(tmp_path, env, out=tmp_path / "cpu.yml")
    lock = lock_with_rattler(tmp_path, env, out=tmp_path / "gpu.yml", cuda="12.4")
    assert [a.name for a in load_conda_artifacts(lock, env)] == ["gpulib"]


def test_target_virtual_packages_follow_the_platform() -> None:
    def names(platform: str) -> dict[str, str]:
        return {p.name: f"{p.version} {p.build}" for p in target_virtual_packages(platform)}

    assert names("linux-aarch64") == {
        "__unix": "0 0",
        "__linux": "5.10 0",
        "__glibc": "2.28 0",
        "__archspec": "1 aarch64",
    }
    assert names("linux-64")["__archspec"] == "1 x86_64"
    assert names("osx-arm64") == {"__unix": "0 0", "__osx": "11.0 0", "__archspec": "1 arm64"}
    assert names("win-64") == {"__win": "0 0", "__archspec": "1 x86_64"}
    cuda = target_virtual_packages("linux-64", cuda="12.4", glibc="2.34")
    assert {(p.name, p.version) for p in cuda} >= {("__cuda", "12.4"), ("__glibc", "2.34")}


# --- lock failures ----------------------------------------------------------------------------


def test_unsolvable_specs_raise_lock_error_with_the_reason(tmp_path: Path, channel: Path) -> None:
    env = conda_env([channel.as_uri()], ["tool >=1", "libfoo >=2"])
    with pytest.raises(LockError) as info:
        lock_with_rattler(tmp_path, env)
    message = info.value.diagnostics()
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2
    assert "linux-64" in message
    assert "libfoo >=1,<2" in message  # the solver's key line: what tool 1.0 requires
    assert not env.lock_path(recipe_in(tmp_path)).exists()


def test_missing_package_raises_lock_error_naming_it(tmp_path: Path, channel: Path) -> None:
    env = conda_env([channel.as_uri()], ["nosuchpkg"])
    with pytest.raises(LockError, match=r"nosuchpkg"):
        lock_with_rattler(tmp_path, env)


def test_unreachable_http_channel_raises_fetch_error_naming_it(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/chan"
    env = conda_env([url], ["tool"])
    with pytest.raises(FetchError) as info:
        lock_with_rattler(tmp_path, env)
    assert info.value.exit_code == 9
    assert f"{url}/" in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_channel_raises_fetch_error(tmp_path: Path, channel: Path) -> None:
    missing = (tmp_path / "nowhere").as_uri()
    env = conda_env([channel.as_uri(), missing], ["tool"])
    with pytest.raises(FetchError, match=re.escape(missing)):
        lock_with_rattler(tmp_path, env)


def test_failed_lock_leaves_the_existing_lock_and_no_debris(tmp_path: Path, channel: Path) -> None:
    good = conda_env([channel.as_uri()], ["tool"])
    lock = lock_with_rattler(tmp_path, good)
    before = lock.read_bytes()
    bad = conda_env([channel.as_uri()], ["tool >=1", "libfoo >=2"])
    with pytest.raises(LockError):
        lock_with_rattler(tmp_path, bad)
    assert lock.read_bytes() == before
    assert sorted(p.name for p in lock.parent.iterdir()) == ["demo.conda-lock.yml", "demo.toml"]


# --- reading locks ----------------------------------------------------------------------------


@pytest.fixture
def locked(tmp_path: Path, channel: Path) -> tuple[Path, CondaEnvironment]:
    env = conda_env([channel.as_uri()], ["tool"])
    return lock_with_rattler(tmp_path, env), env


def test_lock_for_another_platform_is_refused_naming_both(
    locked: tuple[Path, CondaEnvironment],
) -> None:
    lock, env = locked
    other = env.model_copy(update={"platform": "linux-aarch64"})
    with pytest.raises(LockError) as info:
        load_conda_artifacts(lock, other)
    assert str(info.value) == (
        f"lock {lock} has no packages for linux-aarch64 (it covers linux-64)"
    )


def _edit_lock(lock: Path, edit: object) -> Path:
    data = yaml.safe_load(lock.read_text())
    edit(data)  # type: ignore[operator]
    lock.write_text(yaml.safe_dump(data, sort_keys=False))
    return lock


def test_package_without_sha256_is_refused(locked: tuple[Path, CondaEnvironment]) -> None:
    lock, env = locked

    def drop_sha256(data: dict[str, list[dict[str, dict[str, str]]]]) -> None:
        del data["package"][0]["hash"]["sha256"]

    _edit_lock(lock, drop_sha256)
    assert parse_conda_lock_file(lock)  # conda_lock itself accepts md5 alone; we do not
    with pytest.raises(LockError, match=r"has no sha256 \(md5 alone is not accepted\)"):
        load_conda_artifacts(lock, env)


def test_pip_entries_are_refused(locked: tuple[Path, CondaEnvironment]) -> None:
    lock, env = locked

    def add_pip(data: dict[str, list[dict[str, object]]]) -> None:
        data["package"].append(
            {
                "name": "requests",
                "version": "2.32.0",
                "manager": "pip",
                "platform": "linux-64",
                "dependencies": {},
                "url": "https://files.example/requests-2.32.0-py3-none-any.whl",
                "hash": {"sha256": "a" * 64},
                "category": "main",
                "optional": False,
            }
        )

    _edit_lock(lock, add_pip)
    with pytest.raises(LockError, match=r"pip packages \(requests\).*pip environment"):
        load_conda_artifacts(lock, env)


def test_package_url_in_a_foreign_subdir_is_refused(
    locked: tuple[Path, CondaEnvironment],
) -> None:
    lock, env = locked

    def move(data: dict[str, list[dict[str, str]]]) -> None:
        for package in data["package"]:
            package["url"] = package["url"].replace("/linux-64/", "/linux-aarch64/")

    _edit_lock(lock, move)
    with pytest.raises(LockError, match=r"not in the linux-64 or noarch subdir"):
        load_conda_artifacts(lock, env)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "does not exist"),
        ("package: [\n", "not valid YAML"),
        ("- just\n- a list\n", "not a conda-lock file"),
        ("version: 7\npackage: []\n", "not a conda-lock file"),
        ("version: 1\npackage: []\n", "not a conda-lock file: metadata"),
    ],
)
def test_unreadable_locks_are_lock_errors(tmp_path: Path, content: str | None, reason: str) -> None:
    lock = tmp_path / "conda-lock.yml"
    if content is not None:
        lock.write_text(content)
    env = conda_env(["file:///nowhere"], ["tool"])
    with pytest.raises(LockError, match=re.escape(reason)) as info:
        load_conda_artifacts(lock, env)
    assert "\n" not in str(info.value)


def test_a_multi_platform_conda_lock_gives_the_target_platform_only(tmp_path: Path) -> None:
    """A lock made by anyone's conda-lock, for two platforms, as conda-lock writes it."""
    sha = {name: hashlib.sha256(name.encode()).hexdigest() for name in ("a", "b", "c")}
    md5 = hashlib.md5(b"any").hexdigest()  # noqa: S324
    base = "https://conda.anaconda.org/conda-forge"
    lock = tmp_path / "conda-lock.yml"
    lock.write_text(
        f"""\
version: 1
metadata:
  content_hash:
    linux-64: x
    osx-arm64: y
  channels:
  - url: conda-forge
    used_env_vars: []
  platforms:
  - linux-64
  - osx-arm64
  sources:
  - environment.yml
package:
- name: zlib
  version: 1.3.1
  manager: conda
  platform: linux-64
  dependencies: {{}}
  url: {base}/linux-64/zlib-1.3.1-hb9d3cd8_2.conda
  hash:
    md5: {md5}
    sha256: {sha["a"]}
  category: main
  optional: false
- name: tzdata
  version: 2025b
  manager: conda
  platform: linux-64
  dependencies: {{}}
  url: {base}/noarch/tzdata-2025b-h78e105d_0.conda
  hash:
    md5: {md5}
    sha256: {sha["b"]}
  category: main
  optional: false
- name: zlib
  version: 1.3.1
  manager: conda
  platform: osx-arm64
  dependencies: {{}}
  url: {base}/osx-arm64/zlib-1.3.1-h8359307_2.conda
  hash:
    md5: {md5}
    sha256: {sha["c"]}
  category: main
  optional: false
"""
    )
    env = conda_env(["conda-forge"], ["zlib", "tzdata"])
    assert load_conda_artifacts(lock, env) == [
        Artifact(
            name="tzdata",
            version="2025b",
            filename="tzdata-2025b-h78e105d_0.conda",
            url=f"{base}/noarch/tzdata-2025b-h78e105d_0.conda",
            sha256=sha["b"],
            md5=md5,
            subdir="noarch",
        ),
        Artifact(
            name="zlib",
            version="1.3.1",
            filename="zlib-1.3.1-hb9d3cd8_2.conda",
            url=f"{base}/linux-64/zlib-1.3.1-hb9d3cd8_2.conda",
            sha256=sha["a"],
            md5=md5,
            subdir="linux-64",
        ),
    ]
    win = env.model_copy(update={"platform": "win-64"})
    with pytest.raises(
        LockError, match=r"no packages for win-64 \(it covers linux-64, osx-arm64\)"
    ):
        load_conda_artifacts(lock, win)


# --- the install list -------------------------------------------------------------------------


def test_install_list_is_sorted_relative_and_deterministic(
    locked: tuple[Path, CondaEnvironment],
) -> None:
    lock, env = locked
    artifacts = load_conda_artifacts(lock, env)
    listing = conda_install_list(artifacts)
    assert listing == conda_install_list(list(reversed(artifacts)))
    lines = listing.decode().splitlines()
    assert lines[0] == INSTALL_LIST_HEADER
    assert "# platform: linux-64" in lines
    body = lines[lines.index("@EXPLICIT") + 1 :]
    by_name = {a.name: a for a in artifacts}
    assert body == [
        f"linux-64/libfoo-1.0-h1_0.tar.bz2#sha256:{by_name['libfoo'].sha256}",
        f"noarch/tool-1.0-0.tar.bz2#sha256:{by_name['tool'].sha256}",
    ]
    assert all(not line.startswith("@") for line in lines if line != "@EXPLICIT")
    assert listing.endswith(b"\n")


def test_install_list_refuses_one_file_with_two_hashes() -> None:
    one = Artifact("a", "1", "a-1-0.tar.bz2", "file:///c/noarch/a-1-0.tar.bz2", "1" * 64)
    one = Artifact(**{**one.__dict__, "subdir": "noarch"})
    other = Artifact(**{**one.__dict__, "sha256": "2" * 64})
    assert conda_install_list([one, one]).count(b"#sha256:") == 1
    with pytest.raises(ValueError, match="two different sha256"):
        conda_install_list([one, other])
    with pytest.raises(ValueError, match="no conda subdir"):
        conda_install_list([Artifact(**{**one.__dict__, "subdir": None})])


# --- the conda-lock tool path -----------------------------------------------------------------


def _fake_executable(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\nexit 1\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_solver_on_path_finds_micromamba_mamba_or_conda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty, bins = tmp_path / "empty", tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert solver_on_path() is None
    conda = _fake_executable(bins, "conda")
    monkeypatch.setenv("PATH", os.pathsep.join([str(empty), str(bins)]))
    assert solver_on_path() == str(conda)
    micromamba = _fake_executable(bins, "micromamba")
    assert solver_on_path() == str(micromamba)  # preferred


def test_conda_lock_backend_without_a_solver_is_a_lock_error(
    tmp_path: Path, channel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    env = conda_env([channel.as_uri()], ["tool"])
    with pytest.raises(LockError, match="conda, mamba or micromamba"):
        lock_conda(recipe_in(tmp_path), env, backend="conda-lock")


@pytest.mark.skipif(
    solver_on_path() is None, reason="no conda, mamba or micromamba on PATH for conda-lock"
)
def test_conda_lock_tool_path_writes_the_same_kind_of_lock(tmp_path: Path, channel: Path) -> None:
    env = conda_env([channel.as_uri()], ["tool"])
    lock = lock_conda(recipe_in(tmp_path), env, backend="conda-lock")
    parsed = parse_conda_lock_file(lock)
    assert parsed.metadata.platforms == ["linux-64"]
    assert "conda-lock" in parsed.metadata.custom_metadata["locked_by"]
    artifacts = load_conda_artifacts(lock, env)
    assert {(a.name, a.version) for a in artifacts} == {("tool", "1.0"), ("libfoo", "1.0")}
    for artifact in artifacts:
        data = (channel / str(artifact.subdir) / artifact.filename).read_bytes()
        assert artifact.sha256 == hashlib.sha256(data).hexdigest()


FAKE_SOLVER = """#!/bin/sh
# A stand-in micromamba: conda-lock asks its version, then runs the dry-run solve.
if [ "$1" = "--version" ]; then echo 2.0.5; exit 0; fi
echo "$@" >> "{args}"
printf '%s\\n' '{{"message": "{message}"}}'
exit 1
"""


@pytest.mark.parametrize(
    "case",
    [
        ("nothing provides libbar needed by tool-1.0-0", LockError, "nothing provides libbar"),
        (
            "CondaHTTPError: HTTP 000 CONNECTION FAILED for url <{channel}/noarch/repodata.json>",
            FetchError,
            "cannot fetch repodata from conda channel {channel}/",
        ),
    ],
    ids=["unsolvable", "unreachable"],
)
def test_conda_lock_tool_is_driven_with_the_target_and_its_failures_mapped(
    tmp_path: Path,
    channel: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: tuple[str, type[Exception], str],
) -> None:
    """Real conda-lock, run by lock_conda, with a stand-in solver that refuses: what conda-lock
    passes on, and what the solver says, must come back as one line of the right error."""
    message, error, expected = case
    args = tmp_path / "args"
    message = message.format(channel=channel.as_uri())
    solver = tmp_path / "bin" / "micromamba"
    solver.parent.mkdir()
    solver.write_text(FAKE_SOLVER.format(args=args, message=message))
    solver.chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(solver.parent), os.environ["PATH"]]))
    env = conda_env([channel.as_uri()], ["tool"], platform="linux-aarch64")
    with pytest.raises(error) as info:
        lock_conda(recipe_in(tmp_path), env)  # auto: a solver is on PATH, so conda-lock
    assert expected.format(channel=channel.as_uri()) in str(info.value)
    assert "\n" not in str(info.value)
    dry_run = args.read_text()
    assert "--dry-run" in dry_run
    assert f"--channel {channel.as_uri()} " in dry_run
    assert dry_run.rstrip().endswith(" tool")
    assert not env.lock_path(recipe_in(tmp_path)).exists()
