"""The standalone ``appliance`` for the tests: frozen once per set of inputs, then reused.

``appliance-builder freeze`` takes a minute or two on two cores, and tests/test_freeze.py,
tests/test_nopython_host.py and bench/bench_freeze.py all need the program. It is built into
``.build/frozen/<key>/`` where the key is a hash of everything that goes in: the sources of
``appliance``, ``signing`` and the freeze (spec, hooks, lock) and the name and version of every
installed distribution. A folder for a key exists only once the freeze has finished (written
aside, then renamed), so an interrupted run builds again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".build" / "frozen"
BUILDER = Path(sys.executable).parent / "appliance-builder"


@dataclass(frozen=True)
class Frozen:
    folder: Path  # .../appliance (the program is folder / "appliance")
    tar: Path
    sha256: str
    output: str  # what freeze printed
    key: str = ""  # the inputs it was frozen from (inputs_key)

    @property
    def program(self) -> Path:
        return self.folder / "appliance"


def inputs_key() -> str:
    digest = hashlib.sha256()
    sources = [
        *sorted((REPO / "appliance").rglob("*.py")),
        *sorted((REPO / "signing").rglob("*.py")),
        *sorted((REPO / "builder" / "freeze_hooks").iterdir()),
        REPO / "builder" / "freeze.py",
        REPO / "lockfiles" / "requirements.appliance-freeze.txt",
    ]
    for path in sources:
        if path.is_file():
            digest.update(path.relative_to(REPO).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    dists = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions())
    digest.update("\n".join(dists).encode())
    return digest.hexdigest()[:16]


def run_freeze(output: Path) -> Frozen:
    """``appliance-builder freeze -o output``; the printed sha256 is checked against the tar."""
    result = subprocess.run(
        [str(BUILDER), "freeze", "-o", str(output)],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    fields = dict(line.split(None, 1) for line in result.stdout.splitlines() if line[:1].isalpha())
    tar = output / fields["program"].strip()
    return Frozen(
        folder=output / "appliance",
        tar=tar,
        sha256=fields["sha256"].strip(),
        output=result.stdout,
    )


def frozen_program() -> Frozen:
    """The program for the current inputs, frozen now if no earlier run left one."""
    key = inputs_key()
    done = CACHE / key
    if not (done / "appliance" / "appliance").is_file():
        partial = CACHE / f"{key}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        made = run_freeze(partial)
        (partial / "freeze-output.txt").write_text(made.output, encoding="utf-8")
        if (done / "appliance" / "appliance").is_file():  # another run was faster
            shutil.rmtree(partial, ignore_errors=True)
        else:
            shutil.rmtree(done, ignore_errors=True)
            partial.rename(done)
        stale = time.time() - 3600
        for old in CACHE.iterdir():  # programs of earlier inputs (300 MB each), an hour on
            if old != done and old.stat().st_mtime < stale:
                shutil.rmtree(old, ignore_errors=True)
    text = (done / "freeze-output.txt").read_text(encoding="utf-8")
    fields = dict(line.split(None, 1) for line in text.splitlines() if line[:1].isalpha())
    return Frozen(
        folder=done / "appliance",
        tar=done / fields["program"].strip(),
        sha256=fields["sha256"].strip(),
        output=text,
        key=key,
    )
