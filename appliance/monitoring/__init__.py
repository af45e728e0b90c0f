"""The monitoring that ships with the appliance: a Grafana dashboard and Prometheus alert rules.

Both read what ``appliance serve`` exports on ``/metrics`` (appliance.server.metrics and
appliance.server.gpumetrics). They are package data: installed with the appliance on the host,
and written out for the operator by ``appliance monitoring export DIR`` (docs/operator-guide.md,
"Monitoring").
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Final

from appliance.fsutil import atomic_write
from signing.errors import InputError

DASHBOARD: Final = "dashboard.json"
ALERTS: Final = "alerts.yml"
FILES: Final = (DASHBOARD, ALERTS)


def read(name: str) -> bytes:
    """One of :data:`FILES`, as shipped."""
    if name not in FILES:
        raise InputError(f"no monitoring file {name!r}; there are {', '.join(FILES)}")
    return files(__name__).joinpath(name).read_bytes()


def export(directory: Path) -> list[Path]:
    """Write :data:`FILES` into ``directory`` (made if missing; files there are replaced)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for name in FILES:
            target = directory / name
            atomic_write(target, read(name))
            written.append(target)
    except OSError as exc:
        raise InputError(f"cannot write the monitoring files into {directory}: {exc}") from None
    return written
