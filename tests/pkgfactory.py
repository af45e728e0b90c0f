"""Real packages made by the tests: wheels, sdists, conda packages, a PEP 503 index and an
indexed conda channel. Nothing is mocked: pip, uv and py-rattler read what these write.

- :func:`make_wheel` writes a valid pure-Python (or platform-tagged) wheel with a RECORD.
- :func:`make_sdist` writes a minimal setuptools sdist (for the "sdist only" cases).
- :func:`make_simple_index` lays out ``simple/<name>/index.html`` pages (PEP 503) whose links
  carry ``#sha256=`` fragments, pointing at files under ``files/``.
- :func:`make_conda_package` writes a ``.tar.bz2`` conda package (info/index.json,
  info/paths.json, info/files, the payload files).
- :func:`make_conda_channel` puts packages in ``<channel>/<subdir>/`` and indexes it with
  ``rattler.index.index_fs``.
"""

from __future__ import annotations

import base64
import bz2
import hashlib
import html
import io
import json
import re
import shutil
import tarfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def make_wheel(
    out_dir: Path,
    name: str,
    version: str,
    *,
    requires: Sequence[str] = (),
    files: Mapping[str, str] | None = None,
    tag: str = "py3-none-any",
) -> Path:
    """A wheel whose import package is ``name`` with dashes as underscores, unless ``files``
    (path in the wheel -> text) says otherwise."""
    dist = re.sub(r"[-.]+", "_", name)
    module = dist.lower()
    if files is None:
        files = {f"{module}/__init__.py": f"__version__ = {version!r}\n"}
    info = f"{dist}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    wheel_meta = f"Wheel-Version: 1.0\nGenerator: pkgfactory\nRoot-Is-Purelib: true\nTag: {tag}\n"
    contents = dict(files) | {f"{info}/METADATA": metadata, f"{info}/WHEEL": wheel_meta}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{dist}-{version}-{tag}.whl"
    record_lines = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for arcname in sorted(contents):
            data = contents[arcname].encode()
            info_z = zipfile.ZipInfo(arcname, date_time=(2020, 1, 1, 0, 0, 0))
            info_z.external_attr = 0o644 << 16
            zf.writestr(info_z, data)
            record_lines.append(f"{arcname},{_record_hash(data)},{len(data)}")
        record_lines.append(f"{info}/RECORD,,")
        info_r = zipfile.ZipInfo(f"{info}/RECORD", date_time=(2020, 1, 1, 0, 0, 0))
        zf.writestr(info_r, "\n".join(record_lines) + "\n")
    return path


def make_sdist(
    out_dir: Path,
    name: str,
    version: str,
    *,
    requires: Sequence[str] = (),
    files: Mapping[str, str] | None = None,
) -> Path:
    """A minimal setuptools sdist that builds into a pure-Python wheel; ``files`` (path in the
    source tree -> text) are added to it, a ``setup.py`` for example."""
    dist = re.sub(r"[-.]+", "_", name)
    module = dist.lower()
    base = f"{dist}-{version}"
    pyproject = (
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{name}"\nversion = "{version}"\n'
        f"dependencies = {json.dumps(list(requires))}\n"
        f'[tool.setuptools]\npackages = ["{module}"]\n'
    )
    pkg_info = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    members = {
        f"{base}/pyproject.toml": pyproject,
        f"{base}/PKG-INFO": pkg_info,
        f"{base}/{module}/__init__.py": f"__version__ = {version!r}\n",
    } | {f"{base}/{rel}": text for rel, text in (files or {}).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{base}.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tf:
        for arcname, text in sorted(members.items()):
            data = text.encode()
            info = tarfile.TarInfo(arcname)
            info.size = len(data)
            info.mtime = 1577836800
            tf.addfile(info, io.BytesIO(data))
    return path


def make_simple_index(www: Path, artifacts: Iterable[Path], *, prefix: str = "") -> Path:
    """Copy ``artifacts`` to ``www/files/`` and write PEP 503 pages under ``www/simple/``.

    Returns the index directory; its URL is ``<server>/simple/``. ``prefix`` is prepended to
    file links (default: a path relative to the server root).
    """
    files = www / "files"
    files.mkdir(parents=True, exist_ok=True)
    by_project: dict[str, list[Path]] = {}
    for artifact in artifacts:
        target = files / artifact.name
        if target != artifact:
            shutil.copyfile(artifact, target)
        project = normalize(_project_of(artifact.name))
        by_project.setdefault(project, []).append(target)
    simple = www / "simple"
    simple.mkdir(parents=True, exist_ok=True)
    links = []
    for project, paths in sorted(by_project.items()):
        (simple / project).mkdir(exist_ok=True)
        anchors = "".join(
            f'<a href="{prefix}/files/{html.escape(p.name)}#sha256='
            f'{hashlib.sha256(p.read_bytes()).hexdigest()}">{html.escape(p.name)}</a><br/>\n'
            for p in sorted(paths)
        )
        (simple / project / "index.html").write_text(
            f"<!DOCTYPE html><html><body>\n{anchors}</body></html>\n"
        )
        links.append(f'<a href="{project}/">{project}</a><br/>\n')
    (simple / "index.html").write_text(
        "<!DOCTYPE html><html><body>\n" + "".join(links) + "</body></html>\n"
    )
    return simple


def _project_of(filename: str) -> str:
    if filename.endswith(".whl"):
        return filename.split("-", maxsplit=1)[0]
    return filename.removesuffix(".tar.gz").rsplit("-", 1)[0]


def make_conda_package(
    out_dir: Path,
    name: str,
    version: str,
    *,
    build: str = "0",
    build_number: int = 0,
    depends: Sequence[str] = (),
    subdir: str = "noarch",
    files: Mapping[str, bytes] | None = None,
) -> Path:
    """A ``<name>-<version>-<build>.tar.bz2`` conda package holding ``files`` (prefix-relative
    path -> bytes); by default one file ``share/<name>/VERSION``."""
    if files is None:
        files = {f"share/{name}/VERSION": f"{version}\n".encode()}
    index = {
        "name": name,
        "version": version,
        "build": build,
        "build_number": build_number,
        "depends": list(depends),
        "license": "MIT",
        "subdir": subdir,
        "timestamp": 1577836800000,
    }
    if subdir == "noarch":
        index["noarch"] = "generic"
    else:
        index["platform"], index["arch"] = _platform_arch(subdir)
    paths = {
        "paths": [
            {
                "_path": p,
                "path_type": "hardlink",
                "sha256": hashlib.sha256(data).hexdigest(),
                "size_in_bytes": len(data),
            }
            for p, data in sorted(files.items())
        ],
        "paths_version": 1,
    }
    members: dict[str, bytes] = {
        "info/index.json": json.dumps(index, indent=2, sort_keys=True).encode(),
        "info/paths.json": json.dumps(paths, indent=2, sort_keys=True).encode(),
        "info/files": "".join(f"{p}\n" for p in sorted(files)).encode(),
    } | dict(files)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for arcname, data in sorted(members.items()):
            info = tarfile.TarInfo(arcname)
            info.size = len(data)
            info.mtime = 1577836800
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{version}-{build}.tar.bz2"
    path.write_bytes(bz2.compress(raw.getvalue()))
    return path


def _platform_arch(subdir: str) -> tuple[str, str]:
    platform, arch = subdir.split("-", 1)
    return platform, {"64": "x86_64", "aarch64": "aarch64"}.get(arch, arch)


def make_conda_channel(channel: Path, packages: Iterable[Path]) -> Path:
    """Move ``packages`` into ``channel/<subdir>/`` (read from their index.json) and index the
    channel with py-rattler; ``noarch/`` is always present, as conda requires."""
    import rattler.index

    (channel / "noarch").mkdir(parents=True, exist_ok=True)
    for package in packages:
        with tarfile.open(fileobj=io.BytesIO(bz2.decompress(package.read_bytes()))) as tf:
            member = tf.extractfile("info/index.json")
            assert member is not None
            subdir = json.loads(member.read())["subdir"]
        (channel / subdir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(package, channel / subdir / package.name)
    _run_index(rattler.index.index_fs, channel)
    return channel


def _run_index(index_fs: object, channel: Path) -> None:
    import asyncio
    import inspect

    result = index_fs(channel)  # type: ignore[operator]
    if inspect.isawaitable(result):
        asyncio.run(result)  # type: ignore[arg-type]
