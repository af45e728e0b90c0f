"""Conda environments: lock on the builder, read the lock back as artifacts, write the install list.

See docs/adr/0007-package-environments.md. ``lock_conda`` solves the recipe's ``[environment]``
for the *target* platform, never the builder's: with the ``conda-lock`` tool when conda, mamba
or micromamba is on PATH, else with ``rattler.solve``. Either way the lock is written through
conda_lock's own lockfile model as ``conda-lock.yml`` (format version 1), with md5 and sha256
for every package, so the file is one that ``conda-lock install`` and reviewers know.

``load_conda_artifacts`` reads such a lock (written by us or by anyone's ``conda-lock``) and
returns the :class:`~builder.artifacts.Artifact` values of the recipe's platform: the packages
of its subdir and of ``noarch``, each pinned by sha256. ``conda_install_list`` turns those into
the ``@EXPLICIT`` list the host installs from, with paths relative to the bundle's
``env/conda/`` directory.

conda_lock ships no type information; its few entry points used here are wrapped in typed
helpers (:func:`_parse_lock`, :func:`_write_lock`) and everything read from its models is
checked before it leaves this module.

At about 650 lines this module is over the house's 500: it is one concept (a conda lock, from
solving to the install list), and its parts share conda_lock's untyped models, which are
checked once here rather than at every module boundary a split would add.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import rattler
from rattler.exceptions import (
    FetchRepoDataError,
    GatewayError,
    InvalidChannelError,
    InvalidMatchSpecError,
    ParseSubdirError,
    SolverError,
)

from builder.artifacts import Artifact
from builder.recipe import CondaEnvironment
from signing.bounded import one_line
from signing.errors import FetchError, LockError

SOLVERS = ("micromamba", "mamba", "conda")
"""Executables that let ``conda-lock`` solve, in the order they are preferred."""

PACKAGE_SUFFIXES = (".conda", ".tar.bz2")
INSTALL_LIST_HEADER = "# airgap-appliance conda install list"
_URL_SCHEMES = ("https", "http", "file")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_MESSAGE_LIMIT = 400

Backend = Literal["auto", "rattler", "conda-lock"]


@dataclass(frozen=True)
class TargetVirtualPackage:
    """A virtual package the target host is assumed to provide (``__glibc 2.28``, ...)."""

    name: str
    version: str
    build: str = "0"

    def as_rattler(self) -> rattler.GenericVirtualPackage:
        """The same package for ``rattler.solve``."""
        return rattler.GenericVirtualPackage(
            rattler.PackageName(self.name),
            rattler.Version(self.version),
            rattler.BuildString(self.build),
        )

    def as_conda_lock(self) -> str:
        """The value conda-lock's ``--virtual-package-spec`` file takes: ``"<version> <build>"``
        (``"<version>"`` when the build is the default)."""
        return self.version if self.build == "0" else f"{self.version} {self.build}"

    def __str__(self) -> str:
        return f"{self.name}={self.version}={self.build}"


def _archspec(platform: str) -> str:
    arch = platform.split("-", 1)[1]
    return {"64": "x86_64", "32": "x86"}.get(arch, arch)


def target_virtual_packages(
    platform: str, *, glibc: str = "2.28", osx: str = "11.0", cuda: str | None = None
) -> list[TargetVirtualPackage]:
    """The virtual packages a host of conda subdir ``platform`` is assumed to have.

    They describe the target, not the builder: the same defaults conda-lock uses for a
    platform (``__unix``, ``__linux 5.10``, ``__glibc 2.28``, ``__archspec 1 <arch>``,
    ``__osx 11.0``, ``__win``), except ``__cuda``, which is only there when ``cuda`` names a
    driver version: a bundle must not pick CUDA builds for a host that may have no GPU.
    """
    os_name = platform.split("-", 1)[0]
    packages: list[TargetVirtualPackage] = []
    if os_name in ("linux", "osx", "freebsd", "emscripten", "wasi", "zos"):
        packages.append(TargetVirtualPackage("__unix", "0"))
    if os_name == "linux":
        packages.append(TargetVirtualPackage("__linux", "5.10"))
        packages.append(TargetVirtualPackage("__glibc", glibc))
    elif os_name == "osx":
        packages.append(TargetVirtualPackage("__osx", osx))
    elif os_name == "win":
        packages.append(TargetVirtualPackage("__win", "0"))
    if platform != "noarch":
        packages.append(TargetVirtualPackage("__archspec", "1", _archspec(platform)))
    if cuda is not None and os_name in ("linux", "win"):
        packages.append(TargetVirtualPackage("__cuda", cuda))
    return packages


def solver_on_path() -> str | None:
    """The first of micromamba, mamba or conda found on PATH (its full path), or None."""
    for name in SOLVERS:
        found = shutil.which(name)
        if found is not None:
            return found
    return None


def solve_specs(env: CondaEnvironment) -> list[str]:
    """The specs to solve: the recipe's, plus ``python <python>.*`` when they name python.

    An environment that does not ask for python gets none: python is not forced into it.
    """
    specs = list(env.specs)
    names = [_spec_name(spec) for spec in specs]  # every spec checked, not only up to python
    if "python" in names:
        specs.append(f"python {env.python}.*")
    return specs


def _spec_name(spec: str) -> str:
    try:  # as strict as rattler.solve: "libfoo 1.0" must say "==1.0" or "1.0.*"
        name = rattler.MatchSpec(spec, strict=True).name
    except InvalidMatchSpecError as exc:
        raise LockError(f"conda spec {spec!r} is not a match spec: {_one_line(exc)}") from None
    return name.normalized if name is not None else ""


def lock_conda(
    recipe_path: Path,
    env: CondaEnvironment,
    *,
    out: Path | None = None,
    backend: Backend = "auto",
    cuda: str | None = None,
    glibc: str = "2.28",
    cache_dir: Path | None = None,
) -> Path:
    """Solve ``env`` for its target platform and write ``conda-lock.yml``; return its path.

    ``backend="auto"`` runs the conda-lock tool when a solver is on PATH
    (:func:`solver_on_path`), else ``rattler.solve``; ``"rattler"`` or ``"conda-lock"`` force
    one. Both solve against the target's virtual packages (:func:`target_virtual_packages`,
    ``cuda`` adds ``__cuda``). ``cache_dir`` is rattler's repodata cache (default: rattler's).

    The file goes to ``out`` or ``env.lock_path(recipe_path)``, atomically. Raises
    :class:`FetchError` naming the channel when a channel cannot be reached, and
    :class:`LockError` when the specs cannot be solved or the result lacks a sha256.
    """
    if not env.specs or not env.channels:
        raise LockError("conda environment needs 'specs' and 'channels' to be locked")
    target = out if out is not None else env.lock_path(recipe_path)
    virtual = target_virtual_packages(env.platform, glibc=glibc, cuda=cuda)
    solver = solver_on_path() if backend == "auto" else None
    if backend == "conda-lock":
        solver = solver_on_path()
        if solver is None:
            raise LockError("conda-lock needs conda, mamba or micromamba on PATH; none found")
    if solver is not None:
        packages = _solve_with_conda_lock(solver, env, virtual)
        tool = f"conda-lock ({Path(solver).name})"
    else:
        packages = _solve_with_rattler(env, virtual, cache_dir)
        tool = f"rattler {rattler.__version__}"
    lockfile = _lockfile_model(
        recipe_path, env, target=target, packages=packages, virtual=virtual, tool=tool
    )
    _write_lock(lockfile, target, env)
    return target


@dataclass(frozen=True)
class _Solved:
    """One package of a solution, whichever solver found it."""

    name: str
    version: str
    build: str
    url: str
    md5: str
    sha256: str
    depends: tuple[str, ...]


def _solve_with_rattler(
    env: CondaEnvironment, virtual: Sequence[TargetVirtualPackage], cache_dir: Path | None
) -> list[_Solved]:
    channels = [_channel_url(channel) for channel in env.channels]
    try:
        platforms = [rattler.Subdir(env.platform), rattler.Subdir("noarch")]
    except ParseSubdirError:
        raise LockError(f"{env.platform!r} is not a conda platform (subdir)") from None
    gateway = rattler.Gateway(cache_dir=cache_dir) if cache_dir is not None else rattler.Gateway()
    try:
        records = asyncio.run(
            rattler.solve(
                sources=list(env.channels),
                specs=solve_specs(env),
                gateway=gateway,
                platforms=platforms,
                virtual_packages=[package.as_rattler() for package in virtual],
            )
        )
    except SolverError as exc:
        raise LockError(
            f"cannot solve conda environment for {env.platform} "
            f"({', '.join(solve_specs(env))}): {_solver_reason(exc)}"
        ) from None
    except (GatewayError, FetchRepoDataError) as exc:
        raise FetchError(
            f"cannot fetch repodata from conda channel {_channel_named(str(exc), channels)}: "
            f"{_gateway_reason(exc)}"
        ) from None
    solved = []
    for record in records:
        name = record.name.normalized
        sha256 = record.sha256.hex() if record.sha256 is not None else ""
        md5 = record.md5.hex() if record.md5 is not None else ""
        if not sha256 or not md5:
            raise LockError(
                f"channel {record.channel} gives no sha256 or no md5 for {record.file_name}; "
                "a conda lock pins both"
            )
        solved.append(
            _Solved(
                name=name,
                version=str(record.version),
                build=str(record.build),
                url=record.url,
                md5=md5,
                sha256=sha256,
                depends=tuple(record.depends),
            )
        )
    return solved


def _module(name: str) -> ModuleType:
    """Import a module of conda_lock (or its yaml) when first needed.

    conda_lock takes over half a second to import and belongs to the builder extra; the
    modules that import this one (the CLI) must not pay for it. It ships no type information,
    so what comes out of it is ``Any`` and is checked here before use.
    """
    return importlib.import_module(name)


def _channel_url(channel: str) -> str:
    try:
        return rattler.Channel(channel).base_url
    except InvalidChannelError as exc:
        raise LockError(f"conda channel {channel!r} is not valid: {_one_line(exc)}") from None


def _channel_named(message: str, channel_urls: Sequence[str]) -> str:
    """The channel URL(s) an error message is about (all of them when it names none)."""
    named = [url for url in channel_urls if url.rstrip("/") in message]
    return ", ".join(named or channel_urls)


def _one_line(exc: BaseException | str) -> str:
    return one_line(exc, limit=_MESSAGE_LIMIT)


def _solver_reason(exc: BaseException) -> str:
    """The solver's explanation as one line, without the tree drawing."""
    text = str(exc).removeprefix("Cannot solve the request because of:")
    lines = [line.strip(" \t└├│─") for line in text.splitlines()]
    return _one_line(" ".join(line for line in lines if line))


def _gateway_reason(exc: BaseException) -> str:
    """First line of a gateway error and its deepest cause (``Connection refused``)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    first, last = lines[0], lines[-1].removeprefix("Caused by:").strip()
    return _one_line(first if len(lines) == 1 else f"{first}: {last}")


def _solve_with_conda_lock(
    solver: str, env: CondaEnvironment, virtual: Sequence[TargetVirtualPackage]
) -> list[_Solved]:
    """Run ``conda-lock lock`` with ``solver`` in a scratch directory and read its result."""
    channels = [_channel_url(channel) for channel in env.channels]
    with tempfile.TemporaryDirectory(prefix="airgap-conda-lock-") as scratch:
        work = Path(scratch)
        # JSON is YAML: conda-lock reads both files with yaml.safe_load.
        spec = {"channels": list(env.channels), "dependencies": solve_specs(env)}
        (work / "environment.yml").write_text(json.dumps(spec, indent=2) + "\n")
        packages = {package.name: package.as_conda_lock() for package in virtual}
        vspec = {"subdirs": {env.platform: {"packages": packages}}}
        (work / "virtual-packages.yml").write_text(json.dumps(vspec, indent=2) + "\n")
        command = [
            sys.executable,
            "-m",
            "conda_lock",
            "lock",
            "--conda",
            solver,
            *(["--micromamba"] if Path(solver).name.startswith("micromamba") else []),
            "--platform",
            env.platform,
            *[arg for channel in env.channels for arg in ("--channel", channel)],
            "--virtual-package-spec",
            str(work / "virtual-packages.yml"),
            "-f",
            str(work / "environment.yml"),
            "--lockfile",
            str(work / "conda-lock.yml"),
        ]
        try:
            done = subprocess.run(
                command, cwd=work, capture_output=True, text=True, timeout=3600, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LockError(f"cannot run conda-lock: {_one_line(exc)}") from None
        if done.returncode != 0:
            output = done.stderr + "\n" + done.stdout
            if _UNREACHABLE.search(output):
                raise FetchError(
                    f"cannot fetch repodata from conda channel {_channel_named(output, channels)}"
                    f": {_conda_lock_reason(output)}"
                )
            raise LockError(
                f"conda-lock cannot solve the environment for {env.platform}: "
                + _conda_lock_reason(output)
            )
        lock_path = work / "conda-lock.yml"
        lockfile = _parse_lock(lock_path)
        solved = []
        for package in _packages_of(lockfile):
            if package.manager != "conda" or package.platform != env.platform:
                continue
            if package.name.startswith("__"):
                continue
            if not package.sha256 or not package.md5:
                raise LockError(
                    f"conda-lock gave no sha256 for {package.name} {package.version}; "
                    f"use a newer {Path(solver).name} or lock without it (rattler)"
                )
            solved.append(
                _Solved(
                    name=package.name,
                    version=package.version,
                    build=package.build or "",
                    url=package.url,
                    md5=package.md5,
                    sha256=package.sha256,
                    depends=tuple(f"{k} {v}".strip() for k, v in package.dependencies.items()),
                )
            )
        return solved


_UNREACHABLE = re.compile(
    r"CondaHTTPError|UnavailableInvalidChannel|Connection ?(refused|error|reset)|"
    r"Could not resolve host|NameResolutionError|failed to fetch|error sending request",
    re.IGNORECASE,
)


def _conda_lock_reason(output: str) -> str:
    """The solver's message that conda-lock prints after "Could not lock the environment",
    else the last line of its output (the exception it died of)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if line.startswith("Could not lock the environment"):
            message = []
            for following in lines[index + 1 :]:
                if following.startswith("Command:"):
                    break
                message.append(following)
            if message:
                return _one_line(" ".join(message))
    return _one_line(lines[-1]) if lines else "no output"


def _content_hash(env: CondaEnvironment, virtual: Sequence[TargetVirtualPackage]) -> str:
    """sha256 of what was solved: channels, specs, platform and the target's virtual packages.

    A recipe whose inputs no longer hash to this has changed since the lock was made.
    """
    request = {
        "channels": list(env.channels),
        "platform": env.platform,
        "specs": solve_specs(env),
        "virtual_packages": [str(package) for package in virtual],
    }
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _split_depend(depend: str) -> tuple[str, str]:
    name, _, spec = depend.strip().partition(" ")
    return name, spec.strip()


def _lockfile_model(
    recipe_path: Path,
    env: CondaEnvironment,
    *,
    target: Path,
    packages: Sequence[_Solved],
    virtual: Sequence[TargetVirtualPackage],
    tool: str,
) -> Any:
    """The conda_lock ``Lockfile`` (v2 model) for one platform."""
    models = _module("conda_lock.lockfile.v2prelim.models")
    HashModel, LockedDependency = models.HashModel, models.LockedDependency  # noqa: N806
    Lockfile, LockMeta = models.Lockfile, models.LockMeta  # noqa: N806

    source = Path(os.path.relpath(recipe_path.resolve(), target.resolve().parent)).as_posix()
    locked = [
        LockedDependency(
            name=package.name,
            version=package.version,
            manager="conda",
            platform=env.platform,
            dependencies=dict(_split_depend(depend) for depend in package.depends),
            url=package.url,
            hash=HashModel(md5=package.md5, sha256=package.sha256),
            categories={"main"},
            build=package.build,
        )
        for package in packages
    ]
    metadata = LockMeta(
        content_hash={env.platform: _content_hash(env, virtual)},
        channels=list(env.channels),
        platforms=[env.platform],
        sources=[source],
        custom_metadata={
            "locked_by": f"airgap-appliance with {tool}",
            "virtual_packages": " ".join(str(package) for package in virtual),
        },
    )
    return Lockfile(package=locked, metadata=metadata)


def _write_lock(lockfile: Any, target: Path, env: CondaEnvironment) -> None:
    """Write ``lockfile`` to ``target`` atomically, after reading it back as a check.

    It is written under its final name in a scratch directory next to ``target`` (conda_lock
    puts the file name in its help text), parsed again, then renamed over ``target``.
    """
    write_conda_lock_file = _module("conda_lock.lockfile").write_conda_lock_file

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        staged = scratch / target.name
        write_conda_lock_file(lockfile, staged, metadata_choices=None)
        load_conda_artifacts(staged, env)  # what we write must be what build accepts
        with staged.open("rb") as handle:
            os.fsync(handle.fileno())
        staged.replace(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass(frozen=True)
class _LockedPackage:
    """The fields of a conda_lock ``LockedDependency`` this module reads, typed."""

    name: str
    version: str
    manager: str
    platform: str
    url: str
    build: str | None
    md5: str | None
    sha256: str | None
    dependencies: dict[str, str]


def _parse_lock(lock_path: Path) -> Any:
    """conda_lock's parse of ``lock_path``; any reason it cannot be read is a LockError."""
    parse_conda_lock_file = _module("conda_lock.lockfile").parse_conda_lock_file
    yaml_error: type[Exception] = _module("yaml").YAMLError

    try:
        return parse_conda_lock_file(lock_path)
    except FileNotFoundError:
        raise LockError(f"lock {lock_path} does not exist; run 'appliance-builder lock'") from None
    except OSError as exc:
        raise LockError(f"cannot read lock {lock_path}: {exc.strerror}") from None
    except yaml_error as exc:
        raise LockError(f"lock {lock_path} is not valid YAML: {_one_line(exc)}") from None
    except (ValueError, TypeError, AttributeError, KeyError, AssertionError) as exc:
        reason = _validation_reason(exc)
        raise LockError(f"lock {lock_path} is not a conda-lock file: {reason}") from None


def _validation_reason(exc: BaseException) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic: name the first failing field
        first = errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return _one_line(f"{where}: {first.get('msg', '')}" if where else first.get("msg", ""))
    return _one_line(exc) or type(exc).__name__


def _packages_of(lockfile: Any) -> list[_LockedPackage]:
    packages = []
    for dep in lockfile.package:
        hashes = dep.hash
        packages.append(
            _LockedPackage(
                name=str(dep.name),
                version=str(dep.version),
                manager=str(dep.manager),
                platform=str(dep.platform),
                url=str(dep.url),
                build=None if dep.build is None else str(dep.build),
                md5=None if hashes.md5 is None else str(hashes.md5).lower(),
                sha256=None if hashes.sha256 is None else str(hashes.sha256).lower(),
                dependencies={str(k): str(v) for k, v in dict(dep.dependencies).items()},
            )
        )
    return packages


def _lock_platforms(lockfile: Any, packages: Sequence[_LockedPackage]) -> list[str]:
    declared = [str(platform) for platform in lockfile.metadata.platforms]
    return sorted(set(declared) | {package.platform for package in packages})


def load_conda_artifacts(lock_path: Path, env: CondaEnvironment) -> list[Artifact]:
    """The conda packages ``lock_path`` pins for ``env.platform``, as artifacts.

    The lock is parsed with conda_lock's own model (format 1, or the v2 model it converts to).
    Every ``manager: conda`` entry of the platform becomes an :class:`Artifact` whose subdir
    is the URL's parent directory (the target's subdir or ``noarch``); the list is sorted by
    package name. Raises :class:`LockError` when the lock cannot be read, has no packages for
    the platform, holds pip packages, or pins a package without sha256 (md5 alone is never
    accepted).
    """
    lockfile = _parse_lock(lock_path)
    packages = _packages_of(lockfile)
    pip = sorted({package.name for package in packages if package.manager == "pip"})
    if pip:
        raise LockError(
            f"lock {lock_path} has pip packages ({', '.join(pip)}); conda environments take "
            'conda packages only: put PyPI packages in a pip environment (type = "pip")'
        )
    chosen = [
        package
        for package in packages
        if package.platform == env.platform and not package.name.startswith("__")
    ]
    if not chosen:
        covered = ", ".join(_lock_platforms(lockfile, packages)) or "no platform"
        raise LockError(
            f"lock {lock_path} has no packages for {env.platform} (it covers {covered})"
        )
    artifacts = [_artifact(package, lock_path, env.platform) for package in chosen]
    seen: dict[str, str] = {}
    for artifact in artifacts:
        key = f"{artifact.subdir}/{artifact.filename}"
        if key in seen:
            raise LockError(f"lock {lock_path} pins {key} twice")
        seen[key] = artifact.name
    return sorted(artifacts, key=lambda a: (a.name, a.subdir or "", a.filename))


def _artifact(package: _LockedPackage, lock_path: Path, platform: str) -> Artifact:
    what = f"lock {lock_path}: conda package {package.name} {package.version}"
    if not package.sha256:
        raise LockError(f"{what} has no sha256 (md5 alone is not accepted); re-lock it")
    if not _HEX64.match(package.sha256):
        raise LockError(f"{what}: sha256 {package.sha256!r} is not 64 hex digits")
    if package.md5 is not None and not _HEX32.match(package.md5):
        raise LockError(f"{what}: md5 {package.md5!r} is not 32 hex digits")
    parts = urlsplit(package.url)
    if parts.scheme not in _URL_SCHEMES:
        raise LockError(f"{what}: url {package.url!r} is not https, http or file")
    path = PurePosixPath(unquote(parts.path))
    filename, subdir = path.name, path.parent.name
    if not filename.endswith(PACKAGE_SUFFIXES):
        raise LockError(f"{what}: url {package.url!r} is not a .conda or .tar.bz2 package")
    if subdir not in (platform, "noarch"):
        raise LockError(f"{what}: url {package.url!r} is not in the {platform} or noarch subdir")
    try:
        return Artifact(
            name=package.name,
            version=package.version,
            filename=filename,
            url=package.url,
            sha256=package.sha256,
            md5=package.md5,
            subdir=subdir,
        )
    except ValueError as exc:
        raise LockError(f"{what}: {exc}") from None


def conda_install_list(artifacts: Sequence[Artifact], *, platform: str | None = None) -> bytes:
    """The explicit list the host installs from (``env/conda-explicit.txt``).

    A comment header (with ``# platform: <subdir>`` when ``platform`` is given or the
    artifacts show exactly one non-noarch subdir), ``@EXPLICIT``, then one
    ``<subdir>/<filename>#sha256:<hex>`` line per package, sorted, relative to the bundle's
    ``env/conda/`` directory. The same artifacts in any order give the same bytes.
    """
    lines: dict[str, str] = {}
    for artifact in artifacts:
        if artifact.subdir is None:
            raise ValueError(f"artifact {artifact.filename} has no conda subdir")
        path = f"{artifact.subdir}/{artifact.filename}"
        line = f"{path}#sha256:{artifact.sha256.lower()}"
        if lines.setdefault(path, line) != line:
            raise ValueError(f"artifact {path} is listed with two different sha256")
    if platform is None:
        subdirs = {a.subdir for a in artifacts if a.subdir != "noarch"}
        platform = subdirs.pop() if len(subdirs) == 1 else None
    header = [
        INSTALL_LIST_HEADER,
        "# paths are relative to env/conda/ in the bundle; every file is pinned by sha256",
    ]
    if platform is not None:
        header.append(f"# platform: {platform}")
    body = sorted(lines.values())
    return ("\n".join([*header, "@EXPLICIT", *body]) + "\n").encode("utf-8")
