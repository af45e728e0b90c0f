"""A local Hugging Face Hub lookalike on tests/localhttp.LocalServer, for the real hub client.

It answers the requests ``huggingface_hub`` (2.4) makes for ``HfApi.model_info`` and
``hf_hub_download``, as the real hub does:

- ``GET /api/models/{repo_id}`` and ``GET /api/models/{repo_id}/revision/{revision}``: the
  model's JSON, with ``sha`` (the commit the revision resolves to) and ``siblings``
  (``rfilename``; with ``?blobs=true`` also ``size``, ``blobId`` and, for LFS files,
  ``lfs: {sha256, size, pointerSize}``). Errors carry ``X-Error-Code`` (``RepoNotFound``,
  ``RevisionNotFound``), which the client turns into its typed errors.
- ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}``: always ``X-Repo-Commit``. A regular
  file is served right there, with ``ETag: "<git blob id>"`` and ``Content-Length``. An LFS
  file answers ``302`` to a "CDN" on another origin (``localhost`` instead of ``127.0.0.1``,
  the same server), with ``ETag`` and ``X-Linked-Etag: "<sha256>"``, ``X-Linked-Size`` and
  ``Location``; the client, like with the real hub, does not follow a redirect off the hub on
  ``HEAD`` and takes the file's metadata from the 302 itself. A missing file is ``404`` with
  ``X-Error-Code: EntryNotFound``.
- ``GET /cdn-lfs/{repo_id}/{sha256}``: the LFS file's bytes.

Repos are made of commits: :meth:`HubServer.commit` adds one (the whole tree) on a branch and
returns its 40-hex sha, so a test can have ``main`` move on while an older sha stays
fetchable. :meth:`HubServer.tamper` makes the server send other bytes for a file while every
piece of metadata still describes the real ones: what a compromised CDN or mirror would do.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote, unquote, urlsplit

from localhttp import LocalServer

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".onnx", ".h5", ".msgpack")
_TIME = "2025-01-01T00:00:00.000Z"

Answer = tuple[int, dict[str, str], bytes]


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob: sha1 of ``blob <size>\\0`` + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The LFS pointer file git stores in place of ``data``."""
    oid = hashlib.sha256(data).hexdigest()
    spec = "https://git-lfs.github.com/spec/v1"
    return f"version {spec}\noid sha256:{oid}\nsize {len(data)}\n".encode()


@dataclass(frozen=True)
class HubBlob:
    """One file of a commit, as the hub knows it."""

    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def blob_id(self) -> str:
        """The git blob id: of the LFS pointer for an LFS file, of the content otherwise."""
        return git_blob_id(lfs_pointer(self.data) if self.lfs else self.data)

    def sibling(self, path: str, *, blobs: bool) -> dict[str, object]:
        """The file's entry in ``siblings`` of the model JSON."""
        entry: dict[str, object] = {"rfilename": path}
        if blobs:
            entry["blobId"] = self.blob_id
            entry["size"] = len(self.data)
            if self.lfs:
                entry["lfs"] = {
                    "sha256": self.sha256,
                    "size": len(self.data),
                    "pointerSize": len(lfs_pointer(self.data)),
                }
        return entry


@dataclass
class HubRepo:
    commits: dict[str, dict[str, HubBlob]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class HubServer:
    """Hub routes on ``server``; add repos with :meth:`commit`, point the client at :attr:`url`."""

    def __init__(self, server: LocalServer, *, cdn_host: str = "localhost") -> None:
        self.server = server
        self.repos: dict[str, HubRepo] = {}
        self.tampered: dict[tuple[str, str], bytes] = {}  # (repo_id, sha256) -> bytes served
        port = urlsplit(server.url).port
        self.cdn_url = f"http://{cdn_host}:{port}"
        server.route("/api/models/", self._api)
        server.route("/cdn-lfs/", self._cdn)
        server.route("/", self._resolve)

    @property
    def url(self) -> str:
        """The endpoint to give the client (``HF_ENDPOINT``)."""
        return self.server.url

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        branch: str = "main",
        lfs: Iterable[str] | None = None,
        tags: Iterable[str] = (),
    ) -> str:
        """Add a commit holding exactly ``files`` on ``branch``; return its sha.

        ``lfs`` names the paths stored with LFS (default: by suffix, as a ``.gitattributes``
        would). ``tags`` are pointed at the new commit too.
        """
        repo = self.repos.setdefault(repo_id, HubRepo())
        lfs_paths = set(lfs) if lfs is not None else {p for p in files if p.endswith(LFS_SUFFIXES)}
        tree = {path: HubBlob(data, path in lfs_paths) for path, data in files.items()}
        text = f"tree {repo_id}\nparent {repo.refs.get(branch, '')}\nn {len(repo.commits)}\n"
        text += "".join(f"{path} {blob.blob_id}\n" for path, blob in sorted(tree.items()))
        sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()
        repo.commits[sha] = tree
        repo.refs[branch] = sha
        for tag in tags:
            repo.refs[tag] = sha
        return sha

    def blob(self, repo_id: str, path: str, revision: str = "main") -> HubBlob:
        """The file ``path`` of ``repo_id`` at ``revision``."""
        repo = self.repos[repo_id]
        sha = repo.resolve(revision)
        assert sha is not None, f"no revision {revision} in {repo_id}"
        return repo.commits[sha][path]

    def tamper(
        self, repo_id: str, path: str, data: bytes | None = None, *, revision: str = "main"
    ) -> bytes:
        """Serve ``data`` (default: the real bytes with one byte flipped, same size) for the
        file ``path`` at ``revision`` from now on, in every commit that holds those bytes.
        The metadata (sizes, hashes, ETags) stays that of the real file. Returns the bytes."""
        real = self.blob(repo_id, path, revision)
        if data is None:
            flipped = bytearray(real.data)
            flipped[len(flipped) // 2] ^= 0xFF
            data = bytes(flipped)
        self.tampered[(repo_id, real.sha256)] = data
        return data

    def untamper(self) -> None:
        """Serve the real bytes again."""
        self.tampered.clear()

    def resolve_paths(self) -> list[str]:
        """The paths of every ``/resolve/`` request so far (to see which revision was used)."""
        with self.server._lock:
            return [p for _, p, _ in self.server.requests if "/resolve/" in p]

    # -- routes -----------------------------------------------------------------------------

    def _served(self, repo_id: str, blob: HubBlob) -> bytes:
        return self.tampered.get((repo_id, blob.sha256), blob.data)

    def _api(self, raw: str, _headers: dict[str, str]) -> Answer | None:
        parts = urlsplit(raw)
        rest = parts.path.removeprefix("/api/models/")
        if "/revision/" in rest:
            repo_id, revision = rest.split("/revision/", 1)
        elif rest.count("/") <= 1:
            repo_id, revision = rest, "main"
        else:
            return None  # an API the lookalike does not have: 404
        repo_id, revision = unquote(repo_id), unquote(revision)
        repo = self.repos.get(repo_id)
        if repo is None:
            return _error(404, "RepoNotFound", "Repository not found")
        sha = repo.resolve(revision)
        if sha is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        blobs = parse_qs(parts.query).get("blobs", ["false"])[-1].lower() in ("true", "1")
        tree = repo.commits[sha]
        author = repo_id.split("/", 1)[0] if "/" in repo_id else None
        body = {
            "_id": hashlib.sha1(repo_id.encode(), usedforsecurity=False).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": author,
            "sha": sha,
            "lastModified": _TIME,
            "createdAt": _TIME,
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": "transformers",
            "siblings": [tree[p].sibling(p, blobs=blobs) for p in sorted(tree)],
            "usedStorage": sum(len(b.data) for b in tree.values()),
        }
        return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()

    def _resolve(self, raw: str, _headers: dict[str, str]) -> Answer | None:
        path = urlsplit(raw).path
        if "/resolve/" not in path:
            return None  # not the hub's: fall through to the file tree
        repo_part, rest = path.split("/resolve/", 1)
        repo_id = unquote(repo_part.lstrip("/"))
        quoted_revision, _, quoted_file = rest.partition("/")
        revision, filename = unquote(quoted_revision), unquote(quoted_file)
        repo = self.repos.get(repo_id)
        if repo is None:
            return _error(404, "RepoNotFound", "Repository not found")
        sha = repo.resolve(revision)
        if sha is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        blob = repo.commits[sha].get(filename)
        if blob is None:
            status, headers, body = _error(404, "EntryNotFound", "Entry not found")
            return status, headers | {"X-Repo-Commit": sha}, body
        if blob.lfs:
            location = f"{self.cdn_url}/cdn-lfs/{quote(repo_id)}/{blob.sha256}"
            headers = {
                "Location": location,
                "ETag": f'"{blob.sha256}"',
                "X-Linked-Etag": f'"{blob.sha256}"',
                "X-Linked-Size": str(len(blob.data)),
                "X-Repo-Commit": sha,
                "Content-Type": "text/plain; charset=utf-8",
            }
            return 302, headers, f"Found. Redirecting to {location}".encode()
        headers = {
            "ETag": f'"{blob.blob_id}"',
            "X-Repo-Commit": sha,
            "Content-Type": "text/plain; charset=utf-8",
        }
        return 200, headers, self._served(repo_id, blob)

    def _cdn(self, raw: str, _headers: dict[str, str]) -> Answer | None:
        repo_part, _, sha256 = urlsplit(raw).path.removeprefix("/cdn-lfs/").rpartition("/")
        repo = self.repos.get(unquote(repo_part))
        if repo is None:
            return None
        for tree in repo.commits.values():
            for blob in tree.values():
                if blob.lfs and blob.sha256 == sha256:
                    headers = {
                        "Content-Type": "application/octet-stream",
                        "ETag": f'"{sha256}"',
                    }
                    return 200, headers, self._served(unquote(repo_part), blob)
        return None


def _error(status: int, code: str, message: str) -> Answer:
    headers = {
        "Content-Type": "application/json",
        "X-Error-Code": code,
        "X-Error-Message": message,
    }
    return status, headers, json.dumps({"error": message}).encode()
