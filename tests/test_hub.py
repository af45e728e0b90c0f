"""builder.hub against a local hub lookalike (tests/hubserver.py), with the real hub client.

Nothing here reaches the internet: every test points the client at a loopback server (the
``endpoint`` argument or ``HF_ENDPOINT``) and keeps its caches under ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hubserver import HubServer, git_blob_id
from localhttp import Fault, LocalServer

from builder.hub import HubModel, fetch_hub_model
from builder.recipe import ModelSection
from signing.errors import ArtifactError, FetchError, InputError

REPO = "tiny/llama"
HF_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """Two versions of a repo's files: a tiny HF llama (seed 0), then reseeded plus a GGUF."""
    from builder.tinyhf import write_tiny_llama_hf
    from builder.tinymodel import write_tiny_llama

    base = tmp_path_factory.mktemp("hubfiles")
    saved = dict(os.environ)
    try:  # tinyhf sets HF_HUB_OFFLINE for its own import of transformers: keep it from leaking
        write_tiny_llama_hf(base / "v1", seed=0)
        write_tiny_llama_hf(base / "v2", seed=1)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    write_tiny_llama(base / "tiny.gguf", seed=0)
    versions = {}
    for name, readme in (("v1", b"# tiny llama, first\n"), ("v2", b"# tiny llama, second\n")):
        files = {f: (base / name / f).read_bytes() for f in HF_FILES}
        files["README.md"] = readme
        files[".gitattributes"] = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        versions[name] = files
    versions["v2"]["gguf/tiny.gguf"] = (base / "tiny.gguf").read_bytes()
    return versions


@pytest.fixture(autouse=True)
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No token, no endpoint, no offline mode from the outside; every cache under tmp_path.

    Other modules set HF_HUB_OFFLINE (the appliance runs offline); the client reads it at
    import, so its import-time value is reset here too.
    """
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("AIRGAP_APPLIANCE_CACHE", str(tmp_path / "airgap-cache"))


class Hub:
    """The lookalike with one repo of two commits: ``old`` (v1), then ``head`` (v2) on main."""

    def __init__(self, server: HubServer, versions: dict[str, dict[str, bytes]]) -> None:
        self.server = server
        self.url = server.url
        self.versions = versions
        self.old = server.commit(REPO, versions["v1"])
        self.head = server.commit(REPO, versions["v2"], tags=["v2.0"])


@pytest.fixture
def hub(local_server: LocalServer, generated: dict[str, dict[str, bytes]]) -> Iterator[Hub]:
    yield Hub(HubServer(local_server), generated)


def fetch(
    hub: Hub, tmp_path: Path, revision: str = "main", *files: str, out_dir: Path | None = None
) -> HubModel:
    """Fetch ``REPO`` at ``revision`` (``files`` patterns) with the cache under ``tmp_path``."""
    model = ModelSection(repo_id=REPO, revision=revision, files=list(files))
    return fetch_hub_model(
        model, cache_dir=tmp_path / "hf-cache", endpoint=hub.url, out_dir=out_dir
    )


def tree(directory: Path) -> dict[str, bytes]:
    """Every entry under ``directory``: plain files only (a link or anything else fails)."""
    found = {}
    for dirpath, dirs, names in os.walk(directory):
        for name in [*dirs, *names]:
            path = Path(dirpath) / name
            assert not path.is_symlink(), f"{path} is a symbolic link"
            if name in names:
                assert path.is_file(), f"{path} is not a plain file"
                found[path.relative_to(directory).as_posix()] = path.read_bytes()
    return found


# -- good data ----------------------------------------------------------------------------------


def test_branch_resolves_to_commit_and_files_come_from_that_commit(
    hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="builder.hub"):
        got = fetch(hub, tmp_path, "main")
    assert got.commit == hub.head
    assert got.repo_id == REPO
    assert got.revision == "main"
    assert got.resolved
    assert f"revision main resolved to {hub.head}" in caplog.text
    assert tree(got.directory) == hub.versions["v2"]
    assert [f.path for f in got.files] == sorted(hub.versions["v2"])
    for f in got.files:
        data = hub.versions["v2"][f.path]
        assert (f.size, f.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    # Every download named the commit, never the moving branch.
    resolves = hub.server.resolve_paths()
    assert resolves
    assert all(f"/resolve/{hub.head}/" in p for p in resolves), resolves
    # LFS files came through the redirect to the "CDN", by their sha256.
    lfs = hub.server.blob(REPO, "model.safetensors")
    assert hub.server.server.count(f"/cdn-lfs/{REPO}/{lfs.sha256}") == 1


def test_tag_resolves_too(hub: Hub, tmp_path: Path) -> None:
    got = fetch(hub, tmp_path, "v2.0", "config.json")
    assert (got.commit, got.resolved) == (hub.head, True)


def test_pinned_old_commit_gives_the_old_bytes(hub: Hub, tmp_path: Path) -> None:
    got = fetch(hub, tmp_path, hub.old)
    assert got.commit == hub.old
    assert not got.resolved
    files = tree(got.directory)
    assert files == hub.versions["v1"]
    assert files["model.safetensors"] != hub.versions["v2"]["model.safetensors"]
    assert "gguf/tiny.gguf" not in files


def test_patterns_select_files(hub: Hub, tmp_path: Path) -> None:
    got = fetch(hub, tmp_path, "main", "*.json")
    assert sorted(tree(got.directory)) == sorted(f for f in HF_FILES if f.endswith(".json"))
    got = fetch(hub, tmp_path / "b", "main", "gguf/", "config.json")
    assert sorted(tree(got.directory)) == ["config.json", "gguf/tiny.gguf"]
    assert [f.path for f in got.files] == ["config.json", "gguf/tiny.gguf"]
    # Only the matched files were downloaded.
    assert not any("safetensors" in p for p in hub.server.resolve_paths())


def test_lfs_sha256_and_git_blob_checks_pass_and_are_recorded(hub: Hub, tmp_path: Path) -> None:
    got = fetch(hub, tmp_path, "main", "model.safetensors", "README.md")
    by_path = {f.path: f for f in got.files}
    lfs = hub.server.blob(REPO, "model.safetensors")
    assert lfs.lfs
    assert by_path["model.safetensors"].sha256 == lfs.sha256
    plain = hub.server.blob(REPO, "README.md")
    assert not plain.lfs
    assert git_blob_id((got.directory / "README.md").read_bytes()) == plain.blob_id
    assert by_path["README.md"].sha256 == hashlib.sha256(plain.data).hexdigest()


def test_second_fetch_uses_the_cache_and_checks_it_again(hub: Hub, tmp_path: Path) -> None:
    first = fetch(hub, tmp_path, "main", "*.safetensors", "config.json")
    before = len(hub.server.resolve_paths())
    second = fetch(hub, tmp_path, "main", "*.safetensors", "config.json")
    assert second.files == first.files
    assert len(hub.server.resolve_paths()) == before  # nothing downloaded again
    # A cached blob changed behind the cache's back is caught on the next use.
    blob = tmp_path / "hf-cache" / "models--tiny--llama" / "blobs" / first.files[1].sha256
    assert blob.is_file()
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.safetensors"):
        fetch(hub, tmp_path, "main", "*.safetensors", "config.json")


def test_endpoint_from_hf_endpoint(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    model = ModelSection(repo_id=REPO, revision="main", files=["config.json"])
    got = fetch_hub_model(model, cache_dir=tmp_path / "hf-cache")
    assert got.commit == hub.head
    assert tree(got.directory) == {"config.json": hub.versions["v2"]["config.json"]}
    # The default output directory lies in the airgap-appliance cache.
    assert got.directory.is_relative_to(tmp_path / "airgap-cache")


def test_out_dir_must_be_new_or_empty(hub: Hub, tmp_path: Path) -> None:
    out = tmp_path / "out"
    got = fetch(hub, tmp_path, "main", "config.json", out_dir=out)
    assert got.directory == out
    assert sorted(tree(out)) == ["config.json"]
    with pytest.raises(InputError, match="not empty"):
        fetch(hub, tmp_path, "main", "config.json", out_dir=out)


# -- bad data -----------------------------------------------------------------------------------


def test_tampered_lfs_bytes_are_refused_naming_file_and_hashes(hub: Hub, tmp_path: Path) -> None:
    real = hub.server.blob(REPO, "model.safetensors")
    served = hub.server.tamper(REPO, "model.safetensors")
    bad = hashlib.sha256(served).hexdigest()
    out = tmp_path / "out"
    with pytest.raises(ArtifactError) as caught:
        fetch(hub, tmp_path, "main", out_dir=out)
    message = caught.value.diagnostics()
    assert "model.safetensors" in message
    assert real.sha256 in message
    assert bad in message
    assert "\n" not in str(caught.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    # The bad blob left the hub cache: once the server is honest again, a fetch succeeds.
    hub.server.untamper()
    got = fetch(hub, tmp_path, "main", out_dir=out)
    assert tree(out) == hub.versions["v2"]
    assert got.commit == hub.head


def test_tampered_regular_file_fails_its_git_blob_check(hub: Hub, tmp_path: Path) -> None:
    real = hub.server.blob(REPO, "config.json")
    served = hub.server.tamper(REPO, "config.json")
    with pytest.raises(ArtifactError) as caught:
        fetch(hub, tmp_path, "main", "config.json")
    message = str(caught.value)
    assert "config.json" in message
    assert real.blob_id in message
    assert git_blob_id(served) in message


def test_unreachable_hub_is_a_fetch_error_naming_the_url(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    model = ModelSection(repo_id=REPO, revision="main")
    with pytest.raises(FetchError) as caught:
        fetch_hub_model(model, cache_dir=tmp_path / "hf-cache", endpoint=endpoint)
    assert endpoint in str(caught.value)
    assert caught.value.exit_code == 9
    assert "\n" not in str(caught.value)


def test_hub_server_error_is_a_fetch_error(hub: Hub, tmp_path: Path) -> None:
    hub.server.server.fail(f"/api/models/{REPO}/revision/main", Fault(status=503))
    with pytest.raises(FetchError, match=r"HTTP 503 .*/api/models/tiny/llama/revision/main"):
        fetch(hub, tmp_path, "main")


def test_unknown_repo_is_an_input_error(hub: Hub, tmp_path: Path) -> None:
    model = ModelSection(repo_id="tiny/nothing", revision="main")
    with pytest.raises(InputError, match="tiny/nothing"):
        fetch_hub_model(model, cache_dir=tmp_path, endpoint=hub.url)


def test_unknown_revision_is_an_input_error(hub: Hub, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no-such-branch"):
        fetch(hub, tmp_path, "no-such-branch")
    with pytest.raises(InputError, match="0" * 40):
        fetch(hub, tmp_path, "0" * 40)


def test_pattern_matching_nothing_is_an_input_error(hub: Hub, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"\*\.bin"):
        fetch(hub, tmp_path, "main", "*.bin")
    with pytest.raises(InputError, match=r"\*\.safetensor'"):  # a typo next to a good pattern
        fetch(hub, tmp_path, "main", "config.json", "*.safetensor")
    # The gguf is not in the old commit.
    with pytest.raises(InputError, match=r"\*\.gguf"):
        fetch(hub, tmp_path, hub.old, "*.gguf")
    assert hub.server.resolve_paths() == []


# -- offline ------------------------------------------------------------------------------------


def test_offline_mode_uses_only_the_cache(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    online = fetch(hub, tmp_path, "main", "*.json", "*.safetensors")
    requests = len(hub.server.server.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = fetch(hub, tmp_path, "main", "*.json", "*.safetensors")
    assert len(hub.server.server.requests) == requests  # the hub was not asked anything
    assert (offline.commit, offline.files) == (online.commit, online.files)
    wanted = {p: d for p, d in hub.versions["v2"].items() if p.endswith((".json", ".safetensors"))}
    assert tree(offline.directory) == wanted
    # What the cache does not hold is a fetch error, not a silent download.
    with pytest.raises(FetchError, match="HF_HUB_OFFLINE"):
        fetch(hub, tmp_path, hub.old)
    assert len(hub.server.server.requests) == requests
