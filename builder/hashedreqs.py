"""A hashed ``requirements.txt`` as a pip lock, and the small simple-index client that finds its
files by hash (docs/adr/0011-pip-lock-input.md says why this input is kept).

Such a file (``uv pip compile --generate-hashes``, ``pip-compile --generate-hashes``) pins
``name==version`` with ``--hash=sha256:`` options but names no files. :func:`load_requirements`
parses it with :class:`packaging.requirements.Requirement`, leaves out the lines whose markers
are false on the target, and looks each pin's hashes up on the recipe's indexes (PEP 691 JSON or
PEP 503 HTML pages) and ``find_links`` (an HTML page, or a local directory whose files are
hashed here). The hashes decide; the index only says where the files are: a file whose hash is
not one of the pin's is never taken, whatever its name.

The client only reads project pages; it resolves nothing. :func:`check_reachable` is also what
builder.piplock asks before it runs uv. Errors: :class:`~signing.errors.LockError` for a file
that is not a usable lock, :class:`~signing.errors.FetchError` naming the index or page that
cannot be reached.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote, urljoin, urlsplit
from urllib.request import url2pathname

import httpx
from packaging.markers import Marker, UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import NormalizedName, canonicalize_name

from builder.cache import sha256_file
from builder.recipe import PipEnvironment, find_links_entry
from builder.target import target_marker_environment
from builder.wheels import LockedFile, LockedPackage
from signing.errors import FetchError, LockError

HTTP_TIMEOUT = 30.0
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

_SIMPLE_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, "
    "text/html;q=0.01"
)


def check_reachable(url: str, what: str, *, timeout: float) -> None:
    """Any HTTP answer (even 404 or 405) proves the server is there; no answer is a FetchError.

    uv itself retries an unreachable index for many seconds and names only the page it wanted.
    """
    scheme = urlsplit(url).scheme
    if scheme not in ("http", "https"):
        local = Path(url2pathname(urlsplit(url).path)) if scheme == "file" else Path(url)
        if not local.exists():
            raise FetchError(f"{what} {url} is unreachable: no such file or directory")
        return
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True) as client:
            client.head(url)
    except httpx.HTTPError as exc:
        raise FetchError(f"{what} {url} is unreachable: {exc or type(exc).__name__}") from None


def marker_holds(path: Path, name: str, marker: Marker, environment: dict[str, str]) -> bool:
    """Whether a lock's ``marker`` for package ``name`` is true on the target; a marker that
    cannot be evaluated is a LockError naming the lock and the package."""
    try:
        return marker.evaluate(environment)
    except (ValueError, UndefinedEnvironmentName) as exc:  # InvalidMarker, UndefinedComparison
        raise LockError(f"lock {path}: package {name}: bad marker {str(marker)!r}: {exc}") from None


class _Pin(NamedTuple):
    name: str
    version: str
    hashes: frozenset[str]


def _logical_lines(text: str) -> Iterator[str]:
    pending = ""
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = (pending + line).strip(), ""
        if line:
            yield line
    if pending.strip():
        yield pending.strip()


def _parse_requirements(path: Path, text: str, env: PipEnvironment) -> list[_Pin]:
    markers = target_marker_environment(env.platform, env.python)
    pins = []
    for line in _logical_lines(text):
        if line.startswith("-"):
            option = line.split()[0].split("=")[0]
            if option in ("-r", "--requirement", "-c", "--constraint", "-e", "--editable"):
                raise LockError(f"lock {path}: '{option}' is not allowed in a lock file")
            continue  # --index-url and the like: the recipe's indexes are used
        spec, *options = re.split(r"\s+(?=--)", line)
        try:
            req = Requirement(spec)
        except InvalidRequirement as exc:
            raise LockError(f"lock {path}: {spec!r} is not a requirement: {exc}") from None
        pinned = [s for s in req.specifier if s.operator in ("==", "===") and "*" not in s.version]
        if req.url or len(pinned) != 1 or len(req.specifier) != 1:
            raise LockError(f"lock {path}: {spec!r} is not pinned as name==version")
        if req.marker is not None and not marker_holds(path, req.name, req.marker, markers):
            continue
        hashes = set()
        for option in options:
            kind, _, value = option.removeprefix("--hash").lstrip("= ").partition(":")
            if option.startswith("--hash") and kind == "sha256":
                hashes.add(value.strip().lower())
        if not hashes:
            raise LockError(f"lock {path}: {req.name} has no --hash=sha256: option")
        pins.append(_Pin(req.name, pinned[0].version, frozenset(hashes)))
    return pins


def load_requirements(
    path: Path, text: str, env: PipEnvironment, *, timeout: float = HTTP_TIMEOUT
) -> list[LockedPackage]:
    """The packages of a hashed requirements file, their files found by hash on
    ``env.index_url``, the extra indexes and then the ``find_links`` (a local one not anchored
    at a recipe yet is relative to the lock's directory). LockError naming the pin when no
    file has one of its hashes."""
    pins = _parse_requirements(path, text, env)
    sources = [env.index_url, *env.extra_index_urls]
    links = [find_links_entry(link, path.parent) for link in env.find_links]
    packages = []
    with httpx.Client(timeout=timeout, follow_redirects=True) as client:
        for pin in pins:
            found: dict[str, LockedFile] = {}
            for index in sources:
                for file in _index_files(client, index, pin.name):
                    if file.sha256 in pin.hashes:
                        found.setdefault(file.sha256, file)
                if len(found) == len(pin.hashes):
                    break
            if len(found) < len(pin.hashes):
                for link in links:
                    for file in _find_links_files(client, link, pin.name):
                        if file.sha256 in pin.hashes:
                            found.setdefault(file.sha256, file)
            if not found:
                where = ", ".join([*sources, *env.find_links])
                raise LockError(
                    f"lock {path}: no file of {pin.name} {pin.version} on {where} has one of "
                    "its locked hashes"
                )
            files = sorted(found.values(), key=lambda f: f.filename)
            wheels = [f for f in files if f.filename.endswith(".whl")]
            sdists = sorted(
                (f for f in files if not f.filename.endswith(".whl")),
                key=lambda f: (not f.filename.endswith(".tar.gz"), f.filename),
            )
            packages.append(LockedPackage(pin.name, pin.version, wheels, next(iter(sdists), None)))
    return packages


# -- the simple-index client --------------------------------------------------------------------


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href")
            self._text = ""

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.links.append((self._href, self._text.strip()))
            self._href = None


def _files_from_html(page_url: str, body: str) -> list[LockedFile]:
    parser = _Anchors()
    parser.feed(body)
    files = []
    for href, text in parser.links:
        url = urljoin(page_url, href)
        parts = urlsplit(url)
        algo, _, digest = parts.fragment.partition("=")
        if algo != "sha256" or not SHA256_HEX.match(digest.lower()):
            continue
        bare = parts._replace(fragment="").geturl()
        filename = text or unquote(parts.path.rsplit("/", 1)[-1])
        files.append(LockedFile(filename, bare, digest.lower()))
    return files


def _files_from_json(page_url: str, data: object) -> list[LockedFile]:
    entries = data.get("files", []) if isinstance(data, dict) else []
    files = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        hashes = entry.get("hashes")
        digest = hashes.get("sha256") if isinstance(hashes, dict) else None
        url, filename, size = entry.get("url"), entry.get("filename"), entry.get("size")
        if not (isinstance(digest, str) and isinstance(url, str) and isinstance(filename, str)):
            continue
        if not SHA256_HEX.match(digest.lower()):
            continue
        bare = urlsplit(urljoin(page_url, url))._replace(fragment="").geturl()
        files.append(
            LockedFile(filename, bare, digest.lower(), size if isinstance(size, int) else None)
        )
    return files


def _index_files(client: httpx.Client, index_url: str, name: str) -> list[LockedFile]:
    """The files of project ``name`` on a simple index (PEP 691 JSON or PEP 503 HTML)."""
    page = f"{index_url.rstrip('/')}/{canonicalize_name(name)}/"
    if urlsplit(page).scheme == "file":
        local = Path(url2pathname(urlsplit(page).path)) / "index.html"
        return _files_from_html(local.as_uri(), local.read_text()) if local.is_file() else []
    try:
        response = client.get(page, headers={"Accept": _SIMPLE_ACCEPT})
    except httpx.HTTPError as exc:
        raise FetchError(f"index {index_url} is unreachable: {exc or type(exc).__name__}") from None
    if response.status_code == 404:
        return []
    if response.status_code != 200:
        raise FetchError(f"index page {page} answered HTTP {response.status_code}")
    ctype = response.headers.get("content-type", "").split(";")[0].strip()
    if ctype == "application/vnd.pypi.simple.v1+json":
        try:
            return _files_from_json(str(response.url), response.json())
        except ValueError:
            raise FetchError(f"index page {page} is not valid JSON") from None
    return _files_from_html(str(response.url), response.text)


def _find_links_files(client: httpx.Client, link: str, name: str) -> list[LockedFile]:
    """Files of ``name`` in a find-links directory (hashed here) or HTML page (``#sha256=``)."""
    project = canonicalize_name(name)
    parts = urlsplit(link)
    if parts.scheme in ("http", "https"):
        try:
            response = client.get(link)
        except httpx.HTTPError as exc:
            raise FetchError(
                f"find-links {link} is unreachable: {exc or type(exc).__name__}"
            ) from None
        if response.status_code != 200:
            raise FetchError(f"find-links {link} answered HTTP {response.status_code}")
        files = _files_from_html(str(response.url), response.text)
    else:
        directory = Path(url2pathname(parts.path)) if parts.scheme == "file" else Path(link)
        files = (
            [
                LockedFile(p.name, p.resolve().as_uri(), sha256_file(p), p.stat().st_size)
                for p in sorted(directory.iterdir())
                if p.is_file() and _project_of(p.name) == project
            ]
            if directory.is_dir()
            else []
        )
    return [f for f in files if _project_of(f.filename) == project]


def _project_of(filename: str) -> NormalizedName | None:
    if filename.endswith(".whl"):
        head = filename.split("-", 1)[0]
    elif filename.endswith((".tar.gz", ".zip")):
        head = filename.removesuffix(".tar.gz").removesuffix(".zip").rsplit("-", 1)[0]
    else:
        return None
    return canonicalize_name(head)
