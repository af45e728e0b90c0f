"""Install step I7: a bundle's package environment, set up offline inside the new slot.

Real wheels and conda packages (tests/pkgfactory.py), real pip and py-rattler, the real
installer: a good environment lands in ``SLOT/env``; a bad one (a wheel or a dependency missing
from the bundle, a failed smoke import, the wrong Python, a conda package whose pinned sha256
disagrees with the signed manifest) is refused with exit 8 and one line naming the culprit,
and the host is left exactly as it was. See docs/adr/0007-package-environments.md.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import appliance, assert_error, clean_env, ok
from pkgfactory import make_conda_channel, make_conda_package, make_wheel
from simulator import DEFAULT_FILES, BundleSimulator, Host

from appliance.envsetup import PTH_NAME
from appliance.installer import InstallOptions
from appliance.slots import env_python
from signing.errors import EnvironmentSetupError
from signing.manifest import EnvironmentSpec

HOST_PY = f"{sys.version_info.major}.{sys.version_info.minor}"
PIP_LIST = "env/requirements.txt"
CONDA_LIST = "env/conda-explicit.txt"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pip_bundle(
    sim: BundleSimulator,
    wheels: Sequence[Path],
    *,
    version: str = "1.0.0",
    listed: Sequence[str] = (),
    smoke: Sequence[str] = (),
    python: str = HOST_PY,
    model: Mapping[str, bytes] | None = None,
) -> bytes:
    """A signed bundle with a pip environment: every wheel in ``env/wheels/`` and pinned in
    the install list, plus ``listed`` lines verbatim (requirements without a wheel)."""
    files = dict(model if model is not None else DEFAULT_FILES)
    lines = []
    for wheel in wheels:
        data = wheel.read_bytes()
        files[f"env/wheels/{wheel.name}"] = data
        name, wheel_version = wheel.name.split("-")[:2]
        lines.append(f"{name}=={wheel_version} --hash=sha256:{_sha(data)}")
    files[PIP_LIST] = ("\n".join([*lines, *listed]) + "\n").encode()
    spec = EnvironmentSpec(
        type="pip",
        platform="linux_x86_64",
        python=python,
        install_list=PIP_LIST,
        packages="env/wheels",
        smoke_imports=tuple(smoke),
    )
    manifest, payload = sim.manifest(version=version, files=files, environment=spec)
    return sim.bundle_bytes(manifest, payload)


def conda_bundle(
    sim: BundleSimulator,
    packages: Sequence[Path],
    *,
    version: str = "1.0.0",
    listed: Sequence[str] = (),
    wrong_sha: str | None = None,
    smoke: Sequence[str] = (),
    repodata: bytes | None = None,
) -> bytes:
    """A signed bundle with a conda environment over ``packages`` (noarch), each listed with
    its sha256 (``wrong_sha``: that file's line pins another hash), plus ``listed`` lines;
    with ``repodata``, the channel's ``noarch/repodata.json`` as the builder ships it."""
    files = dict(DEFAULT_FILES)
    if repodata is not None:
        files["env/conda/noarch/repodata.json"] = repodata
    lines = ["@EXPLICIT"]
    for package in packages:
        data = package.read_bytes()
        files[f"env/conda/noarch/{package.name}"] = data
        digest = _sha(data + b"tampered") if package.name == wrong_sha else _sha(data)
        lines.append(f"noarch/{package.name}#sha256:{digest}")
    files[CONDA_LIST] = ("\n".join([*lines, *listed]) + "\n").encode()
    spec = EnvironmentSpec(
        type="conda",
        platform="noarch",
        python=HOST_PY,
        install_list=CONDA_LIST,
        packages="env/conda",
        smoke_imports=tuple(smoke),
    )
    manifest, payload = sim.manifest(version=version, files=files, environment=spec)
    return sim.bundle_bytes(manifest, payload)


def assert_refused(host: Host, bundle: bytes, *fragments: str) -> str:
    """Install ``bundle`` over an active 1.0.0: exit 8, one line naming every fragment, no
    staging left, the host byte-identical, the refusal in the audit log."""
    if not host.snapshot()["slots"]:
        host.install(host.sim.bundle("1.0.0"))
    before = host.snapshot()
    with pytest.raises(EnvironmentSetupError) as caught:
        host.install(bundle)
    message = caught.value.diagnostics()
    assert caught.value.exit_code == 8
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert host.staging_entries() == []
    assert host.snapshot() == before
    record = host.last_audit()
    assert (record["event"], record["outcome"], record["error"]) == ("install", "failed", message)
    assert "environment" not in record
    return message


def run_python(python: Path, code: str) -> str:
    result = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# -- pip ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    tool = "#!python\nimport alpha\nprint('alpha-tool', alpha.__version__)\n"
    return {
        "alpha": make_wheel(
            out,
            "alpha",
            "1.0",
            requires=["beta"],
            files={
                "alpha/__init__.py": "import beta\n__version__ = '1.0'\n",
                "alpha-1.0.data/scripts/alpha-tool": tool,
            },
        ),
        "beta": make_wheel(out, "beta", "2.0"),
        "broken": make_wheel(
            out,
            "broken",
            "0.1",
            files={"broken/__init__.py": "raise ImportError('needs libbroken.so.1')\n"},
        ),
    }


def test_pip_env_is_installed_in_the_slot(host: Host, wheels: dict[str, Path]) -> None:
    bundle = pip_bundle(host.sim, [wheels["alpha"], wheels["beta"]], smoke=["alpha", "beta"])
    slot = host.install(bundle)
    env = slot.path / "env"
    python = env_python(slot.path)
    assert python == env / "bin" / "python"
    # The wheels are the venv's own; the host's packages come after them, through the .pth.
    where = run_python(
        python,
        "import alpha, beta, appliance, sys; "
        "print(alpha.__file__); print(beta.__file__); print(sys.prefix)",
    )
    site = env / "lib" / f"python{HOST_PY}" / "site-packages"
    assert where.splitlines() == [
        str(site / "alpha" / "__init__.py"),
        str(site / "beta" / "__init__.py"),
        str(env),
    ]
    assert (site / PTH_NAME).is_file()
    order = run_python(python, "import sys; print('\\n'.join(sys.path))").splitlines()
    host_site = next(p for p in sys.path if p.endswith("site-packages"))
    assert order.index(str(site)) < order.index(host_site)
    # Scripts point at the shared environment itself, not at staging/ (gone since the rename)
    # nor at this slot (the environment may outlive it).
    script = env / "bin" / "alpha-tool"
    shebang = script.read_text().splitlines()[0]
    assert shebang == f"#!{env.resolve()}/bin/python"
    assert env.resolve().parent == host.root / "envs"
    tool = subprocess.run([shebang[2:], script], capture_output=True, text=True)
    assert tool.stdout.strip() == "alpha-tool 1.0", tool.stderr
    assert sorted(p.name for p in slot.path.iterdir()) == ["bundle", "env", "payload", "slot.json"]
    record = host.last_audit()
    assert record["outcome"] == "ok"
    summary = record["environment"]
    assert (summary["type"], summary["packages"], summary["reused"]) == ("pip", 2, False)
    assert isinstance(summary["milliseconds"], int)


def test_an_unchanged_environment_is_shared_not_reinstalled(
    host: Host, wheels: dict[str, Path]
) -> None:
    """Two versions that pin the same wheels share one environment (by its key); a third
    with other wheels gets its own; when the slots that used one are gone, so is it."""
    both = [wheels["alpha"], wheels["beta"]]
    first = host.install(pip_bundle(host.sim, both, smoke=["alpha"]))
    made = host.last_audit()["environment"]
    second = host.install(pip_bundle(host.sim, both, version="1.1.0", smoke=["alpha"]))
    reused = host.last_audit()["environment"]
    assert (made["reused"], reused["reused"]) == (False, True)
    assert reused["key"] == made["key"] and reused["packages"] == 2
    shared = (first.path / "env").resolve()
    assert (second.path / "env").resolve() == shared
    assert run_python(second.path / "env" / "bin" / "python", "import alpha; print('ok')") == "ok"
    # Other wheels: another environment. Keeping only the newest slot removes the first one.
    third = host.install(
        pip_bundle(host.sim, [wheels["beta"]], version="1.2.0"),
        InstallOptions(skip_health_check=True, keep=1),
    )
    assert host.last_audit()["environment"]["reused"] is False
    assert [p.name for p in (host.root / "envs").iterdir()] == [(third.path / "env").resolve().name]
    assert not shared.exists()


def test_a_half_made_shared_environment_is_made_again(host: Host, wheels: dict[str, Path]) -> None:
    """A crash during I7 leaves an environment without its completion mark: never reused."""
    bundle = pip_bundle(host.sim, [wheels["beta"]], smoke=["beta"])
    slot = host.install(bundle)
    shared = (slot.path / "env").resolve()
    (shared / ".appliance-complete").unlink()
    (shared / "bin" / "python").unlink()  # and it is broken
    again = host.install(pip_bundle(host.sim, [wheels["beta"]], version="1.1.0", smoke=["beta"]))
    assert host.last_audit()["environment"]["reused"] is False
    assert run_python(again.path / "env" / "bin" / "python", "import beta; print('ok')") == "ok"


def test_a_wheel_missing_from_the_bundle_is_named(host: Host, wheels: dict[str, Path]) -> None:
    gamma = f"gamma==3.1 --hash=sha256:{'ab' * 32}"
    bundle = pip_bundle(host.sim, [wheels["beta"]], version="2.0.0", listed=[gamma])
    message = assert_refused(host, bundle)
    assert message == "package gamma==3.1 is missing from the bundle (env/wheels)"


def test_a_wheel_that_does_not_match_its_pin_is_named(host: Host, wheels: dict[str, Path]) -> None:
    # Signed and intact, but the install list pins beta's wheel to other bytes.
    beta = wheels["beta"].read_bytes()
    pin = f"beta==2.0 --hash=sha256:{_sha(beta + b'other')}"
    files = dict(DEFAULT_FILES) | {
        f"env/wheels/{wheels['beta'].name}": beta,
        PIP_LIST: (pin + "\n").encode(),
    }
    spec = EnvironmentSpec(
        type="pip",
        platform="linux_x86_64",
        python=HOST_PY,
        install_list=PIP_LIST,
        packages="env/wheels",
    )
    manifest, payload = host.sim.manifest(version="2.0.0", files=files, environment=spec)
    message = assert_refused(host, host.sim.bundle_bytes(manifest, payload))
    assert message == (
        f"package beta==2.0: its wheel does not match the sha256 pinned by the install list "
        f"{PIP_LIST}"
    )


def test_a_dependency_missing_from_the_bundle_is_named(host: Host, wheels: dict[str, Path]) -> None:
    bundle = pip_bundle(host.sim, [wheels["alpha"]], version="2.0.0")
    message = assert_refused(host, bundle)
    assert message == "package beta (required by alpha 1.0) is missing from the bundle (env/wheels)"


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        ("broken", "ImportError: needs libbroken.so.1"),
        # click is installed on the host, not in the bundle: the smoke test must not see it.
        ("click", "ModuleNotFoundError: No module named 'click'"),
    ],
)
def test_a_failed_smoke_import_is_named(
    host: Host, wheels: dict[str, Path], module: str, reason: str
) -> None:
    bundle = pip_bundle(
        host.sim, [wheels["beta"], wheels["broken"]], version="2.0.0", smoke=["beta", module]
    )
    message = assert_refused(host, bundle)
    assert message == f"smoke import of {module!r} failed: {reason}"


def test_a_bundle_for_another_python_is_refused(host: Host, wheels: dict[str, Path]) -> None:
    other = f"3.{sys.version_info.minor + 1}"
    bundle = pip_bundle(host.sim, [wheels["beta"]], version="2.0.0", python=other)
    message = assert_refused(host, bundle)
    assert message == f"bundle targets Python {other}; this appliance runs {HOST_PY}"


# -- conda --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conda_packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("conda")
    site = f"lib/python{HOST_PY}/site-packages"
    return {
        "libdemo": make_conda_package(
            out, "libdemo", "1.2.3", files={"lib/libdemo.txt": b"demo library\n"}
        ),
        "pydemo": make_conda_package(
            out,
            "pydemo",
            "0.5",
            depends=["libdemo 1.2.3"],
            files={f"{site}/pydemo/__init__.py": b"VALUE = 42\n"},
        ),
        "extra": make_conda_package(out, "extra", "1.0"),
    }


def test_conda_env_is_installed_in_the_slot(host: Host, conda_packages: dict[str, Path]) -> None:
    chosen = [conda_packages["libdemo"], conda_packages["pydemo"]]
    slot = host.install(conda_bundle(host.sim, chosen, smoke=["pydemo"]))
    env = slot.path / "env"
    assert (env / "lib" / "libdemo.txt").read_bytes() == b"demo library\n"
    module = env / "lib" / f"python{HOST_PY}" / "site-packages" / "pydemo" / "__init__.py"
    assert module.read_bytes() == b"VALUE = 42\n"
    meta = sorted(p.name for p in (env / "conda-meta").glob("*.json"))
    assert meta == ["libdemo-1.2.3-0.json", "pydemo-0.5-0.json"]
    # No interpreter in this env: the backend runs under the appliance's own.
    assert env_python(slot.path) is None
    # Scratch space (the package cache) is gone: the slot holds what every slot holds, + env.
    assert sorted(p.name for p in slot.path.iterdir()) == ["bundle", "env", "payload", "slot.json"]
    summary = host.last_audit()["environment"]
    assert (summary["type"], summary["packages"]) == ("conda", 2)


def test_conda_package_pinned_differently_from_the_manifest_is_named(
    host: Host, conda_packages: dict[str, Path]
) -> None:
    chosen = [conda_packages["libdemo"], conda_packages["pydemo"]]
    bundle = conda_bundle(host.sim, chosen, version="2.0.0", wrong_sha="pydemo-0.5-0.tar.bz2")
    message = assert_refused(host, bundle, "package pydemo-0.5-0.tar.bz2", "signed in the manifest")
    assert "libdemo" not in message


def test_conda_package_missing_from_the_bundle_is_named(
    host: Host, conda_packages: dict[str, Path]
) -> None:
    absent = f"noarch/{conda_packages['extra'].name}#sha256:{'cd' * 32}"
    bundle = conda_bundle(host.sim, [conda_packages["libdemo"]], version="2.0.0", listed=[absent])
    message = assert_refused(host, bundle)
    assert message == "package extra-1.0-0.tar.bz2 is missing from the bundle (env/conda)"


def test_conda_smoke_import_sees_only_the_env(host: Host, conda_packages: dict[str, Path]) -> None:
    bundle = conda_bundle(host.sim, [conda_packages["libdemo"]], version="2.0.0", smoke=["pydemo"])
    message = assert_refused(host, bundle)
    assert (
        message == "smoke import of 'pydemo' failed: ModuleNotFoundError: No module named 'pydemo'"
    )


def _repodata(tmp_path: Path, packages: Sequence[Path]) -> dict[str, Any]:
    channel = make_conda_channel(tmp_path / "channel", packages)
    data: dict[str, Any] = json.loads((channel / "noarch" / "repodata.json").read_bytes())
    return data


def test_conda_records_come_from_the_shipped_repodata(
    host: Host, conda_packages: dict[str, Path], tmp_path: Path
) -> None:
    chosen = [conda_packages["libdemo"], conda_packages["pydemo"]]
    repodata = _repodata(tmp_path, chosen)
    slot = host.install(
        conda_bundle(host.sim, chosen, smoke=["pydemo"], repodata=json.dumps(repodata).encode())
    )
    assert (slot.path / "env" / "lib" / "libdemo.txt").read_bytes() == b"demo library\n"
    # The records are data: one whose sha256 is not the signed one is refused, which also
    # shows that this path, not the packages' own index.json, made the records.
    record = repodata["packages"]["pydemo-0.5-0.tar.bz2"]
    record["sha256"] = "ab" * 32
    bundle = conda_bundle(host.sim, chosen, version="2.0.0", repodata=json.dumps(repodata).encode())
    message = assert_refused(host, bundle)
    assert message == (
        f"package pydemo-0.5-0.tar.bz2: repodata sha256 {'ab' * 32} is not the signed "
        f"{hashlib.sha256(conda_packages['pydemo'].read_bytes()).hexdigest()}"
    )


def test_a_package_missing_from_the_shipped_repodata_is_named(
    host: Host, conda_packages: dict[str, Path], tmp_path: Path
) -> None:
    repodata = _repodata(tmp_path, [conda_packages["libdemo"]])
    chosen = [conda_packages["libdemo"], conda_packages["pydemo"]]
    bundle = conda_bundle(host.sim, chosen, version="2.0.0", repodata=json.dumps(repodata).encode())
    assert assert_refused(host, bundle) == (
        "package pydemo-0.5-0.tar.bz2 is missing from the bundle's noarch/repodata.json"
    )


# -- the health check runs in the slot's env ----------------------------------------------------


def test_health_check_runs_under_the_slot_env_python(
    host: Host, wheels: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("llama_cpp", reason="the health check loads the model with llama.cpp")
    from builder.tinymodel import write_tiny_llama

    gguf = tmp_path / "tiny.gguf"
    write_tiny_llama(gguf)
    # A sitecustomize in the env logs which interpreter starts: only the env's python sees it.
    log = tmp_path / "starts.log"
    spy = make_wheel(
        tmp_path / "spy",
        "spy",
        "1.0",
        files={
            "sitecustomize.py": (
                "import os, sys\n"
                "with open(os.environ['ENV_SPY_LOG'], 'a') as f:\n"
                "    f.write(sys.executable + ' ' + ' '.join(sys.argv) + '\\n')\n"
            )
        },
    )
    monkeypatch.setenv("ENV_SPY_LOG", str(log))
    model = {"model/tiny.gguf": gguf.read_bytes(), "recipe.toml": DEFAULT_FILES["recipe.toml"]}
    bundle = pip_bundle(host.sim, [wheels["beta"], spy], smoke=["beta"], model=model)
    slot = host.install(bundle, InstallOptions())
    assert host.last_audit()["health_check"] == "ok"
    # The health check ran before the commit, from staging/, under the env's interpreter.
    staging = host.root / "staging" / slot.id
    starts = log.read_text().splitlines()
    assert [line for line in starts if line.endswith(f" -m {staging}")] == [
        f"{staging}/env/bin/python -m {staging}"
    ], starts


# -- offline, through the CLI -------------------------------------------------------------------


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def test_pip_env_install_from_the_cli_with_no_network(
    tmp_path: Path, sim: BundleSimulator, wheels: dict[str, Path]
) -> None:
    if not _unshare_works():
        pytest.skip("'unshare -n true' fails here (needs root or user namespaces)")
    nonet = ["unshare", "-n"]
    root_json = tmp_path / "root.json"
    root_json.write_bytes(sim.root_bytes())
    good = tmp_path / "good.tar"
    good.write_bytes(pip_bundle(sim, [wheels["alpha"], wheels["beta"]], smoke=["alpha"]))
    bad = tmp_path / "bad.tar"
    bad.write_bytes(pip_bundle(sim, [wheels["alpha"]], version="2.0.0"))
    host = tmp_path / "host"
    # The caller's pip settings point at a network index: they must not matter.
    env = clean_env(
        PIP_INDEX_URL="http://192.0.2.1/simple", PIP_FIND_LINKS="http://192.0.2.1/wheels"
    )
    fingerprint = sim.signed_root.fingerprint
    ok(appliance(host, "trust", "init", root_json, "--fingerprint", fingerprint, prefix=nonet))
    ok(appliance(host, "install", good, prefix=nonet, env=env))
    python = host / "current" / "env" / "bin" / "python"
    assert run_python(python, "import alpha; print(alpha.__version__)") == "1.0"
    assert_error(
        appliance(host, "install", bad, prefix=nonet, env=env),
        8,
        "package beta (required by alpha 1.0) is missing from the bundle",
    )
