"""Delta bundles on the builder: carry only what the base bundle does not have.

``appliance-builder build RECIPE --base OLD.tar`` (or OLD's ``manifest.json``) builds the
complete new manifest as always, then leaves out of the payload every file whose sha256 the
base already holds (``reuse``: the host takes it from the base slot), and, given the base
bundle itself, replaces a changed GGUF model by a per-tensor patch against the base's GGUF when
that is smaller (builder.ggufdiff; the host rebuilds the file and checks its digests). The
manifest still lists every entry of the new slot, so the host can check all of it, and names
its base by name, version and manifest sha256 (docs/bundle-format.md, section 2.5;
docs/adr/0023-delta-bundles.md).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from builder.pack import PayloadFile
from signing.bundle import (
    FORMAT_MEMBER,
    PAYLOAD_PREFIX,
    Limits,
    open_bundle,
    read_head,
)
from signing.errors import FormatError, InputError
from signing.manifest import BundleManifest, DeltaPatch, DeltaSpec, Entry

DELTA_DIR: Final = "delta"
# A patch is used only when it carries less than this share of the file it rebuilds.
PATCH_WORTH: Final = 0.5


@dataclass(frozen=True)
class BaseBundle:
    """The bundle a delta builds on: its manifest, the exact bytes the host stores, and, when
    the bundle file itself was given, where each payload file lies in it."""

    manifest: BundleManifest
    state_sha256: str
    bundle: Path | None
    offsets: dict[str, int]

    def digests(self) -> set[str]:
        return {e.sha256 for e in self.manifest.entries}

    def extract(self, entry: Entry, dest: Path) -> None:
        """Copy one payload file of the base bundle to ``dest`` (for a diff)."""
        if self.bundle is None:  # pragma: no cover - plan_delta checks first
            raise InputError("the base is a manifest only: no file to diff against")
        with self.bundle.open("rb") as src, dest.open("wb") as out:
            offset = self.offsets[entry.path]
            left = entry.size
            while left:
                moved = os.copy_file_range(src.fileno(), out.fileno(), left, offset)
                if moved == 0:
                    raise InputError(f"{self.bundle}: ends inside {entry.path}")
                offset += moved
                left -= moved


def read_base(path: Path) -> BaseBundle:
    """A base bundle file, or a base manifest (``manifest.json``, as ``inspect`` and a slot
    store it)."""
    try:
        with path.open("rb") as fh:
            start = fh.read(len(FORMAT_MEMBER))
            fh.seek(0)
            if start == FORMAT_MEMBER.encode():
                return _read_bundle(path, fh)
            data = fh.read(Limits().max_manifest_bytes + 1)
    except OSError as exc:
        raise InputError(f"cannot read base {path}: {exc.strerror}") from None
    try:
        manifest = BundleManifest.from_bytes(data)
    except FormatError as exc:
        raise InputError(f"base {path} is neither a bundle nor its manifest: {exc}") from None
    return BaseBundle(manifest, manifest.state_sha256(), None, {})


def _read_bundle(path: Path, fh: io.BufferedReader) -> BaseBundle:
    limits = Limits()
    tar = open_bundle(fh, limits)
    head = read_head(tar, limits)
    manifest = BundleManifest.from_bytes(head.manifest_bytes)
    offsets: dict[str, int] = {}
    carried = {e.path: e for e in manifest.carried_entries}
    while (header := tar.next_header()) is not None:
        name = header.name.removeprefix(PAYLOAD_PREFIX)
        if name in carried:
            offsets[name] = header.data_offset
        tar.transfer(header.size, lambda n: _seek(fh, n))
    return BaseBundle(manifest, manifest.state_sha256(), path, offsets)


def _seek(fh: io.BufferedReader, count: int) -> int:
    fh.seek(count, os.SEEK_CUR)
    return count


def plan_delta(
    base: BaseBundle,
    *,
    name: str,
    model_path: str,
    files: Sequence[PayloadFile],
    entries: dict[str, Entry],
    work: Path,
    say: Callable[[str], None],
) -> tuple[DeltaSpec, list[PayloadFile]]:
    """What the delta reuses and patches, and the patch files it carries beside."""
    if base.manifest.name != name:
        raise InputError(
            f"base bundle is {base.manifest.name!r}, this recipe builds {name!r}: a delta "
            "applies to an earlier version of the same bundle"
        )
    held = base.digests()
    reuse = sorted(p for p, e in entries.items() if e.sha256 in held)
    patches: list[DeltaPatch] = []
    extra: list[PayloadFile] = []
    for f in files:
        entry = entries[f.entry_path]
        if entry.sha256 in held or not f.entry_path.endswith(".gguf") or base.bundle is None:
            continue
        made = _gguf_patch(base, f, entry, model_path=model_path, work=work, say=say)
        if made is not None:
            patch, added = made
            patches.append(patch)
            extra += added
    spec = DeltaSpec(
        base_name=base.manifest.name,
        base_version=base.manifest.version,
        base_state_sha256=base.state_sha256,
        reuse=tuple(reuse),
        patches=tuple(sorted(patches, key=lambda p: p.path)),
    )
    return spec, extra


def _gguf_patch(
    base: BaseBundle,
    f: PayloadFile,
    entry: Entry,
    *,
    model_path: str,
    work: Path,
    say: Callable[[str], None],
) -> tuple[DeltaPatch, list[PayloadFile]] | None:
    """A per-tensor patch of ``entry`` against a GGUF of the base, when it carries less than
    ``PATCH_WORTH`` of the file."""
    # The base file at the same path, else, for the model file, the base's model file (a new
    # quantisation or a renamed file); an adapter or another GGUF is never diffed against it.
    same = [e for e in base.manifest.entries if e.path == entry.path]
    model = [e for e in base.manifest.entries if e.path == base.manifest.model_path]
    source = same[0] if same else model[0] if model and entry.path == model_path else None
    if source is None or source.path not in base.offsets:
        return None
    from builder.ggufdiff import diff_files  # noqa: PLC0415 - only deltas of GGUF files

    base_copy = work / "delta-base.gguf"
    base.extract(source, base_copy)
    index = len(list(work.glob("delta-*.patch.json")))
    patch_file, literal_file = work / f"delta-{index}.patch.json", work / f"delta-{index}.literal"
    try:
        delta = diff_files(base_copy, f.source, patch=patch_file, literal=literal_file)
        literal_bytes = delta.carried_bytes
    finally:
        base_copy.unlink()
    if literal_bytes >= PATCH_WORTH * entry.size:
        say(f"delta: {entry.path} changed too much for a patch ({literal_bytes} bytes); carried")
        return None
    say(
        f"delta: {entry.path} as a patch against the base's {source.path}: "
        f"{literal_bytes} of {entry.size} bytes carried"
    )
    stem = f"{DELTA_DIR}/{entry.path}"
    patch = DeltaPatch(path=entry.path, patch=f"{stem}.patch.json", literal=f"{stem}.literal")
    return patch, [
        PayloadFile(patch.patch, patch_file, "file"),
        PayloadFile(patch.literal, literal_file, "file"),
    ]


def describe(manifest: BundleManifest) -> str:
    """One line for ``build`` and ``inspect``: what a delta carries against its full size."""
    delta = manifest.delta
    if delta is None:
        return ""
    carried, full = manifest.carried_size, manifest.payload_size
    share = carried / full if full else 0.0
    return (
        f"delta on {delta.base_name} {delta.base_version} (state "
        f"{delta.base_state_sha256[:16]}...): carries {carried} of {full} bytes "
        f"({share:.2%}); {len(delta.reuse)} file(s) reused, {len(delta.patches)} patched"
    )
