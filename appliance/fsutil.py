"""Durable file system primitives: every persistent write is temp file, fsync, rename, fsync.

A crash at any instant leaves either the old or the new file, never a torn one (invariant 2).
Temporary names start with ``.tmp-`` so that recovery can find and remove them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Final

TMP_PREFIX: Final = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    tmp = path.with_name(TMP_PREFIX + path.name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    fsync_dir(path.parent)


def atomic_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` atomically: a new link renamed over the old one."""
    tmp = link.with_name(TMP_PREFIX + link.name)
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)
    fsync_dir(link.parent)


def remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def remove_temporaries(directory: Path) -> None:
    """Remove what an interrupted :func:`atomic_write` or :func:`atomic_symlink` left behind."""
    for leftover in directory.glob(TMP_PREFIX + "*"):
        remove_tree(leftover)
