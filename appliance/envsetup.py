"""Offline set-up of a bundle's package environment inside a new slot (install step I7).

See docs/adr/0007-package-environments.md, "Install: step I7". The payload was verified while it
was streamed (I5); step I7 only turns it into the slot's ``env/``, with no network at any point.
:func:`setup_environment` is the entry: it checks what both kinds have in common, hands the
slot to appliance.pipsetup or appliance.condasetup, and flushes the slot's file system
(``syncfs``), because the slot is committed by a rename right after.

This module also holds what both kinds need of a child process, so that they run it the same
way: the environment a child gets (no index, no config, no user site: nothing of the caller's
that could add paths or reach a network), one run with a timeout whose failure is one line, the
smoke imports, and the ``.pth`` file that puts the host's own packages after the env's.

Every failure raises :class:`EnvironmentSetupError` with one line that names the package or
module; the installer then removes the staging slot.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import site
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

from appliance.fsutil import remove_tree
from appliance.limits import HOST_LIMITS
from appliance.slots import ENV_DIR, SlotPaths
from signing.bounded import one_line
from signing.canonical import encode_canonical
from signing.errors import EnvironmentSetupError
from signing.manifest import BundleManifest

PTH_NAME: Final = "_appliance_host.pth"
# Written last into a shared environment: only a complete one is reused.
COMPLETE_MARKER: Final = ".appliance-complete"


def setup_environment(slot: Path, manifest: BundleManifest) -> dict[str, Any]:
    """Set up ``manifest.environment`` for ``slot``; return a summary for the audit log:
    ``{"type": "pip" | "conda", "packages": N, "milliseconds": T, "key": K, "reused": B}``.

    Environments are shared by key (:func:`environment_key`): the slot's ``env`` is a link to
    ``ROOT/envs/<key>``. An environment made complete by an earlier install is reused as it is
    (its smoke imports run again); otherwise it is made there, and marked complete last, so
    that one left half made by a crash is made again, never reused.
    """
    spec = manifest.environment
    if spec is None:
        raise EnvironmentSetupError(f"{slot.name}: the bundle has no environment to set up")
    started = time.monotonic()
    host = f"{sys.version_info.major}.{sys.version_info.minor}"
    if spec.python != host:
        raise EnvironmentSetupError(
            f"bundle targets Python {spec.python}; this appliance runs {host}"
        )
    paths = SlotPaths(slot)
    if paths.env.exists() or paths.env.is_symlink():
        raise EnvironmentSetupError(f"{slot.name}: {ENV_DIR}/ exists already (a payload entry?)")
    key = environment_key(paths, manifest)
    shared, target = paths.shared_env(key)
    marker = shared / COMPLETE_MARKER
    reused = marker.is_file()
    if reused:
        paths.env.symlink_to(target)
        packages = _recorded_packages(marker)
        _smoke(paths, manifest)
    else:
        remove_tree(shared)  # a crash may have left it half made
        shared.mkdir(parents=True)
        paths.env.symlink_to(target)
        try:
            packages = _make(paths, manifest)
            _write_marker(marker, packages)
        except BaseException:
            remove_tree(shared)
            raise
    _sync_filesystem(slot)
    return {
        "type": spec.type,
        "packages": packages,
        # The audit log's canonical JSON has no floats: whole milliseconds.
        "milliseconds": round((time.monotonic() - started) * 1000),
        "key": key[:16],
        "reused": reused,
    }


def environment_key(paths: SlotPaths, manifest: BundleManifest) -> str:
    """What an environment is made of: the environment spec, the install list (which pins
    every package by sha256), and this appliance's interpreter, which a venv builds on."""
    spec = manifest.environment
    if spec is None:  # pragma: no cover - setup_environment checks first
        raise EnvironmentSetupError("the bundle has no environment")
    pinned = {e.path: e.sha256 for e in manifest.entries}
    facts = {
        "spec": spec.to_dict(),
        "install_list": pinned.get(spec.install_list, ""),
        "python": sys.version,
        "executable": os.path.realpath(sys.executable),
    }
    return hashlib.sha256(encode_canonical(facts)).hexdigest()


def _make(paths: SlotPaths, manifest: BundleManifest) -> int:
    spec = manifest.environment
    assert spec is not None  # noqa: S101 - setup_environment checks first
    # Imported here, not at the top: both build on this module's child-process helpers.
    if spec.type == "pip":
        from appliance.pipsetup import setup_pip  # noqa: PLC0415

        return setup_pip(paths, spec)
    from appliance.condasetup import setup_conda  # noqa: PLC0415

    return setup_conda(paths, manifest, spec)


def _smoke(paths: SlotPaths, manifest: BundleManifest) -> None:
    """A reused environment's smoke imports, run again: it may have been damaged since."""
    spec = manifest.environment
    if spec is None or not spec.smoke_imports or not paths.env_python.exists():
        return
    error = smoke_imports([str(paths.env_python)], spec.smoke_imports)
    if error is not None:
        raise EnvironmentSetupError(
            f"the shared environment {paths.env.readlink().name[:16]} "
            f"fails its smoke imports: {error}"
        )


def _write_marker(marker: Path, packages: int) -> None:
    with marker.open("w", encoding="utf-8") as fh:
        fh.write(json.dumps({"packages": packages}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _recorded_packages(marker: Path) -> int:
    try:
        value = json.loads(marker.read_text(encoding="utf-8")).get("packages", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) else 0


# -- child processes ----------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment for pip and the env's interpreter: no index, no config, no user site,
    nothing from PYTHON* or PIP_* of the caller that could add paths or reach a network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "CONDA_"))}
    env |= {
        "PIP_NO_INDEX": "1",
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
        "PIP_NO_CACHE_DIR": "1",
        "PYTHONNOUSERSITE": "1",
    }
    return env


def run_child(
    argv: Sequence[str], *, timeout: float, what: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion with :func:`child_env` (or ``env``), no stdin, its output
    captured; a child that cannot start or outlives ``timeout`` is a set-up failure."""
    try:
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=env if env is not None else child_env(),
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise EnvironmentSetupError(f"{what} did not finish within {timeout:.0f} s") from None
    except OSError as exc:
        raise EnvironmentSetupError(f"cannot run {what}: {exc}") from None


_SMOKE_SCRIPT: Final = """
import importlib, sys, traceback
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except BaseException:
        last = traceback.format_exc().strip().splitlines()[-1]
        sys.stderr.write(name + "\\t" + last + "\\n")
        sys.exit(1)
"""


def smoke_imports(
    python: Sequence[str], modules: Iterable[str], *, site_dir: Path | None = None
) -> str | None:
    """Import every module with the environment's interpreter (``python``, and ``site_dir``
    added as a site directory first); return the one-line error, or None when all import."""
    names = list(modules)
    if not names:
        return None
    script = _SMOKE_SCRIPT
    if site_dir is not None:
        script = f"import site; site.addsitedir({str(site_dir)!r})\n" + script
    result = run_child(
        [*python, "-c", script, *names],
        timeout=HOST_LIMITS.smoke_import_timeout_s,
        what="smoke imports",
    )
    if result.returncode == 0:
        return None
    lines = [line for line in result.stderr.splitlines() if "\t" in line]
    if lines:
        module, _, reason = lines[-1].partition("\t")
        return one_line(f"smoke import of {module!r} failed: {reason}")
    tail = [line for line in result.stderr.splitlines() if line.strip()]
    reason = tail[-1] if tail else f"exit status {result.returncode}"
    return one_line(f"smoke import of {names[0]!r} failed: {reason}")


# -- the host's packages after the env's --------------------------------------------------------


def write_host_pth(site_packages: Path) -> None:
    """Append the host's package directories after the env's own (ADR 0007): plain lines for
    the directories that hold ``appliance`` and ``signing``, and ``site.addsitedir`` for the
    host's site directories, so that their own .pth files (editable installs) work too."""
    sites = _host_site_dirs()
    plain: list[str] = []
    for module in ("appliance", "signing"):
        found = importlib.util.find_spec(module)
        if found is not None and found.origin is not None:
            root = str(Path(found.origin).resolve().parent.parent)
            if root not in plain and root not in sites:
                plain.append(root)
    lines = [*plain, *(f"import site; site.addsitedir({d!r})" for d in sites)]
    site_packages.mkdir(parents=True, exist_ok=True)
    (site_packages / PTH_NAME).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _host_site_dirs() -> list[str]:
    candidates = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    ordered = [p for p in sys.path if p in candidates] + candidates
    seen: list[str] = []
    for path in ordered:
        if path not in seen and Path(path).is_dir():
            seen.append(path)
    return seen


def _sync_filesystem(path: Path) -> None:
    """Make everything written under ``path`` durable: ``syncfs`` on its file system (one
    flush, instead of an fsync per file of thousands), ``os.sync`` where syncfs is missing."""
    import ctypes  # noqa: PLC0415 - only once per install, at its end

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if libc.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    os.sync()
