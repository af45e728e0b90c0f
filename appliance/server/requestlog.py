"""The request log: one JSON object per line, appended; prompt text only if asked for.

Distinct from the host's hash-chained audit log (``audit.jsonl``), which records what happened
to the host (installs, rollbacks); this one records who asked the model what, and how it went.
Each line is written with one ``write`` on an ``O_APPEND`` descriptor, so lines never interleave.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from signing.errors import StateError


class RequestLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # 0600: with log_prompts on, the log holds what users asked.
            self._fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise StateError(f"cannot open request log {self.path}: {exc.strerror}") from None

    def write(self, entry: dict[str, Any]) -> None:
        if self._fd is None:
            return
        line = json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"
        os.write(self._fd, line.encode("utf-8"))

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
