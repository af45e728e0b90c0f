"""Fault injection for the crash and disk-full tests (docs/adr/0004).

The installer calls :func:`fault` at named steps; it does nothing unless the environment variable
``APPLIANCE_FAULT_INJECT`` names that step. Real faults, not mocks: the process really dies, the
file system really fills. The health-check child honours ``hang:health-check`` the same way
(appliance.runtime.healthcheck), so signals can be tested while it runs.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Final

FAULT_ENV: Final = "APPLIANCE_FAULT_INJECT"
# The faults of FAULT_ENV: "STEP" kills the process at STEP; "fill-disk:STEP" fills the file
# system of the host root at STEP, so that every later write meets a real ENOSPC.
_FILL_DISK: Final = "fill-disk:"


def fault(step: str, root: Path) -> None:
    """Fault injection for the crash and disk-full tests, at a named step (docs/adr/0004).

    Only active when APPLIANCE_FAULT_INJECT names this step: ``STEP`` kills the process with
    SIGKILL; ``fill-disk:STEP`` fills the host root's file system (``.fault-fill``) so that the
    steps after it meet a real ENOSPC.
    """
    fault = os.environ.get(FAULT_ENV)
    if fault == step:
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == _FILL_DISK + step:
        fd = os.open(root / ".fault-fill", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 20, 1 << 12, 1):  # down to the last partial block
                block = bytes(size)
                try:
                    while os.write(fd, block):
                        pass
                except OSError:
                    continue
        finally:
            os.close(fd)
