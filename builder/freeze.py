"""``appliance-builder freeze``: the offline half as one standalone program (docs/adr/0018).

PyInstaller turns ``appliance`` (trust, verify, install, status, rollback, history, preflight,
keys, serve, service) into a one-folder program with its own CPython, the whole standard
library, pip and the llama.cpp engine; the spec and the hooks for what PyInstaller's analysis
cannot see are in ``builder/freeze_hooks/``. The inputs are pinned: PyInstaller and its hooks by
``lockfiles/requirements.appliance-freeze.txt`` (checked here, before anything runs), the
appliance's own dependencies by ``pyproject.toml``.

Reproducible, byte for byte, on one machine: PyInstaller runs in a child process with a fixed
``PYTHONHASHSEED`` (frozensets and sets in the byte-code keep their order),
``SOURCE_DATE_EPOCH`` (time stamps in the archives), ``PYTHONDONTWRITEBYTECODE`` (no
``__pycache__`` of a first run feeds a second one: PyInstaller's notes on reproducible builds)
and a fresh work directory every time. The one-folder program is handed over as a tar written
here in one deterministic order (names sorted, owner 0, mode 0755 or 0644, time stamp
``SOURCE_DATE_EPOCH``, GNU format): **the program's sha256 is that tar's sha256**. A one-file
build (``--onefile``) is the single executable, and its sha256 is the file's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Final

from signing.errors import InputError

HOOKS: Final = Path(__file__).resolve().parent / "freeze_hooks"
SPEC: Final = HOOKS / "appliance.spec"
LOCK: Final = (
    Path(__file__).resolve().parents[1] / "lockfiles" / "requirements.appliance-freeze.txt"
)
# 2026-01-01T00:00:00Z: a fixed time for every time stamp of the program.
SOURCE_DATE_EPOCH: Final = 1767225600
HASH_SEED: Final = "0"
PROGRAM: Final = "appliance"
FREEZE_TIMEOUT_S: Final = 1800.0


@dataclass(frozen=True)
class FrozenProgram:
    """What ``freeze`` made: the file to carry, its sha256 and size, and the folder."""

    artifact: Path  # the tar of the folder, or the one-file executable
    sha256: str
    size: int
    folder: Path | None  # the unpacked one-folder program (None for --onefile)
    version: str


def pinned_freeze_tools(lock: Path = LOCK) -> dict[str, str]:
    """The ``name==version`` pins of the freeze lock (its hashes are for pip)."""
    pins: dict[str, str] = {}
    for raw in lock.read_text(encoding="utf-8").replace("\\\n", " ").splitlines():
        line = raw.split("#", 1)[0].strip()
        if "==" in line:
            name, _, rest = line.partition("==")
            pins[name.strip().lower()] = rest.split()[0]
    return pins


def check_freeze_tools(lock: Path = LOCK) -> None:
    """Refuse to freeze with PyInstaller (or its hooks) other than the lock's."""
    for name, want in sorted(pinned_freeze_tools(lock).items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have != want:
            raise InputError(
                f"freeze needs {name}=={want} ({lock.name}), this Python has "
                f"{have or 'none'}: pip install --require-hashes -r lockfiles/{lock.name}"
            )


def freeze(out: Path, *, onefile: bool = False) -> FrozenProgram:
    """Build the standalone ``appliance`` into ``out`` (module docstring)."""
    check_freeze_tools()
    version = metadata.version("airgap-appliance")
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env |= {
        "PYTHONHASHSEED": HASH_SEED,
        "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH),
        "PYTHONDONTWRITEBYTECODE": "1",
        "APPLIANCE_FREEZE_ONEFILE": "1" if onefile else "0",
    }
    with tempfile.TemporaryDirectory(prefix="appliance-freeze-") as tmp:
        dist = Path(tmp) / "dist"
        command = [
            sys.executable,
            "-m",
            "PyInstaller",
            "--noconfirm",
            "--clean",
            "--log-level",
            "WARN",
            "--distpath",
            str(dist),
            "--workpath",
            str(Path(tmp) / "work"),
            str(SPEC),
        ]
        try:
            result = subprocess.run(
                command,
                env=env,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=FREEZE_TIMEOUT_S,
                check=False,
                cwd=tmp,
            )
        except subprocess.TimeoutExpired:
            limit = f"{FREEZE_TIMEOUT_S:.0f} s"
            raise InputError(f"PyInstaller did not finish within {limit}") from None
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            raise InputError(f"PyInstaller failed: {lines[-1] if lines else 'no output'}")
        if onefile:
            target = out / PROGRAM
            _replace(dist / PROGRAM, target)
            return FrozenProgram(
                artifact=target,
                sha256=_file_sha256(target),
                size=target.stat().st_size,
                folder=None,
                version=version,
            )
        folder = out / PROGRAM
        _replace(dist / PROGRAM, folder)
    artifact = out / f"{PROGRAM}-{version}-linux-{os.uname().machine}.tar"
    write_program_tar(folder, artifact)
    return FrozenProgram(
        artifact=artifact,
        sha256=_file_sha256(artifact),
        size=artifact.stat().st_size,
        folder=folder,
        version=version,
    )


def write_program_tar(folder: Path, tar_path: Path) -> None:
    """``folder`` as a tar whose bytes depend on the files' names and contents only (module
    docstring); its members are ``appliance/...``."""
    partial = tar_path.with_name(tar_path.name + ".partial")
    paths = sorted(
        [folder, *folder.rglob("*")], key=lambda p: p.relative_to(folder.parent).as_posix()
    )
    with tarfile.open(partial, "w", format=tarfile.GNU_FORMAT) as tar:
        for path in paths:
            info = tar.gettarinfo(str(path), arcname=path.relative_to(folder.parent).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = SOURCE_DATE_EPOCH
            if info.isdir() or (info.isfile() and info.mode & stat.S_IXUSR):
                info.mode = 0o755
            elif info.issym():
                info.mode = 0o777
            else:
                info.mode = 0o644
            if info.isfile():
                with path.open("rb") as data:
                    tar.addfile(info, data)
            else:
                tar.addfile(info)
    partial.replace(tar_path)


def handover_text(program: FrozenProgram) -> str:
    """What the operator of an isolated host must receive out of band (docs/operator-guide.md,
    "First install on a new host")."""
    name = program.artifact.name
    lines = [
        f"program   {name}",
        f"sha256    {program.sha256}",
        f"size      {program.size} bytes",
    ]
    if program.folder is not None:
        unpacked = sum(p.stat().st_size for p in program.folder.rglob("*") if p.is_file())
        lines.append(f"unpacked  {unpacked} bytes (one folder: {PROGRAM}/{PROGRAM})")
    lines += [
        "hand over out of band (not with the media): this sha256, and the root fingerprint",
        "  (appliance-builder root fingerprint root.json); on the host, before anything else:",
        f"  sha256sum {name}   # must print the sha256 above",
    ]
    return "\n".join(lines)


def _replace(source: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()
    shutil.move(str(source), str(target))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while chunk := data.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
