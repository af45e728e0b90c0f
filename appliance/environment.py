"""Offline set-up of a bundle's package environment inside a new slot (install step I7).

Placeholder: the implementation lands with issue 3 (see docs/adr/0007-package-environments.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from signing.errors import EnvironmentSetupError
from signing.manifest import BundleManifest


def setup_environment(slot: Path, manifest: BundleManifest) -> dict[str, Any]:
    """Set up ``manifest.environment`` in ``slot/env``; return a summary for the audit log."""
    raise EnvironmentSetupError(f"{slot.name}: package environments are not supported yet")
