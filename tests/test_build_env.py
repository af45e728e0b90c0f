"""``appliance-builder lock`` and ``build`` with environments and hub models, end to end.

Real console scripts, a real package index and conda channel on loopback (tests/localhttp.py),
real wheels, sdists and conda packages (tests/pkgfactory.py), real uv, py-rattler, pip and
huggingface_hub, and a real hub lookalike (tests/hubserver.py). Each bad input must end in one
line and its documented exit code, with no bundle written.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import appliance, assert_error, builder, clean_env, new_key, ok
from hubserver import HubServer
from localhttp import LocalServer
from pipenv_helpers import closed_port_url, serve_index
from pkgfactory import make_conda_channel, make_conda_package, make_sdist, make_wheel

from builder.tinymodel import write_tiny_llama

EPOCH = 1_767_225_600  # 2026-01-01


class Project:
    """A recipe directory, a signing key, a private cache, and the environment to run in."""

    def __init__(self, tmp_path: Path, server: LocalServer) -> None:
        self.dir = tmp_path / "project"
        self.dir.mkdir()
        self.server = server
        (tmp_path / "keys").mkdir()
        self.key = new_key(tmp_path / "keys" / "signer.pem")
        self.cache = tmp_path / "cache"
        (self.dir / "model.bin").write_bytes(b"weights" * 100)
        self.env = {  # other tests may have set the hub client's offline switches
            k: v
            for k, v in clean_env(
                AIRGAP_APPLIANCE_CACHE=str(self.cache),
                UV_CACHE_DIR=str(tmp_path / "uv-cache"),
                SOURCE_DATE_EPOCH=str(EPOCH),
            ).items()
            if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
        }

    def recipe(self, environment: str, *, model: str = 'path = "model.bin"') -> Path:
        path = self.dir / "recipe.toml"
        path.write_text(
            '[bundle]\nname = "demo"\nversion = "1.0.0"\n\n'
            f"[model]\n{model}\n\n"
            '[runtime]\nbackend = "llama.cpp"\n\n'
            f"[environment]\n{environment}"
        )
        return path

    def build(self, recipe: Path, out: Path, *extra: str) -> Any:
        return builder("build", recipe, "--key", self.key, "-o", out, *extra, env=self.env)

    def lock(self, recipe: Path) -> Any:
        return builder("lock", recipe, env=self.env)


def pip_environment(index: str, requirements: str = '["alpha==1.0"]', extra: str = "") -> str:
    return (
        'type = "pip"\nplatform = "manylinux_2_28_x86_64"\npython = "3.11"\n'
        f'index_url = "{index}"\nrequirements = {requirements}\nsmoke_imports = ["alpha"]\n' + extra
    )


def members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle) as tar:
        return {
            m.name.removeprefix("payload/"): tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
        }


@pytest.fixture
def project(tmp_path: Path, local_server: LocalServer) -> Project:
    return Project(tmp_path, local_server)


@pytest.fixture
def index(tmp_path: Path, local_server: LocalServer) -> str:
    """alpha 1.0 (needs beta), beta 1.0, and gamma 1.0 that exists only as an sdist."""
    made = tmp_path / "made"
    return serve_index(
        local_server,
        [
            make_wheel(made, "alpha", "1.0", requires=["beta>=1"]),
            make_wheel(made, "beta", "1.0"),
            make_sdist(made, "gamma", "1.0"),
        ],
    )


def test_lock_then_build_carries_the_pinned_environment_and_sbom(
    project: Project, index: str, tmp_path: Path
) -> None:
    recipe = project.recipe(pip_environment(index))
    ok(project.lock(recipe))
    lock = project.dir / "pylock.recipe.toml"
    text = lock.read_text()
    assert 'name = "alpha"' in text and 'name = "beta"' in text
    assert 'platform = "manylinux_2_28_x86_64"' in text

    out = tmp_path / "b1.tar"
    ok(project.build(recipe, out))
    payload = members(out)
    wheels = sorted(p for p in payload if p.startswith("env/wheels/"))
    assert wheels == [
        "env/wheels/alpha-1.0-py3-none-any.whl",
        "env/wheels/beta-1.0-py3-none-any.whl",
    ]
    install_list = payload["env/requirements.txt"].decode()
    for wheel in wheels:
        digest = hashlib.sha256(payload[wheel]).hexdigest()
        assert f"--hash=sha256:{digest}" in install_list
    assert payload["env/lock/pylock.recipe.toml"] == lock.read_bytes()
    manifest = json.loads(payload["manifest.json"])
    assert manifest["environment"] == {
        "type": "pip",
        "platform": "manylinux_2_28_x86_64",
        "python": "3.11",
        "install_list": "env/requirements.txt",
        "packages": "env/wheels",
        "smoke_imports": ["alpha"],
    }

    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    sbom = payload["sbom.cdx.json"]
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(sbom.decode()) is None
    doc = json.loads(sbom)
    purls = {c.get("purl") for c in doc["components"]}
    assert {"pkg:pypi/alpha@1.0", "pkg:pypi/beta@1.0"} <= purls
    model = next(c for c in doc["components"] if c["type"] == "machine-learning-model")
    assert model["hashes"][0]["content"] == hashlib.sha256(b"weights" * 100).hexdigest()

    shown = ok(builder("inspect", out, env=project.env)).out
    assert "env      pip for manylinux_2_28_x86_64, Python 3.11: 2 package(s)" in shown
    assert "sbom     sbom.cdx.json" in shown

    # A rebuild is byte-identical and takes every package from the cache: no download.
    downloads = project.server.count("/files/alpha-1.0-py3-none-any.whl")
    again = tmp_path / "b2.tar"
    ok(project.build(recipe, again))
    assert again.read_bytes() == out.read_bytes()
    assert project.server.count("/files/alpha-1.0-py3-none-any.whl") == downloads


def test_build_refuses_an_unlocked_environment_unless_asked_to_lock(
    project: Project, index: str, tmp_path: Path
) -> None:
    recipe = project.recipe(pip_environment(index))
    out = tmp_path / "b.tar"
    assert_error(project.build(recipe, out), 2, "not locked", "appliance-builder lock")
    assert not out.exists()
    ok(project.build(recipe, out, "--lock"))
    assert (project.dir / "pylock.recipe.toml").is_file()
    assert "env/wheels/beta-1.0-py3-none-any.whl" in members(out)


def test_a_package_tampered_on_the_server_is_refused_naming_both_hashes(
    project: Project, index: str, tmp_path: Path
) -> None:
    recipe = project.recipe(pip_environment(index))
    ok(project.lock(recipe))
    served = project.server.root / "files" / "beta-1.0-py3-none-any.whl"
    locked = hashlib.sha256(served.read_bytes()).hexdigest()
    evil = make_wheel(tmp_path / "evil", "beta", "1.0", files={"beta/__init__.py": "evil()\n"})
    served.write_bytes(evil.read_bytes())
    out = tmp_path / "b.tar"
    line = assert_error(
        project.build(recipe, out), 3, "beta", locked, hashlib.sha256(evil.read_bytes()).hexdigest()
    )
    assert "beta-1.0-py3-none-any.whl" in line
    assert not out.exists()


def test_a_package_tampered_in_the_cache_is_reported_then_fetched_again(
    project: Project, index: str, tmp_path: Path
) -> None:
    recipe = project.recipe(pip_environment(index))
    ok(project.lock(recipe))
    ok(project.build(recipe, tmp_path / "b1.tar"))
    fetched = project.server.count("/files/beta-1.0-py3-none-any.whl")
    served = project.server.root / "files" / "beta-1.0-py3-none-any.whl"
    digest = hashlib.sha256(served.read_bytes()).hexdigest()
    cached = project.cache / "sha256" / digest[:2] / digest
    cached.chmod(0o644)
    cached.write_bytes(b"X" + cached.read_bytes()[1:])
    bad = hashlib.sha256(cached.read_bytes()).hexdigest()
    out = tmp_path / "b2.tar"
    assert_error(project.build(recipe, out), 3, "beta", digest, bad)
    assert not out.exists()
    ok(project.build(recipe, out))  # the bad entry was dropped: the next build fetches it again
    assert project.server.count("/files/beta-1.0-py3-none-any.whl") == fetched + 1


def test_an_sdist_only_dependency_needs_build_from_source(
    project: Project, index: str, tmp_path: Path
) -> None:
    pytest.importorskip(
        "setuptools", reason="the offline sdist build uses the builder's setuptools"
    )
    recipe = project.recipe(pip_environment(index, '["gamma==1.0"]'))
    ok(project.lock(recipe))
    out = tmp_path / "b.tar"
    assert_error(project.build(recipe, out), 2, "gamma", "build_from_source")
    assert not out.exists()

    recipe = project.recipe(
        pip_environment(index, '["gamma==1.0"]', 'build_from_source = ["gamma"]\n')
    )
    ok(project.build(recipe, out))
    payload = members(out)
    wheels = [p for p in payload if p.startswith("env/wheels/")]
    assert len(wheels) == 1 and wheels[0].startswith("env/wheels/gamma-1.0-")
    doc = json.loads(payload["sbom.cdx.json"])
    gamma = next(c for c in doc["components"] if c.get("name") == "gamma")
    props = {p["name"]: p["value"] for p in gamma["properties"]}
    assert props["airgap-appliance:origin"] == "built-from-sdist"
    sdist = project.server.root / "files" / "gamma-1.0.tar.gz"
    assert props["airgap-appliance:sdist-sha256"] == hashlib.sha256(sdist.read_bytes()).hexdigest()


def test_a_lock_for_another_platform_is_refused(
    project: Project, index: str, tmp_path: Path
) -> None:
    recipe = project.recipe(pip_environment(index))
    ok(project.lock(recipe))
    text = recipe.read_text().replace("manylinux_2_28_x86_64", "manylinux_2_28_aarch64")
    recipe.write_text(text)
    out = tmp_path / "b.tar"
    assert_error(project.build(recipe, out), 2, "manylinux_2_28_x86_64", "manylinux_2_28_aarch64")
    assert not out.exists()


def test_an_unreachable_index_is_named(project: Project) -> None:
    url = closed_port_url() + "/simple"
    recipe = project.recipe(pip_environment(url))
    assert_error(project.lock(recipe), 9, url)
    assert not (project.dir / "pylock.recipe.toml").exists()


def test_an_unknown_environment_key_is_named(project: Project, index: str) -> None:
    recipe = project.recipe(pip_environment(index) + 'requirement = ["x"]\n')
    assert_error(project.lock(recipe), 2, "unknown key 'environment.requirement'")


def test_conda_environment_is_locked_and_carried(
    project: Project, tmp_path: Path, local_server: LocalServer
) -> None:
    made = tmp_path / "conda-made"
    lib = make_conda_package(made, "libdemo", "1.0", build="h0_0", subdir="linux-64")
    tool = make_conda_package(made, "demotool", "2.0", depends=["libdemo >=1.0"])
    make_conda_channel(local_server.root / "channel", [lib, tool])
    recipe = project.recipe(
        'type = "conda"\nplatform = "linux-64"\npython = "3.11"\n'
        f'channels = ["{local_server.url}/channel"]\nspecs = ["demotool"]\n'
    )
    ok(project.lock(recipe))
    assert (project.dir / "recipe.conda-lock.yml").is_file()
    out = tmp_path / "b.tar"
    ok(project.build(recipe, out))
    payload = members(out)
    assert payload["env/conda/linux-64/libdemo-1.0-h0_0.tar.bz2"] == lib.read_bytes()
    assert payload["env/conda/noarch/demotool-2.0-0.tar.bz2"] == tool.read_bytes()
    repodata = json.loads(payload["env/conda/noarch/repodata.json"])
    assert set(repodata["packages"]) == {"demotool-2.0-0.tar.bz2"}
    assert "indexed_timestamp" not in payload["env/conda/linux-64/repodata.json"].decode()
    explicit = payload["env/conda-explicit.txt"].decode()
    assert "@EXPLICIT" in explicit
    assert (
        f"noarch/demotool-2.0-0.tar.bz2#sha256:{hashlib.sha256(tool.read_bytes()).hexdigest()}"
        in explicit
    )
    shown = ok(builder("inspect", out, env=project.env)).out
    assert "env      conda for linux-64, Python 3.11: 2 package(s)" in shown
    again = tmp_path / "b2.tar"
    ok(project.build(recipe, again))
    assert again.read_bytes() == out.read_bytes()  # the shipped repodata is deterministic too

    host, nonet = trusted_host(project, tmp_path)
    ok(appliance(host, "install", out, **nonet))
    env = (host / "current").resolve() / "env"
    assert (env / "share" / "libdemo" / "VERSION").read_text() == "1.0\n"
    assert (env / "share" / "demotool" / "VERSION").read_text() == "2.0\n"


def test_hub_model_is_fetched_at_a_resolved_commit(
    project: Project, index: str, tmp_path: Path, local_server: LocalServer
) -> None:
    hub = HubServer(local_server)
    gguf = tmp_path / "tiny.gguf"
    write_tiny_llama(gguf, seed=3)
    sha = hub.commit("acme/tiny", {"tiny.gguf": gguf.read_bytes(), "README.md": b"# tiny\n"})
    recipe = project.recipe(
        pip_environment(index),
        model='repo_id = "acme/tiny"\nrevision = "main"\nfiles = ["*.gguf"]',
    )
    ok(project.lock(recipe))
    out = tmp_path / "b.tar"
    env = project.env | {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
    result = ok(builder("build", recipe, "--key", project.key, "-o", out, env=env))
    assert f"revision main resolved to {sha}" in result.err
    payload = members(out)
    assert payload["model/tiny.gguf"] == gguf.read_bytes()
    assert "model/README.md" not in payload
    manifest = json.loads(payload["manifest.json"])
    assert manifest["model"] == {"path": "model", "source": {"repo_id": "acme/tiny", "commit": sha}}
    doc = json.loads(payload["sbom.cdx.json"])
    assert any(c.get("purl") == f"pkg:huggingface/acme/tiny@{sha}" for c in doc["components"])
    assert f"from   acme/tiny at commit {sha}" in ok(builder("inspect", out, env=env)).out


def test_a_built_bundle_installs_offline_and_status_shows_its_provenance(
    project: Project, index: str, tmp_path: Path
) -> None:
    host, nonet = trusted_host(project, tmp_path)
    recipe = project.recipe(pip_environment(index))
    bundle = tmp_path / "b.tar"
    ok(project.build(recipe, bundle, "--lock"))
    ok(appliance(host, "install", bundle, **nonet))
    slot = (host / "current").resolve()
    imported = subprocess.run(
        [slot / "env" / "bin" / "python", "-c", "import alpha, beta; print(alpha.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert imported.stdout.startswith(str(slot / "env" / "lib"))
    shown = ok(appliance(host, "status", **nonet)).out
    assert "  env      pip for manylinux_2_28_x86_64, Python 3.11" in shown
    assert "  sbom     CycloneDX 1.6: 2 package(s)" in shown
    assert "           alpha 1.0" in shown
    info = ok(appliance(host, "status", "--json", **nonet)).json()
    provenance = info["provenance"]
    assert provenance["environment"]["installed"] is True
    assert [p["purl"] for p in provenance["sbom"]["packages"]] == [
        "pkg:pypi/alpha@1.0",
        "pkg:pypi/beta@1.0",
    ]


def trusted_host(project: Project, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A host that trusts a 1-of-1 root over the project's key, and how to run commands on it
    with no network (``unshare -n``)."""
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("'unshare -n' is not permitted here")
    root_key = tmp_path / "keys" / "root.pem"
    new_key(root_key)
    root_json = tmp_path / "root.json"
    ok(
        builder(
            "root",
            "create",
            "--root-key",
            root_key,
            "--bundle-key",
            f"{project.key}.pub",
            "--threshold",
            "1",
            "-o",
            root_json,
            env=project.env,
        )
    )
    host = tmp_path / "host"
    nonet: dict[str, Any] = {"prefix": ["unshare", "-n"], "env": project.env}
    ok(appliance(host, "trust", "init", root_json, **nonet))
    return host, nonet
