"""From the packages a pip lock pins to the files a bundle ships: wheel selection for the target,
and the install list the host installs from (docs/adr/0007-package-environments.md).

The lock readers (builder.pipread, builder.hashedreqs) turn a lock into :class:`LockedPackage`
values: every wheel and the sdist the lock pins, whatever the target. Here
:func:`select_pip_artifacts` picks, per package, the best wheel for the target's tags (ranked as
:func:`builder.target.target_tags` ranks them, through
:func:`packaging.tags.create_compatible_tags_selector`), or its sdist when the recipe lists the
package in ``build_from_source`` (builder.sdist builds those). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from packaging.tags import Tag, create_compatible_tags_selector
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

from builder.artifacts import Artifact
from builder.recipe import PipEnvironment
from builder.target import target_label, target_tags
from signing.errors import LockError


class LockedFile(NamedTuple):
    """One file a lock pins: its name, where it is, its sha256 and (if known) its size."""

    filename: str
    url: str
    sha256: str
    size: int | None = None


@dataclass(frozen=True)
class LockedPackage:
    """One package of a lock, with every wheel and the sdist the lock pins for it."""

    name: str
    version: str
    wheels: list[LockedFile] = field(default_factory=list)
    sdist: LockedFile | None = None


def select_pip_artifacts(
    packages: list[LockedPackage], env: PipEnvironment
) -> tuple[list[Artifact], list[Artifact]]:
    """The wheels to fetch and the sdists to build for the target, sorted by package name.

    Per package: a package the recipe lists in ``build_from_source`` (names compared
    normalized) is built from its sdist when the lock pins one, even if a wheel would fit:
    that is what ``build_env`` (for example ``CMAKE_ARGS=-DGGML_CUDA=on``) is for. Otherwise
    the wheel whose best tag ranks highest in :func:`~builder.target.target_tags` is taken
    (the first file name on a tie). A package with neither is a LockError that names it, the
    target and what the lock has instead.
    """
    best_first = create_compatible_tags_selector(target_tags(env.platform, env.python))
    from_source = {canonicalize_name(name) for name in env.build_from_source}
    label = target_label(env)
    wheels: list[Artifact] = []
    sdists: list[Artifact] = []
    for package in sorted(packages, key=lambda p: (canonicalize_name(p.name), p.version)):
        if canonicalize_name(package.name) in from_source and package.sdist is not None:
            sdists.append(_artifact(package, package.sdist))
            continue
        tagged = [
            (wheel, _wheel_tags(package, wheel))
            for wheel in sorted(package.wheels, key=lambda w: w.filename)
        ]
        best = next(best_first(tagged), None)
        if best is not None:
            wheels.append(_artifact(package, best))
            continue
        if canonicalize_name(package.name) in from_source:
            reason = "it is in build_from_source, but the lock has no sdist for it"
            raise LockError(
                f"package {package.name} {package.version} has no wheel for {label}; {reason}"
            )
        if package.wheels:
            found = sorted({_wheel_tag_text(w.filename) for w in package.wheels})
            what = f"the lock's wheels are for {', '.join(found)}"
            what += ", and it has an sdist" if package.sdist is not None else ""
        else:
            what = "only an sdist"
        raise LockError(
            f"package {package.name} {package.version} has no wheel for {label} and is not in "
            f"build_from_source ({what})"
        )
    return wheels, sdists


def _wheel_tags(package: LockedPackage, wheel: LockedFile) -> frozenset[Tag]:
    try:
        return frozenset(parse_wheel_filename(wheel.filename)[3])
    except InvalidWheelFilename:
        raise LockError(
            f"package {package.name} {package.version}: {wheel.filename!r} is not a wheel file name"
        ) from None


def _wheel_tag_text(filename: str) -> str:
    return "-".join(filename.removesuffix(".whl").split("-")[-3:])


def _artifact(package: LockedPackage, file: LockedFile) -> Artifact:
    try:
        return Artifact(
            name=package.name,
            version=package.version,
            filename=file.filename,
            url=file.url,
            sha256=file.sha256,
            size=file.size,
        )
    except ValueError as exc:
        raise LockError(f"package {package.name} {package.version}: {exc}") from None


def pip_install_list(artifacts: Sequence[Artifact], *, target: str | None = None) -> bytes:
    """The requirements the host installs from (``pip install --no-index --require-hashes``):
    one ``name==version --hash=sha256:<hex>`` line per package, sorted by normalized name,
    with every hash of that package's wheels. Only wheels may be listed (LockError for
    anything else, or for one package at two versions). ``target`` goes into the header."""
    by_name: dict[str, tuple[str, set[str]]] = {}
    for artifact in artifacts:
        if not artifact.filename.endswith(".whl"):
            raise LockError(f"{artifact.filename} is not a wheel; the host installs only wheels")
        name = canonicalize_name(artifact.name)
        version, hashes = by_name.setdefault(name, (artifact.version, set()))
        if version != artifact.version:
            raise LockError(
                f"package {name} is listed at two versions: {version} and {artifact.version}"
            )
        hashes.add(artifact.sha256)
    header = "# Install list made by appliance-builder"
    header += f" for {target}.\n" if target else ".\n"
    lines = [
        f"{name}=={version} " + " ".join(f"--hash=sha256:{h}" for h in sorted(hashes)) + "\n"
        for name, (version, hashes) in sorted(by_name.items())
    ]
    return (header + "".join(lines)).encode("utf-8")
