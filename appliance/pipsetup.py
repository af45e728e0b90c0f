"""A pip environment, set up offline in a slot (step I7 for ``environment.type = "pip"``).

A venv made by this very interpreter (no pip inside it), filled by the host's own pip running
*under the venv's interpreter* (pip's ``__pip-runner__.py``, the mechanism behind ``pip
--python``, in one process start instead of two) with ``--no-index --require-hashes --no-deps
--find-links``; then, side by side, ``pip check``, the smoke imports and the byte-compilation on
every core; last a ``.pth`` file that appends the host's own package directories after the
venv's (docs/adr/0007-package-environments.md).

pip decides what installs; this module only turns pip's output into one line that names the
package. The install list and the wheel names are read with PyPA's ``packaging``, the parser
pip itself uses, so that a name is normalised here exactly as pip normalises it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import (
    InvalidWheelFilename,
    NormalizedName,
    canonicalize_name,
    parse_wheel_filename,
)

from appliance.envsetup import run_child, smoke_imports, write_host_pth
from appliance.limits import HOST_LIMITS
from appliance.slots import ENV_DIR, SlotPaths
from signing.bounded import one_line
from signing.errors import EnvironmentSetupError
from signing.manifest import EnvironmentSpec

# The options after a requirement on its line (``--hash=sha256:...``): not part of it.
_OPTIONS_RE = re.compile(r"\s--")


def setup_pip(slot: SlotPaths, spec: EnvironmentSpec) -> int:
    """Install the bundle's wheels into ``slot.env``; return how many the install list names."""
    install_list = slot.payload / spec.install_list
    wheels = slot.payload / spec.packages
    requirements = _read_requirements(install_list, spec.install_list)
    if not wheels.is_dir():
        raise EnvironmentSetupError(
            f"the bundle has no package directory {spec.packages} for its pip environment"
        )
    import venv  # noqa: PLC0415 - only for pip environments
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    try:
        # At the shared environment's own path (appliance.envsetup), which stays.
        venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(slot.env.resolve())
    except (OSError, subprocess.CalledProcessError) as exc:
        raise EnvironmentSetupError(f"cannot create the venv {ENV_DIR}/: {exc}") from None
    python = slot.env_python
    pip = _pip_command(python)
    timeout = HOST_LIMITS.env_setup_timeout_s
    result = run_child(
        [
            *pip,
            "install",
            "--no-index",
            "--require-hashes",
            "--no-deps",
            "--no-input",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "--no-compile",  # compiled below, on every core, beside pip check
            "--progress-bar",
            "off",
            "--quiet",
            "--find-links",
            str(wheels),
            "--requirement",
            str(install_list),
        ],
        timeout=timeout,
        what="pip install",
    )
    if result.returncode != 0:
        raise EnvironmentSetupError(_pip_install_failure(result.stderr, spec, requirements, wheels))
    # pip check and the smoke imports only read the venv, and the byte-compilation (which pip
    # would do file by file on one core) only adds .pyc files: run the three side by side.
    # The first two run before the .pth exists: no dependency or module can come from the host.
    site_packages = slot.env_site_packages(f"{sys.version_info.major}.{sys.version_info.minor}")
    with ThreadPoolExecutor(max_workers=3) as pool:
        compiled = pool.submit(
            run_child,
            [str(python), "-m", "compileall", "-q", "-j", "0", str(site_packages)],
            timeout=timeout,
            what="byte-compilation",
        )
        check = pool.submit(
            run_child,
            [*pip, "check", "--no-input", "--disable-pip-version-check"],
            timeout=timeout,
            what="pip check",
        )
        smoke = pool.submit(smoke_imports, [str(python)], spec.smoke_imports)
        checked = check.result()
        smoke_error = smoke.result()
        compiled.result()  # best effort, as pip's own: a file that does not compile is no error
    if checked.returncode != 0:
        raise EnvironmentSetupError(_pip_check_failure(checked.stdout + checked.stderr, spec))
    if smoke_error is not None:
        raise EnvironmentSetupError(smoke_error)
    write_host_pth(site_packages)
    # The shared environment's own path (appliance.envsetup): every slot that links it, and
    # it outlives any one of them.
    _relocate_scripts(slot.env_bin, old=slot.env, new=slot.env.resolve())
    return len(requirements)


def _read_requirements(path: Path, name: str) -> list[NormalizedName]:
    """The normalised project names of the install list (a hashed requirements file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EnvironmentSetupError(f"cannot read the install list {name}: {exc}") from None
    found = []
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        try:
            requirement = Requirement(_OPTIONS_RE.split(line, maxsplit=1)[0])
        except InvalidRequirement:
            raise EnvironmentSetupError(f"install list {name}: cannot read {line[:80]!r}") from None
        found.append(canonicalize_name(requirement.name))
    return found


def _pip_command(python: Path) -> list[str]:
    """The host's pip, run by ``python`` (the venv's): pip's own ``__pip-runner__.py`` imports
    exactly the host's copy of pip and nothing else from the host's site-packages."""
    spec = importlib.util.find_spec("pip")
    if spec is None or spec.origin is None:
        raise EnvironmentSetupError(
            "pip is not installed on this appliance: cannot set up a pip env"
        )
    runner = Path(spec.origin).parent / "__pip-runner__.py"
    if runner.is_file():
        return [str(python), str(runner)]
    return [sys.executable, "-m", "pip", "--python", str(python)]  # pragma: no cover - old pip


def _project(pin: str) -> NormalizedName:
    """The normalised project name of a requirement as pip quotes it (``foo[x]==1.0``)."""
    try:
        return canonicalize_name(Requirement(pin).name)
    except InvalidRequirement:
        return canonicalize_name(pin)


def _wheel_project(filename: str) -> NormalizedName | None:
    try:
        return parse_wheel_filename(filename)[0]
    except InvalidWheelFilename:
        return None


def _pip_install_failure(
    stderr: str, spec: EnvironmentSpec, requirements: Sequence[NormalizedName], wheels: Path
) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    text = "\n".join(lines)
    missing = re.search(
        r"(?:Could not find a version that satisfies the requirement|"
        r"No matching distribution found for) (\S+)",
        text,
    )
    if missing:
        pin = missing.group(1)
        name = _project(pin)
        if any(_wheel_project(w.name) == name for w in wheels.glob("*.whl")):
            return (
                f"package {pin} has no wheel in the bundle ({spec.packages}) that this host can "
                f"install (Python {spec.python}, {sys.platform} {os.uname().machine})"
            )
        return f"package {pin} is missing from the bundle ({spec.packages})"
    if "DO NOT MATCH THE HASHES" in text:
        for i, line in enumerate(lines):
            if " from " in line and line.endswith(":") and i + 1 < len(lines):
                pin = line.split(" from ", 1)[0]
                return (
                    f"package {pin}: its wheel does not match the sha256 pinned by the "
                    f"install list {spec.install_list}"
                )
    if "Hashes are required in --require-hashes mode" in text:
        pins = [line.split()[0] for line in lines if "--hash=sha256:" in line]
        which = f"package {pins[0]} " if pins else "a requirement "
        return f"install list {spec.install_list}: {which}has no --hash=sha256 pin"
    if "must have their versions pinned with ==" in text:
        after = text.split("These do not:", 1)[-1].split()
        which = after[0] if after else "a requirement"
        return f"install list {spec.install_list}: {which} is not pinned with =="
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    known = set(requirements)
    reason = errors[0] if errors else (lines[-1] if lines else "no output")
    named = [n for n in known if re.search(rf"\b{re.escape(n)}\b", reason, re.IGNORECASE)]
    prefix = f"package {sorted(named)[0]}: " if named and len(named) == 1 else ""
    return one_line(f"pip install failed: {prefix}{reason}")


def _pip_check_failure(output: str, spec: EnvironmentSpec) -> str:
    for raw in output.splitlines():
        line = raw.strip()
        needs = re.match(r"(\S+) (\S+) requires (\S+?),? which is not installed\.?$", line)
        if needs:
            dist, version, dep = needs.groups()
            return (
                f"package {dep} (required by {dist} {version}) is missing from the bundle "
                f"({spec.packages})"
            )
        wrong = re.match(r"(\S+) (\S+) has requirement (.+), but you have (\S+) (\S+)\.?$", line)
        if wrong:
            dist, version, want, dep, have = wrong.groups()
            return (
                f"package {dep} {have} in the bundle does not satisfy {want} "
                f"(required by {dist} {version})"
            )
        unsupported = re.match(r"(\S+) (\S+) is not supported on this platform\.?$", line)
        if unsupported:
            dist, version = unsupported.groups()
            return f"package {dist} {version} is not supported on this host's platform"
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return one_line("pip check failed: " + (lines[0] if lines else "no output"))


def _relocate_scripts(bindir: Path, *, old: Path, new: Path) -> None:
    """Point the shebangs (and activate scripts) that pip and venv wrote at the final slot."""
    if old == new or not bindir.is_dir():
        return
    before, after = os.fsencode(old), os.fsencode(new)
    for entry in bindir.iterdir():
        if entry.is_symlink() or not entry.is_file() or entry.stat().st_size > 1 << 20:
            continue
        data = entry.read_bytes()
        if not (data.startswith(b"#!") or entry.name.lower().startswith("activate")):
            continue
        if before in data:
            mode = entry.stat().st_mode
            entry.write_bytes(data.replace(before, after))
            entry.chmod(mode)
