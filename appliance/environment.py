"""Offline set-up of a bundle's package environment inside a new slot (install step I7).

See docs/adr/0007-package-environments.md, "Install: step I7". The payload was verified while it
was streamed (I5); this module only turns it into ``SLOT/env``, with no network at any point:

- pip: a venv made by this very interpreter (no pip inside it), filled by the host's own pip
  running *under the venv's interpreter* (pip's ``__pip-runner__.py``, the mechanism behind
  ``pip --python``, in one process start instead of two) with ``--no-index --require-hashes
  --no-deps --find-links``; then, side by side, ``pip check``, the smoke imports and the
  byte-compilation on every core; last a ``.pth`` file that appends the host's own package
  directories after the venv's.
- conda: the listed packages, each pinned by the signed manifest (string comparison of the
  sha256: the manifest hash was checked while streaming), as records made from each package's
  own index.json with that sha256 (the payload's package directory is the file:// channel;
  nothing is hashed again), installed by ``rattler.install`` without link scripts; or by
  ``micromamba create --offline`` when micromamba is on PATH.

Every failure raises :class:`EnvironmentSetupError` with one line that names the package or
module; the installer then removes the staging slot. Before returning, the file system that
holds the slot is flushed (``syncfs``), because the slot is committed by a rename right after.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from signing.errors import EnvironmentSetupError
from signing.manifest import BundleManifest, EnvironmentSpec

ENV_DIR: Final = "env"
PTH_NAME: Final = "_appliance_host.pth"
# Scratch space inside the slot (same file system, so rattler hard-links from its cache).
_SCRATCH_DIR: Final = ".env-scratch"
_CACHE_DIR: Final = ".env-cache"
_PIP_TIMEOUT_S: Final = 3600.0
_SMOKE_TIMEOUT_S: Final = 600.0
_MAX_LINE: Final = 300
_CONDA_LINE_RE: Final = re.compile(
    r"(?P<subdir>[a-z0-9][a-z0-9_.-]*)/(?P<file>[A-Za-z0-9_.+!-]+\.(?:conda|tar\.bz2))"
    r"#sha256:(?P<sha>[0-9a-f]{64})"
)


def env_python(slot: Path) -> Path | None:
    """The interpreter a slot's backend runs under: ``SLOT/env/bin/python`` for a pip env (or a
    conda env that carries Python); None when the slot has no such interpreter."""
    python = slot / ENV_DIR / "bin" / "python"
    return python if python.exists() else None


def setup_environment(slot: Path, manifest: BundleManifest) -> dict[str, Any]:
    """Set up ``manifest.environment`` in ``slot/env``; return a summary for the audit log:
    ``{"type": "pip" | "conda", "packages": N, "milliseconds": T}``."""
    spec = manifest.environment
    if spec is None:
        raise EnvironmentSetupError(f"{slot.name}: the bundle has no environment to set up")
    started = time.monotonic()
    host = f"{sys.version_info.major}.{sys.version_info.minor}"
    if spec.python != host:
        raise EnvironmentSetupError(
            f"bundle targets Python {spec.python}; this appliance runs {host}"
        )
    target = slot / ENV_DIR
    if target.exists() or target.is_symlink():
        raise EnvironmentSetupError(f"{slot.name}: {ENV_DIR}/ exists already (a payload entry?)")
    setup = _setup_pip if spec.type == "pip" else _setup_conda
    packages = setup(slot, manifest, spec)
    _sync_filesystem(slot)
    return {
        "type": spec.type,
        "packages": packages,
        # The audit log's canonical JSON has no floats: whole milliseconds.
        "milliseconds": round((time.monotonic() - started) * 1000),
    }


# -- pip ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Requirement:
    name: str  # normalised project name
    pin: str  # the requirement as written, e.g. "foo==1.0"


def _setup_pip(slot: Path, manifest: BundleManifest, spec: EnvironmentSpec) -> int:
    payload = slot / "payload"
    install_list = payload / spec.install_list
    wheels = payload / spec.packages
    requirements = _read_requirements(install_list, spec.install_list)
    if not wheels.is_dir():
        raise EnvironmentSetupError(
            f"the bundle has no package directory {spec.packages} for its pip environment"
        )
    import venv  # noqa: PLC0415 - only for pip environments (loader imports this module)
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    target = slot / ENV_DIR
    try:
        venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(target)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise EnvironmentSetupError(f"cannot create the venv {ENV_DIR}/: {exc}") from None
    python = target / "bin" / "python"
    pip = _pip_command(python)
    result = _run(
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
        timeout=_PIP_TIMEOUT_S,
        what="pip install",
    )
    if result.returncode != 0:
        raise EnvironmentSetupError(_pip_install_failure(result.stderr, spec, requirements, wheels))
    # pip check and the smoke imports only read the venv, and the byte-compilation (which pip
    # would do file by file on one core) only adds .pyc files: run the three side by side.
    # The first two run before the .pth exists: no dependency or module can come from the host.
    site_packages = _venv_site_packages(target)
    with ThreadPoolExecutor(max_workers=3) as pool:
        compiled = pool.submit(
            _run,
            [str(python), "-m", "compileall", "-q", "-j", "0", str(site_packages)],
            timeout=_PIP_TIMEOUT_S,
            what="byte-compilation",
        )
        check = pool.submit(
            _run,
            [*pip, "check", "--no-input", "--disable-pip-version-check"],
            timeout=_PIP_TIMEOUT_S,
            what="pip check",
        )
        smoke = pool.submit(_smoke_imports, [str(python)], spec.smoke_imports)
        checked = check.result()
        smoke_error = smoke.result()
        compiled.result()  # best effort, as pip's own: a file that does not compile is no error
    if checked.returncode != 0:
        raise EnvironmentSetupError(_pip_check_failure(checked.stdout + checked.stderr, spec))
    if smoke_error is not None:
        raise EnvironmentSetupError(smoke_error)
    _write_host_pth(site_packages)
    _relocate_scripts(target / "bin", old=target, new=_final_path(slot) / ENV_DIR)
    return len(requirements)


def _read_requirements(path: Path, name: str) -> list[_Requirement]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EnvironmentSetupError(f"cannot read the install list {name}: {exc}") from None
    found = []
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        pin = line.split(";", 1)[0].split()[0]
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", pin)
        if match is None:
            raise EnvironmentSetupError(f"install list {name}: cannot read {line[:80]!r}")
        found.append(_Requirement(_normalize(match.group(0)), pin))
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


def _pip_install_failure(
    stderr: str, spec: EnvironmentSpec, requirements: Sequence[_Requirement], wheels: Path
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
        name = _normalize(re.split(r"[=<>!~\[;]", pin, maxsplit=1)[0])
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
    known = {r.name for r in requirements}
    reason = errors[0] if errors else (lines[-1] if lines else "no output")
    named = [n for n in known if re.search(rf"\b{re.escape(n)}\b", reason, re.IGNORECASE)]
    prefix = f"package {sorted(named)[0]}: " if named and len(named) == 1 else ""
    return _one_line(f"pip install failed: {prefix}{reason}")


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
    return _one_line("pip check failed: " + (lines[0] if lines else "no output"))


def _venv_site_packages(env: Path) -> Path:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return env / "lib" / version / "site-packages"


def _write_host_pth(site_packages: Path) -> None:
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


def _final_path(slot: Path) -> Path:
    """Where the slot will live once committed (step I8 renames staging/<id> to slots/<id>)."""
    if slot.parent.name == "staging":
        return slot.parent.parent / "slots" / slot.name
    return slot


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


# -- conda --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CondaPackage:
    subdir: str
    filename: str
    sha256: str

    @property
    def relpath(self) -> str:
        return f"{self.subdir}/{self.filename}"


def _setup_conda(slot: Path, manifest: BundleManifest, spec: EnvironmentSpec) -> int:
    payload = slot / "payload"
    listed = _read_explicit(payload / spec.install_list, spec.install_list)
    pinned = {e.path: e.sha256 for e in manifest.entries}
    for package in listed:
        entry = f"{spec.packages}/{package.relpath}"
        if entry not in pinned or not (payload / entry).is_file():
            raise EnvironmentSetupError(
                f"package {package.filename} is missing from the bundle ({spec.packages})"
            )
        if pinned[entry] != package.sha256:
            raise EnvironmentSetupError(
                f"package {package.filename}: sha256 {package.sha256[:16]}... in the install "
                f"list {spec.install_list} differs from {pinned[entry][:16]}... signed in the "
                "manifest"
            )
    _check_conda_platform(spec)
    target = slot / ENV_DIR
    micromamba = shutil.which("micromamba")
    try:
        if micromamba is not None:
            _micromamba_create(micromamba, slot, payload / spec.packages, listed)
        else:
            _rattler_create(slot, payload / spec.packages, listed)
    except BaseException:
        _remove_scratch(slot)
        raise
    # The package cache (one file per package file) goes while the smoke imports run.
    cleaner = threading.Thread(target=_remove_scratch, args=(slot,), name="env-scratch-rm")
    cleaner.start()
    try:
        python = env_python(slot)
        site_packages = target / "lib" / f"python{spec.python}" / "site-packages"
        if python is not None:
            error = _smoke_imports([str(python)], spec.smoke_imports)
        else:
            # No interpreter in the env: the host's, with nothing but the stdlib and the env's
            # site-packages (-S: the host's own site-packages stay out of the smoke test).
            error = _smoke_imports(
                [sys.executable, "-S"], spec.smoke_imports, site_dir=site_packages
            )
        if error is not None:
            raise EnvironmentSetupError(error)
        if python is not None:
            _write_host_pth(site_packages)
    finally:
        cleaner.join()
    return len(listed)


def _remove_scratch(slot: Path) -> None:
    for scratch in (_SCRATCH_DIR, _CACHE_DIR):
        shutil.rmtree(slot / scratch, ignore_errors=True)


def _read_explicit(path: Path, name: str) -> list[_CondaPackage]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EnvironmentSetupError(f"cannot read the install list {name}: {exc}") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines or lines[0] != "@EXPLICIT":
        raise EnvironmentSetupError(f"install list {name} does not start with @EXPLICIT")
    packages = []
    seen: set[str] = set()
    for line in lines[1:]:
        match = _CONDA_LINE_RE.fullmatch(line)
        if match is None:
            raise EnvironmentSetupError(
                f"install list {name}: {line[:80]!r} is not '<subdir>/<file>#sha256:<hex>'"
            )
        package = _CondaPackage(match["subdir"], match["file"], match["sha"])
        if package.relpath in seen:
            raise EnvironmentSetupError(f"install list {name} lists {package.relpath} twice")
        seen.add(package.relpath)
        packages.append(package)
    return packages


def _check_conda_platform(spec: EnvironmentSpec) -> None:
    from rattler import Subdir  # noqa: PLC0415 - heavy, only for conda environments

    host = str(Subdir.current())
    if spec.platform not in (host, "noarch"):
        raise EnvironmentSetupError(
            f"bundle targets platform {spec.platform}; this appliance is {host}"
        )


def _rattler_create(slot: Path, packages: Path, listed: Sequence[_CondaPackage]) -> None:
    """Install exactly the listed packages with py-rattler, from the payload (file:// URLs).

    Each record is the package's own ``info/index.json`` (read by py-rattler, for .conda only
    the small info part) with the size on disk and the sha256 the signed manifest pins: nothing
    is hashed again, where ``rattler.index.index_fs`` would compute sha256 and md5 of every byte
    (seconds for a CUDA-sized environment). The payload's package directory, laid out by
    subdir, is the channel; the package cache is a scratch directory inside the slot.
    """
    import rattler  # noqa: PLC0415 - heavy, only for conda environments

    channel = packages.resolve().as_uri() + "/"
    records = _records_from_repodata(rattler, packages, channel, listed)
    if records is None:
        records = _records_from_packages(rattler, packages, channel, listed)
    target = slot / ENV_DIR
    final = _final_path(slot) / ENV_DIR
    try:
        _await(
            rattler.install(
                records,
                target,
                cache_dir=slot / _CACHE_DIR,
                execute_link_scripts=False,
                show_progress=False,
                # Text files get the prefix the env will have once the slot is committed.
                alternative_target_prefix=final if final != target else None,
            )
        )
    except Exception as exc:  # noqa: BLE001 - py-rattler's exceptions derive from Exception
        raise EnvironmentSetupError(_one_line(f"cannot install conda packages: {exc}")) from None


def _records_from_repodata(
    rattler: Any, packages: Path, channel: str, listed: Sequence[_CondaPackage]
) -> list[Any] | None:
    """The listed packages' records from the ``repodata.json`` the builder shipped for each of
    their subdirs (verified payload files); None when a subdir has none (an older builder).

    Every listed package must have a record, and the record's sha256 must be the one the
    install list (and so the signed manifest) pins: the records are data, not trusted code.
    """
    subdirs = sorted({p.subdir for p in listed})
    if not all((packages / subdir / "repodata.json").is_file() for subdir in subdirs):
        return None
    source = rattler.Channel(channel)
    by_file: dict[str, Any] = {}
    for subdir in subdirs:
        try:
            repodata = rattler.RepoData.from_path(packages / subdir / "repodata.json")
            for record in repodata.into_repo_data(source):
                by_file[f"{subdir}/{record.file_name}"] = record
        except Exception as exc:  # noqa: BLE001 - py-rattler's exceptions derive from Exception
            raise EnvironmentSetupError(
                _one_line(f"the bundle's {subdir}/repodata.json cannot be read: {exc}")
            ) from None
    records = []
    names: dict[str, str] = {}
    for package in listed:
        record = by_file.get(package.relpath)
        if record is None:
            raise EnvironmentSetupError(
                f"package {package.filename} is missing from the bundle's "
                f"{package.subdir}/repodata.json"
            )
        digest = record.sha256.hex() if record.sha256 is not None else None
        if digest != package.sha256:
            raise EnvironmentSetupError(
                f"package {package.filename}: repodata sha256 {digest} is not the signed "
                f"{package.sha256}"
            )
        name = record.name.normalized
        if name in names:
            raise EnvironmentSetupError(
                f"install list names package {name} twice: {names[name]} and {package.filename}"
            )
        names[name] = package.filename
        records.append(record)
    return records


def _records_from_packages(
    rattler: Any, packages: Path, channel: str, listed: Sequence[_CondaPackage]
) -> list[Any]:
    """The listed packages' records from their own ``info/index.json``."""
    records = []
    names: dict[str, str] = {}
    for package in listed:
        path = packages / package.relpath
        try:
            index = rattler.IndexJson.from_package_archive(path)
        except Exception as exc:  # noqa: BLE001 - py-rattler's exceptions derive from Exception
            raise EnvironmentSetupError(
                _one_line(f"package {package.filename} is not a readable conda package: {exc}")
            ) from None
        record = _record(rattler, index, package, path)
        name = record.name.normalized
        if name in names:
            raise EnvironmentSetupError(
                f"install list names package {name} twice: {names[name]} and {package.filename}"
            )
        names[name] = package.filename
        records.append(rattler.RepoDataRecord(record, package.filename, path.as_uri(), channel))
    return records


def _record(rattler: Any, index: Any, package: _CondaPackage, path: Path) -> Any:
    """A ``PackageRecord`` from a package's index.json, its size and its pinned sha256."""
    stem = package.filename.removesuffix(".conda").removesuffix(".tar.bz2")
    expected = f"{index.name.source}-{index.version}-{index.build}"
    if stem != expected:
        raise EnvironmentSetupError(
            f"package {package.filename} holds {expected}: its file name does not match"
        )
    if index.subdir is not None and index.subdir != package.subdir:
        raise EnvironmentSetupError(
            f"package {package.filename} is for {index.subdir}, listed under {package.subdir}"
        )
    record = rattler.PackageRecord(
        name=index.name,
        version=index.version,
        build=index.build,
        build_number=index.build_number,
        subdir=index.subdir or package.subdir,
        arch=index.arch,
        platform=index.platform,
        noarch=index.noarch,
        depends=list(index.depends),
        constrains=list(index.constrains),
        sha256=bytes.fromhex(package.sha256),
        size=path.stat().st_size,
        features=index.features,
        license=index.license,
        license_family=index.license_family,
        python_site_packages_path=index.python_site_packages_path,
        extra_depends=dict(index.extra_depends),
        flags=list(index.flags),
    )
    record.timestamp = index.timestamp
    record.track_features = list(index.track_features)
    return record


def _micromamba_create(
    micromamba: str, slot: Path, packages: Path, listed: Sequence[_CondaPackage]
) -> None:
    """micromamba, when the host has it: it reads the explicit list with file:// URLs."""
    explicit = slot / _SCRATCH_DIR / "explicit.txt"
    explicit.parent.mkdir(parents=True, exist_ok=True)
    urls = [f"{(packages / p.relpath).resolve().as_uri()}#sha256:{p.sha256}" for p in listed]
    explicit.write_text("@EXPLICIT\n" + "\n".join(urls) + "\n", encoding="utf-8")
    env = _child_env() | {
        "CONDA_PKGS_DIRS": str(slot / _CACHE_DIR),
        "MAMBA_ROOT_PREFIX": str(slot / _CACHE_DIR),
    }
    command = [micromamba, "create", "--yes", "--offline", "--no-rc", "--prefix"]
    result = _run(
        [*command, str(slot / ENV_DIR), "--file", str(explicit)],
        timeout=_PIP_TIMEOUT_S,
        what="micromamba create",
        env=env,
    )
    if result.returncode != 0:
        lines = [x.strip() for x in (result.stderr + result.stdout).splitlines() if x.strip()]
        errors = [x for x in lines if "error" in x.lower()] or lines or ["no output"]
        raise EnvironmentSetupError(_one_line(f"micromamba create failed: {errors[-1]}"))


def _await(result: object) -> Any:
    """py-rattler's coroutines, run to completion (also accepts an already finished value)."""
    import asyncio  # noqa: PLC0415 - only for conda environments

    if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
        return asyncio.run(_wrap(result))
    return result


async def _wrap(awaitable: Any) -> Any:
    return await awaitable


# -- smoke imports ------------------------------------------------------------------------------

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


def _smoke_imports(
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
    result = _run([*python, "-c", script, *names], timeout=_SMOKE_TIMEOUT_S, what="smoke imports")
    if result.returncode == 0:
        return None
    lines = [line for line in result.stderr.splitlines() if "\t" in line]
    if lines:
        module, _, reason = lines[-1].partition("\t")
        return _one_line(f"smoke import of {module!r} failed: {reason}")
    tail = [line for line in result.stderr.splitlines() if line.strip()]
    reason = tail[-1] if tail else f"exit status {result.returncode}"
    return _one_line(f"smoke import of {names[0]!r} failed: {reason}")


# -- processes and the disk ---------------------------------------------------------------------


def _child_env() -> dict[str, str]:
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


def _run(
    argv: Sequence[str], *, timeout: float, what: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=env if env is not None else _child_env(),
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise EnvironmentSetupError(f"{what} did not finish within {timeout:.0f} s") from None
    except OSError as exc:
        raise EnvironmentSetupError(f"cannot run {what}: {exc}") from None


def _sync_filesystem(path: Path) -> None:
    """Make everything written under ``path`` durable: ``syncfs`` on its file system (one
    flush, instead of an fsync per file of thousands), ``os.sync`` where syncfs is missing."""
    import ctypes  # noqa: PLC0415 - not needed by env_python's users

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if libc.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    os.sync()


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_project(filename: str) -> str:
    return _normalize(filename.split("-", 1)[0])


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MAX_LINE else line[: _MAX_LINE - 3] + "..."
