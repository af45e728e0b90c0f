"""A conda environment, set up offline in a slot (step I7 for ``environment.type = "conda"``).

The listed packages, each pinned by the signed manifest (string comparison of the sha256: the
manifest hash was checked while streaming), as records from the ``repodata.json`` the builder
shipped (docs/adr/0007, "the shipped repodata"), each record's sha256 checked against the
signed one, or, from an older builder, from each package's own ``info/index.json`` with that
sha256 (the payload's package directory is the file:// channel; nothing is hashed again);
installed by ``rattler.install`` without link scripts, or by ``micromamba create --offline``
when micromamba is on PATH. py-rattler is imported only here, on first use: it is heavy, and
an install without a conda environment never needs it.
"""

from __future__ import annotations

import re
import shutil
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from appliance.envsetup import child_env, run_child, smoke_imports, write_host_pth
from appliance.limits import HOST_LIMITS
from appliance.slots import SlotPaths, env_python
from signing.bounded import one_line
from signing.errors import EnvironmentSetupError
from signing.manifest import BundleManifest, EnvironmentSpec

_CONDA_LINE_RE: Final = re.compile(
    r"(?P<subdir>[a-z0-9][a-z0-9_.-]*)/(?P<file>[A-Za-z0-9_.+!-]+\.(?:conda|tar\.bz2))"
    r"#sha256:(?P<sha>[0-9a-f]{64})"
)


@dataclass(frozen=True)
class _CondaPackage:
    subdir: str
    filename: str
    sha256: str

    @property
    def relpath(self) -> str:
        return f"{self.subdir}/{self.filename}"


def setup_conda(slot: SlotPaths, manifest: BundleManifest, spec: EnvironmentSpec) -> int:
    """Install the listed conda packages into ``slot.env``; return how many are listed."""
    payload = slot.payload
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
        python = env_python(slot.path)
        site_packages = slot.env_site_packages(spec.python)
        if python is not None:
            error = smoke_imports([str(python)], spec.smoke_imports)
        else:
            # No interpreter in the env: the host's, with nothing but the stdlib and the env's
            # site-packages (-S: the host's own site-packages stay out of the smoke test).
            error = smoke_imports(
                [sys.executable, "-S"], spec.smoke_imports, site_dir=site_packages
            )
        if error is not None:
            raise EnvironmentSetupError(error)
        if python is not None:
            write_host_pth(site_packages)
    finally:
        cleaner.join()
    return len(listed)


def _remove_scratch(slot: SlotPaths) -> None:
    for scratch in (slot.env_scratch, slot.env_cache):
        shutil.rmtree(scratch, ignore_errors=True)


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


def _rattler_create(slot: SlotPaths, packages: Path, listed: Sequence[_CondaPackage]) -> None:
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
    # The shared environment the slot's env links to (appliance.envsetup): its path is final,
    # so text files get it as their prefix, whichever slots use the environment.
    target = slot.env.resolve()
    try:
        _await(
            rattler.install(
                records,
                target,
                cache_dir=slot.env_cache,
                execute_link_scripts=False,
                show_progress=False,
            )
        )
    except Exception as exc:  # noqa: BLE001 - py-rattler's exceptions derive from Exception
        raise EnvironmentSetupError(one_line(f"cannot install conda packages: {exc}")) from None


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
                one_line(f"the bundle's {subdir}/repodata.json cannot be read: {exc}")
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
                one_line(f"package {package.filename} is not a readable conda package: {exc}")
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
    micromamba: str, slot: SlotPaths, packages: Path, listed: Sequence[_CondaPackage]
) -> None:
    """micromamba, when the host has it: it reads the explicit list with file:// URLs."""
    explicit = slot.env_scratch / "explicit.txt"
    explicit.parent.mkdir(parents=True, exist_ok=True)
    urls = [f"{(packages / p.relpath).resolve().as_uri()}#sha256:{p.sha256}" for p in listed]
    explicit.write_text("@EXPLICIT\n" + "\n".join(urls) + "\n", encoding="utf-8")
    env = child_env() | {
        "CONDA_PKGS_DIRS": str(slot.env_cache),
        "MAMBA_ROOT_PREFIX": str(slot.env_cache),
    }
    command = [micromamba, "create", "--yes", "--offline", "--no-rc", "--prefix"]
    result = run_child(
        [*command, str(slot.env), "--file", str(explicit)],
        timeout=HOST_LIMITS.env_setup_timeout_s,
        what="micromamba create",
        env=env,
    )
    if result.returncode != 0:
        lines = [x.strip() for x in (result.stderr + result.stdout).splitlines() if x.strip()]
        errors = [x for x in lines if "error" in x.lower()] or lines or ["no output"]
        raise EnvironmentSetupError(one_line(f"micromamba create failed: {errors[-1]}"))


def _await(result: object) -> Any:
    """py-rattler's coroutines, run to completion (also accepts an already finished value)."""
    import asyncio  # noqa: PLC0415 - only for conda environments

    if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
        return asyncio.run(_wrap(result))
    return result


async def _wrap(awaitable: Any) -> Any:
    return await awaitable
