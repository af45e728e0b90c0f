"""Helpers for tests/test_pipenv.py: a simple index served by the real loopback server, recipe
environments, and an sdist whose build shows the build environment it saw.

``LocalServer`` serves files only; a PEP 503 index is made of directories (``/simple/<name>/``),
so :func:`serve_index` adds a route that answers a directory with its ``index.html`` or, with
``json=True``, with the PEP 691 JSON form of the same page.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from localhttp import LocalServer
from pkgfactory import _project_of, make_sdist, make_simple_index, normalize

from builder.recipe import PipEnvironment

PEP691 = "application/vnd.pypi.simple.v1+json"


def serve_index(server: LocalServer, artifacts: Iterable[Path], *, json_api: bool = False) -> str:
    """Put ``artifacts`` on a simple index under ``server``; return the index URL."""
    simple = make_simple_index(server.root, artifacts)

    def route(path: str, _headers: Mapping[str, str]) -> tuple[int, dict[str, str], bytes] | None:
        rel = path.split("?", 1)[0].removeprefix("/simple").strip("/")
        page = simple / rel / "index.html"
        if not page.is_file():
            return None
        if json_api and rel:
            return 200, {"Content-Type": PEP691}, _json_page(server.root, rel)
        return 200, {"Content-Type": "text/html"}, page.read_bytes()

    server.route("/simple", route)
    return f"{server.url}/simple"


def _json_page(root: Path, project: str) -> bytes:
    files = []
    for path in sorted((root / "files").iterdir()):
        if normalize(_project_of(path.name)) != project:
            continue
        data = path.read_bytes()
        files.append(
            {
                "filename": path.name,
                "url": f"../../files/{path.name}",
                "hashes": {"sha256": hashlib.sha256(data).hexdigest()},
                "size": len(data),
            }
        )
    page = {"meta": {"api-version": "1.1"}, "name": project, "files": files}
    return json.dumps(page).encode()


def pip_env(**fields: Any) -> PipEnvironment:
    """A pip environment for manylinux_2_28_x86_64 / Python 3.11, with ``fields`` set."""
    data: dict[str, Any] = {
        "type": "pip",
        "platform": "manylinux_2_28_x86_64",
        "python": "3.11",
        "requirements": ["alpha"],
    }
    return PipEnvironment.model_validate(data | fields)


def closed_port_url() -> str:
    """An http:// URL on loopback where nothing listens (the port was bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/simple"


SETUP_PY = """\
import os
from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "flagged", "flag.txt")
        with open(target, "w") as handle:
            handle.write(os.environ.get("AIRGAP_TEST_FLAG", "unset"))


setup(cmdclass={"build_py": BuildPy})
"""


def make_flag_sdist(out_dir: Path, version: str = "1.0") -> Path:
    """An sdist of ``flagged`` whose wheel holds ``flagged/flag.txt``: the value of
    ``$AIRGAP_TEST_FLAG`` during the build ("unset" without it)."""
    return make_sdist(out_dir, "flagged", version, files={"setup.py": SETUP_PY})
