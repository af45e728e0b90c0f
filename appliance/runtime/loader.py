"""Loading the model of a slot, as its signed manifest says, and checking that it runs.

The health check runs in a child process (``python -m appliance.runtime.healthcheck``): a model
file that crashes native code, or hangs, or eats all memory takes the child down, not the
installer, and a timeout bounds it (docs/bundle-format.md, step I7).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from appliance.limits import HOST_LIMITS
from appliance.runtime.base import Backend, RuntimeSettings
from appliance.runtime.cpuvariant import BACKEND_PREFIX, CPU_VARIANT_PREFIX
from appliance.runtime.memreport import MEMORY_PREFIX
from appliance.slots import SlotPaths, env_python
from signing.errors import IntegrityError, ModelError
from signing.manifest import BundleManifest

LOG = logging.getLogger(__name__)
PARENT_ENV = "APPLIANCE_HEALTH_CHECK_PARENT"  # the installer's pid, for the health check child


def slot_runtime_settings(slot: Path, *, parallel: int = 4) -> RuntimeSettings:
    """The runtime settings of a slot, from the manifest that was verified at install."""
    paths = SlotPaths(slot)
    try:
        manifest = BundleManifest.from_bytes(paths.manifest.read_bytes())
    except OSError as exc:
        raise IntegrityError(f"slot {slot.name} has no readable manifest: {exc}") from None
    settings = RuntimeSettings.from_manifest(
        manifest.runtime,
        model_path=paths.payload / manifest.model_path,
        model_id=manifest.name,
        parallel=parallel,
        memory_estimate=manifest.requires.memory_estimate if manifest.requires else None,
    )
    adapters = tuple(paths.payload / a.path for a in manifest.model_adapters)
    return replace(settings, slot=slot, adapters=adapters)


def load_backend(settings: RuntimeSettings) -> Backend:
    if settings.backend == "llama.cpp":
        # llama.cpp's own server, supervised (docs/adr/0014); it runs the CPU variant this
        # host executes (remembered in the slot by the health check).
        from appliance.runtime.llamaserver import load_llama_server  # noqa: PLC0415

        return load_llama_server(settings)
    from appliance.runtime.transformers_backend import (  # noqa: PLC0415 - heavy, optional
        load_transformers,
    )

    return load_transformers(settings)


def run_slot_child(
    slot: Path, module: str, *args: str, timeout_s: float
) -> subprocess.CompletedProcess[str] | None:
    """``python -m module SLOT ARGS`` under the slot environment's interpreter when the slot has
    one (its own packages first, the appliance's after them: docs/adr/0007), else under this
    one; its output as text, or None when it ran past ``timeout_s`` (it is killed then). The
    child knows its parent (:data:`PARENT_ENV`): it dies with the installer."""
    python = env_python(slot)
    command = [str(python or sys.executable), "-m", module, str(slot), *args]
    try:
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            env=os.environ | {PARENT_ENV: str(os.getpid())},
        )
    except subprocess.TimeoutExpired:
        return None


def health_check(slot: Path, *, timeout_s: float = HOST_LIMITS.health_check_timeout_s) -> str:
    """Load the slot's model in a child process and generate a few tokens; return the text."""
    result = run_slot_child(slot, "appliance.runtime.healthcheck", timeout_s=timeout_s)
    if result is None:
        raise ModelError(f"health check: the model did not answer within {timeout_s:.0f} s")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.returncode != 0:
        reasons = [line for line in lines if not line.startswith(MEMORY_PREFIX)]
        reason = reasons[-1] if reasons else f"exit status {result.returncode}"
        raise ModelError(f"health check failed: {reason}")
    for line in lines:
        if line.startswith((MEMORY_PREFIX, CPU_VARIANT_PREFIX)):
            LOG.info("health check: %s", line)
        elif line.startswith(BACKEND_PREFIX):  # a GPU backend skipped: the operator should know
            LOG.warning("health check: %s", line)
    return result.stdout.strip()
