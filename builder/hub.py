"""Model weights from a Hugging Face Hub repo, at one commit, verified file by file (ADR 0007).

A recipe names a hub model as ``repo_id`` + ``revision`` (a branch, a tag or a commit sha) +
``files`` (glob patterns). :func:`fetch_hub_model` asks the hub (``HfApi.model_info`` with file
metadata) which commit the revision is *now*, and from then on uses only that 40-hex sha: every
file is downloaded at the commit, never at the moving branch, so a push to ``main`` during the
build cannot mix two commits in one bundle. The signed manifest records ``{repo_id, commit}``.

Every file is checked against what the hub says about it before it is used, whether it was
just downloaded or found in the local cache:

- an LFS file's sha256 must equal the hub's LFS oid (a sha256);
- any other file's git blob id (sha1 of ``"blob <size>\\0"`` + content) must equal the hub's
  ``blobId``; its sha256 is computed for the record.

A mismatch is an :class:`~signing.errors.ArtifactError` naming the file and both hashes; the
bad blob is removed from the hub cache (so the next run downloads it afresh) and nothing is
returned. The files end up in a fresh directory of plain files (hard links to the hub cache's
blobs where the file system allows, else copies): exactly the files that matched, no symbolic
links, nothing else, because the bundle builder refuses links and packs every file it finds.

The downloads go through the ``huggingface_hub`` client, with the endpoint, token and cache
given as arguments (never through process-wide settings). ``HF_HUB_OFFLINE`` (or
``TRANSFORMERS_OFFLINE``) is honoured: then the hub is not contacted at all, the revision is
resolved through the cache's refs, and the files come from the cache's snapshot of that commit,
each checked against the hash its cache blob is named by.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from builder.cache import default_cache_root, write_atomically
from builder.recipe import ModelSection
from signing.bounded import one_line
from signing.errors import ArtifactError, FetchError, InputError
from signing.manifest import check_relative_path

if TYPE_CHECKING:
    from huggingface_hub.hf_api import ModelInfo

LOG = logging.getLogger(__name__)

DEFAULT_ENDPOINT: Final = "https://huggingface.co"
CHUNK_SIZE: Final = 1 << 20
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRUE = frozenset({"1", "ON", "YES", "TRUE"})


@dataclass(frozen=True)
class HubFile:
    """One verified file of a hub model: its path in the repo, size and sha256."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class HubModel:
    """A hub model fetched at one commit: the directory that holds exactly its matched files.

    ``revision`` is what the recipe asked for; :attr:`resolved` tells whether it was a branch
    or tag that the hub resolved to ``commit`` (the CLI says so: "revision main resolved to
    <sha>").
    """

    directory: Path
    repo_id: str
    commit: str
    files: tuple[HubFile, ...]
    revision: str = ""

    @property
    def resolved(self) -> bool:
        """Whether the recipe's revision was a name (branch, tag) rather than this commit."""
        return bool(self.revision) and self.revision.lower() != self.commit


@dataclass(frozen=True)
class _Remote:
    """What the hub (or, offline, the cache) says one file must be."""

    path: str
    size: int | None
    blob_id: str | None  # git blob sha1 (for an LFS file: of its pointer)
    lfs_sha256: str | None


def fetch_hub_model(
    model: ModelSection,
    *,
    cache_dir: Path | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    out_dir: Path | None = None,
) -> HubModel:
    """Fetch ``model``'s files at the commit its revision resolves to, verify them, return them.

    ``cache_dir`` is the hub cache (default: the client's, ``HF_HUB_CACHE`` or
    ``HF_HOME/hub``); ``endpoint`` the hub (default ``HF_ENDPOINT``, else huggingface.co);
    ``token`` a hub token (default: the client's own lookup). The files are written to
    ``out_dir``, which must not exist or be empty (default: a directory under the
    airgap-appliance cache, keyed by repo, commit and patterns, rebuilt on every call).

    Raises :class:`InputError` for an unknown repo or revision, or a pattern that matches no
    file; :class:`FetchError` naming the endpoint when the hub cannot be reached (or, offline,
    when the cache does not hold the model); :class:`ArtifactError` when a file does not match
    the hub's hash.
    """
    if model.repo_id is None or model.revision is None:
        raise InputError("the recipe's model names no hub repo_id and revision")
    repo_id, revision = model.repo_id, model.revision
    if (
        out_dir is not None
        and out_dir.exists()
        and (not out_dir.is_dir() or any(out_dir.iterdir()))
    ):
        raise InputError(f"output directory {out_dir} exists and is not empty")
    hub = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    cache = (cache_dir if cache_dir is not None else _default_hub_cache()).expanduser()
    offline = _offline()
    if offline:
        commit, listing = _from_cache(repo_id, revision, cache, hub)
    else:
        info = _model_info(repo_id, revision, hub, token)
        commit, listing = _from_info(info, repo_id, revision, hub)
    selected = _select(listing, model.files, repo_id, commit)
    if revision.lower() != commit:
        LOG.info("model %s: revision %s resolved to %s", repo_id, revision, commit)
    target = out_dir if out_dir is not None else _default_out_dir(repo_id, commit, model.files)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.partial"
    staging.mkdir()
    try:
        files = []
        for remote in selected:
            if offline:
                pointer = _cached_pointer(cache, repo_id, commit, remote.path, hub)
            else:
                pointer = _download(repo_id, remote.path, commit, cache=cache, hub=hub, token=token)
            files.append(_place(pointer, staging, remote, repo_id, commit))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not offline and revision != commit:
        _remember_ref(cache, repo_id, revision, commit)
    return HubModel(
        directory=target,
        repo_id=repo_id,
        commit=commit,
        files=tuple(sorted(files, key=lambda f: f.path)),
        revision=revision,
    )


# -- asking the hub ----------------------------------------------------------------------------


def _model_info(repo_id: str, revision: str, hub: str, token: str | None) -> ModelInfo:
    try:
        # Imported here: fetching from a hub is the optional 'builder' extra.
        import httpx2  # noqa: PLC0415
        from huggingface_hub import HfApi  # noqa: PLC0415
        from huggingface_hub.errors import (  # noqa: PLC0415
            DisabledRepoError,
            GatedRepoError,
            HfHubHTTPError,
            HFValidationError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise InputError(
            "fetching a hub model needs the 'builder' extra: "
            "pip install 'airgap-appliance[builder]'"
        ) from None
    url = f"{hub}/api/models/{repo_id}/revision/{revision}"
    try:
        return HfApi(endpoint=hub, token=token).model_info(
            repo_id, revision=revision, files_metadata=True
        )
    except GatedRepoError:
        raise InputError(
            f"hub repo {repo_id} at {hub} is gated: accept its terms and give a token"
        ) from None
    except RepositoryNotFoundError:
        raise InputError(
            f"hub repo {repo_id} not found at {hub} (or it is private: give a token)"
        ) from None
    except RevisionNotFoundError:
        raise InputError(f"hub repo {repo_id} at {hub} has no revision {revision!r}") from None
    except DisabledRepoError:
        raise InputError(f"hub repo {repo_id} at {hub} is disabled") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise FetchError(f"model hub {hub}: HTTP {status} for {url}") from None
    except OfflineModeIsEnabled:
        raise FetchError(f"model hub {hub}: offline mode is enabled (HF_HUB_OFFLINE)") from None
    except (httpx2.HTTPError, OSError) as exc:
        raise FetchError(f"model hub {hub} unreachable: {url}: {_one_line(exc)}") from None
    except HFValidationError as exc:
        raise InputError(f"hub repo id {repo_id!r}: {_one_line(exc)}") from None
    except (ValueError, KeyError, TypeError) as exc:  # an answer that is not the hub's JSON
        raise FetchError(f"model hub {hub}: bad answer for {url}: {_one_line(exc)}") from None


def _from_info(info: ModelInfo, repo_id: str, revision: str, hub: str) -> tuple[str, list[_Remote]]:
    commit = info.sha
    if not isinstance(commit, str) or not _COMMIT.fullmatch(commit):
        raise FetchError(f"model hub {hub} gave no commit sha for {repo_id} at {revision}")
    if _COMMIT.fullmatch(revision.lower()) and revision.lower() != commit:
        raise ArtifactError(
            f"hub repo {repo_id}: asked for commit {revision}, the hub at {hub} answered {commit}"
        )
    listing = []
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        listing.append(
            _Remote(
                path=sibling.rfilename,
                size=sibling.size,
                blob_id=sibling.blob_id,
                lfs_sha256=lfs.sha256 if lfs is not None else None,
            )
        )
    return commit, listing


def _download(
    repo_id: str, path: str, commit: str, *, cache: Path, hub: str, token: str | None
) -> Path:
    """The hub cache's pointer (snapshot path) of ``path`` at ``commit``, downloaded if needed."""
    import httpx2  # noqa: PLC0415
    from huggingface_hub import hf_hub_download  # noqa: PLC0415
    from huggingface_hub.errors import (  # noqa: PLC0415
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = f"{hub}/{repo_id}/resolve/{commit}/{path}"
    try:
        return Path(
            hf_hub_download(
                repo_id,
                path,
                revision=commit,
                cache_dir=cache,
                endpoint=hub,
                token=token,
            )
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise FetchError(
            f"model hub {hub} lists but does not serve {url}: {_one_line(exc)}"
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise FetchError(f"model hub {hub}: HTTP {status} for {url}") from None
    except LocalEntryNotFoundError as exc:  # the client's word for "could not reach it"
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        raise FetchError(f"model hub {hub} unreachable: {url}: {_one_line(cause)}") from None
    except (httpx2.HTTPError, OSError) as exc:
        raise FetchError(f"model hub {hub}: cannot download {url}: {_one_line(exc)}") from None


# -- offline: the hub cache alone --------------------------------------------------------------


def _offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as the client read it at import, or as now."""
    from huggingface_hub import constants  # noqa: PLC0415

    now = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or now.upper() in _TRUE


def _default_hub_cache() -> Path:
    """The client's cache, with HF_HUB_CACHE and HF_HOME read now rather than at its import."""
    if value := os.environ.get("HF_HUB_CACHE"):
        return Path(value)
    if value := os.environ.get("HF_HOME"):
        return Path(value) / "hub"
    from huggingface_hub import constants  # noqa: PLC0415

    return Path(constants.HF_HUB_CACHE)


def _storage(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def _from_cache(repo_id: str, revision: str, cache: Path, hub: str) -> tuple[str, list[_Remote]]:
    storage = _storage(cache, repo_id)
    commit: str | None = revision.lower() if _COMMIT.fullmatch(revision.lower()) else None
    if commit is None:
        with contextlib.suppress(OSError, ValueError):
            ref = (storage / "refs" / revision).resolve()
            if ref.is_relative_to((storage / "refs").resolve()):
                commit = ref.read_text(encoding="ascii").strip()
    snapshot = storage / "snapshots" / (commit or "-")
    if commit is None or not _COMMIT.fullmatch(commit) or not snapshot.is_dir():
        raise FetchError(
            f"HF_HUB_OFFLINE is set and the hub cache {cache} holds no {repo_id} at {revision}; "
            f"unset it to fetch from {hub}"
        )
    listing = []
    for pointer in sorted(_walk(snapshot)):
        rel = pointer.relative_to(snapshot).as_posix()
        etag = pointer.readlink().name if pointer.is_symlink() else ""
        listing.append(
            _Remote(
                path=rel,
                size=None,
                blob_id=etag if _COMMIT.fullmatch(etag) else None,
                lfs_sha256=etag if _SHA256.fullmatch(etag) else None,
            )
        )
    return commit, listing


def _remember_ref(cache: Path, repo_id: str, revision: str, commit: str) -> None:
    """Record ``revision -> commit`` in the cache's refs, as the client does, for offline use.

    The downloads name the commit, so the client itself never learns what ``main`` was.
    """
    refs = _storage(cache, repo_id) / "refs"
    ref = refs / revision
    if not ref.resolve().is_relative_to(refs.resolve()):
        return
    with contextlib.suppress(OSError):  # a read-only cache only loses the offline shortcut
        write_atomically(ref, commit.encode("ascii"))


def _walk(top: Path) -> Iterator[Path]:
    for dirpath, _dirs, names in os.walk(top):
        for name in names:
            yield Path(dirpath) / name


def _cached_pointer(cache: Path, repo_id: str, commit: str, path: str, hub: str) -> Path:
    pointer = _storage(cache, repo_id) / "snapshots" / commit / path
    if not pointer.exists():
        raise FetchError(
            f"HF_HUB_OFFLINE is set and the hub cache {cache} lacks {repo_id}/{path} at {commit}; "
            f"unset it to fetch from {hub}"
        )
    return pointer


# -- choosing, placing and checking files ------------------------------------------------------


def _select(
    listing: Sequence[_Remote], patterns: Sequence[str], repo_id: str, commit: str
) -> list[_Remote]:
    """The files matching any pattern (all files when there are none); every pattern must match.

    Patterns are ``fnmatch`` globs on the repo path (``*`` crosses ``/``), as the hub client's
    ``allow_patterns``; a pattern ending in ``/`` matches everything under that folder.
    """
    globs = [p + "*" if p.endswith("/") else p for p in patterns]
    for pattern, glob in zip(patterns, globs, strict=True):
        if not any(fnmatch.fnmatchcase(r.path, glob) for r in listing):
            raise InputError(f"hub repo {repo_id} at {commit}: no file matches {pattern!r}")
    chosen = [r for r in listing if not globs or any(fnmatch.fnmatchcase(r.path, g) for g in globs)]
    if not chosen:
        raise InputError(f"hub repo {repo_id} at {commit} holds no files")
    for remote in chosen:  # names come from the hub: they must stay inside the directory
        check_relative_path(remote.path, what=f"hub repo {repo_id} file")
    return sorted(chosen, key=lambda r: r.path)


def _place(pointer: Path, staging: Path, remote: _Remote, repo_id: str, commit: str) -> HubFile:
    """Link (else copy) the cached file into ``staging`` and check it there against the hub."""
    blob = pointer.resolve()
    dest = staging / remote.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(blob, dest)
    except OSError:
        shutil.copyfile(blob, dest)
    size, sha256, blob_id = _hash_file(dest)
    where = f"hub file {repo_id}/{remote.path} at {commit}"
    problem: str | None = None
    if remote.lfs_sha256 is not None:
        if sha256 != remote.lfs_sha256:
            problem = f"sha256 {sha256} does not match the hub's {remote.lfs_sha256}"
    elif remote.blob_id is not None:
        if blob_id != remote.blob_id:
            problem = f"git blob id {blob_id} does not match the hub's {remote.blob_id}"
    else:
        problem = "there is no hash to check it against"
    if problem is None and remote.size is not None and size != remote.size:
        problem = f"size {size} does not match the hub's {remote.size}"
    if problem is not None:
        _evict(pointer, blob)
        raise ArtifactError(f"{where}: {problem}")
    return HubFile(path=remote.path, size=size, sha256=sha256)


def _evict(pointer: Path, blob: Path) -> None:
    """Drop a bad file from the hub cache, so that the next run downloads it afresh."""
    for path in (pointer, blob):
        with contextlib.suppress(OSError):
            path.unlink()


def _hash_file(path: Path) -> tuple[int, str, str]:
    """Size, sha256 and git blob id (sha1 of ``blob <size>\\0`` + content) in one read."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        sha256 = hashlib.sha256()
        git = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
        while chunk := f.read(CHUNK_SIZE):
            sha256.update(chunk)
            git.update(chunk)
    return size, sha256.hexdigest(), git.hexdigest()


def _default_out_dir(repo_id: str, commit: str, patterns: Sequence[str]) -> Path:
    selection = (
        hashlib.sha256(json.dumps(sorted(patterns)).encode()).hexdigest()[:16]
        if patterns
        else "all"
    )
    folder = "models--" + repo_id.replace("/", "--")
    return default_cache_root() / "hub" / folder / commit / selection


def _one_line(exc: BaseException) -> str:
    return one_line(exc) or type(exc).__name__
