"""Split bundles: ``appliance-builder split`` and install or verify straight from the parts
(docs/bundle-format.md, section 10; docs/adr/0015-split-bundles.md).

Real bundles (tests/simulator.py, real signatures), really split by builder.split into real
files, and real damage to those files: flipped bytes, truncation, a missing part, swapped
parts, a part or an index from another bundle. Every refusal is checked as the attack tests
do (tests/test_attacks.py): the exact exception class and line, the host unchanged, staging
empty, and the refusal audited. Good parts are read once; a pass that fails runs the part
check, which names the bad part (ADR 0015, amended). With parity, lost and corrupt parts are
rebuilt and the install goes on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import appliance, assert_error, builder, ok
from simulator import Host

from appliance.installer import InstallOptions
from builder.split import DEFAULT_PART_SIZE, FAT32_LIMIT, parse_size, split_bundle
from signing.errors import AirgapError, InputError, PartError
from signing.partindex import PartIndex

V2 = "2.0.0"
PART = 256 << 10
OPTIONS = InstallOptions(skip_health_check=True)


def _files(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {
        "model/tiny.gguf": b"GGUF" + rng.randbytes(1_200_000),
        "recipe.toml": b'name = "demo"\n',
        "tokenizer.json": rng.randbytes(70_000),
    }


def _bundle(host: Host, version: str = V2, *, seed: int = 2) -> bytes:
    manifest, payload = host.sim.manifest(version=version, files=_files(seed))
    return host.sim.bundle_bytes(manifest, payload)


def _split(host: Host, data: bytes, name: str, *, parity: int = 0) -> tuple[Path, PartIndex]:
    source = host.bundles / name / "bundle.tar"
    source.parent.mkdir(parents=True)
    source.write_bytes(data)
    out = host.bundles / name / "parts"
    return out, split_bundle(source, out, part_size=PART, parity=parity)


@pytest.fixture
def split2(installed_host: Host) -> tuple[Path, PartIndex, bytes]:
    """demo 2.0.0 (about 1.3 MB) in 256 KiB parts, on a host with demo 1.0.0 active."""
    data = _bundle(installed_host)
    out, index = _split(installed_host, data, "v2")
    return out, index, data


# -- split ------------------------------------------------------------------------------------


def test_split_is_deterministic_joins_back_and_indexes_every_part(installed_host: Host) -> None:
    data = _bundle(installed_host)
    out, index = _split(installed_host, data, "a", parity=2)
    again, index2 = _split(installed_host, data, "b", parity=2)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    assert index == index2
    k = -(-len(data) // PART)
    assert [p.file for p in index.parts] == [f"bundle.tar.{n:03d}" for n in range(1, k + 1)]
    assert [p.file for p in index.parity.parts] == ["bundle.tar.p001", "bundle.tar.p002"]  # type: ignore[union-attr]
    assert names == sorted([*(p.file for p in index.all_parts()), "bundle.tar.parts.json"])
    # Plain byte ranges: joined, they are the bundle.
    assert b"".join((out / p.file).read_bytes() for p in index.parts) == data
    for p in index.all_parts():
        blob = (out / p.file).read_bytes()
        assert (len(blob), hashlib.sha256(blob).hexdigest()) == (p.size, p.sha256)
    assert index.bundle_size == len(data)
    assert (index.name, index.version) == ("demo", V2)
    assert PartIndex.from_bytes((out / "bundle.tar.parts.json").read_bytes()) == index
    # The default fits FAT32; sizes read in binary units.
    assert DEFAULT_PART_SIZE <= FAT32_LIMIT
    assert parse_size("4G") == 4 << 30
    assert parse_size("700MiB") == 700 << 20
    with pytest.raises(InputError):
        parse_size("four gigs")


def test_a_part_index_is_parsed_strictly(split2: tuple[Path, PartIndex, bytes]) -> None:
    _, index, _ = split2
    raw = index.to_bytes()
    for bad in (
        raw.replace(b'"size":', b'"size" :', 1),  # not canonical
        raw.replace(b'"bundle-parts"', b'"bundle"'),
        raw[:-1],
    ):
        with pytest.raises(AirgapError):
            PartIndex.from_bytes(bad)
    with pytest.raises(AirgapError, match="cannot hold"):
        replace(index, part_size=PART * 2)


# -- install and verify from parts ------------------------------------------------------------


def test_install_and_verify_from_a_directory(
    installed_host: Host, split2: tuple[Path, PartIndex, bytes]
) -> None:
    out, index, _ = split2
    app = installed_host.appliance
    verified = app.verify(str(out))
    assert verified.manifest.version == V2
    assert verified.manifest_sha256 == index.manifest_sha256
    slot = app.install(str(out), OPTIONS)
    assert slot.version == V2
    assert installed_host.active_payload() == _files(2)
    record = installed_host.last_audit()
    assert (record["outcome"], record["parts"]) == ("ok", len(index.parts))
    assert "rebuilt_parts" not in record


def test_install_from_part_files_on_several_mounts(
    installed_host: Host, split2: tuple[Path, PartIndex, bytes]
) -> None:
    out, index, _ = split2
    mounts = [installed_host.bundles / "stick1", installed_host.bundles / "stick2"]
    files = []
    for n, part in enumerate(index.parts):
        mount = mounts[n % 2]
        mount.mkdir(exist_ok=True)
        files.append(str(shutil.copy(out / part.file, mount / part.file)))
    shutil.copy(out / index.index_file, mounts[1] / index.index_file)
    given = [*files[::-1], str(mounts[1] / index.index_file)]  # any order: the index orders
    installed_host.appliance.install(given, OPTIONS)
    assert installed_host.active_payload() == _files(2)


def test_the_kernel_copies_within_each_part(
    installed_host: Host, split2: tuple[Path, PartIndex, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step I5's copy_file_range is used from the part files, never across a part's end."""
    out, index, _ = split2
    sizes = {(out / p.file).resolve(): p.size for p in index.parts}
    copies: list[tuple[Path, int, int]] = []
    real = os.copy_file_range

    def watching(src: int, dst: int, count: int, *args: Any) -> int:
        path = Path(f"/proc/self/fd/{src}").readlink()
        position = os.lseek(src, 0, os.SEEK_CUR)
        copies.append((path, position, count))
        return real(src, dst, count, *args)

    monkeypatch.setattr(os, "copy_file_range", watching)
    installed_host.appliance.install(str(out), OPTIONS)
    assert installed_host.active_payload() == _files(2)
    assert copies, "no kernel copy from the parts"
    assert {path for path, _, _ in copies} <= set(sizes)
    assert len({path for path, _, _ in copies}) >= len(index.parts) - 1
    for path, position, count in copies:
        assert position + count <= sizes[path], "a copy crossed a part's end"


def test_an_unsplit_bundle_still_installs_from_a_file_and_from_a_pipe(
    installed_host: Host,
) -> None:
    data = _bundle(installed_host)
    installed_host.install(data)
    assert installed_host.active_payload() == _files(2)
    bundle = installed_host.bundles / "v3.tar"
    bundle.write_bytes(_bundle(installed_host, "3.0.0", seed=3))
    result = ok(appliance(installed_host.root, "install", "-", input=bundle.read_bytes()))
    assert "installed demo 3.0.0" in result.out
    assert installed_host.active_payload() == _files(3)


# -- refusals: named before anything is written -----------------------------------------------


def _refused(
    host: Host, sources: str | list[str], match: str, *, exc: type[AirgapError] = PartError
) -> dict[str, Any]:
    """verify and install of ``sources`` both refuse with exactly ``exc`` naming ``match``; the
    host is unchanged, staging empty, and each refusal audited. Returns the install's record."""
    record: dict[str, Any] = {}
    for event, run in (
        ("verify", lambda: host.appliance.verify(sources)),
        ("install", lambda: host.appliance.install(sources, OPTIONS)),
    ):
        before = host.snapshot()
        count = len(host.audit_records())
        with pytest.raises(AirgapError) as info:
            run()
        assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
        line = info.value.diagnostics()
        assert match in line, f"{match!r} not in {line!r}"
        assert "\n" not in line and len(line) <= 1000
        assert host.snapshot() == before, "a refused operation changed the host"
        assert host.staging_entries() == []
        records = host.audit_records()
        assert len(records) == count + 1
        record = records[-1]
        assert (record["event"], record["outcome"]) == (event, "refused")
        assert match in record["error"]
        assert host.appliance.audit.check() == count + 1
    return record


def _damage(path: Path, how: str) -> None:
    blob = bytearray(path.read_bytes())
    if how == "flip":
        blob[len(blob) // 2] ^= 0x01
    elif how == "truncate":
        del blob[-1000:]
    path.write_bytes(bytes(blob))


class _Phases:
    """A progress recorder: each phase's description and the bytes done in it."""

    def __init__(self) -> None:
        self.phases: list[list[Any]] = []

    def start(self, total: int, description: str) -> None:
        self.phases.append([description, 0])

    def advance(self, amount: int) -> None:
        self.phases[-1][1] += amount

    def checks(self) -> list[str]:
        return [d for d, _ in self.phases if d.startswith("checking")]


def test_good_parts_are_read_once_and_checked_as_they_are_read(
    installed_host: Host, split2: tuple[Path, PartIndex, bytes]
) -> None:
    out, index, data = split2
    app = installed_host.appliance
    last = out / index.parts[-1].file

    def read_once(run: Any) -> None:
        phases = _Phases()
        run(phases)
        # No part check before the read: the parts' bytes go through once, as the bundle's
        # payload (ADR 0015, amended), not once more to hash each part.
        assert phases.checks() == []
        assert sum(done for _, done in phases.phases) < len(data)

    read_once(lambda progress: app.verify(str(out), progress=progress))
    # A flipped byte in the last part: the one pass reaches it and fails; the part check that
    # follows names the part, and the first pass's staging slot is gone.
    _damage(last, "flip")
    phases = _Phases()
    with pytest.raises(PartError, match=rf"part {len(index.parts)} of \d+ \(.*\) is corrupt"):
        app.install(str(out), OPTIONS, progress=phases)
    assert phases.phases[0][0] != phases.phases[-1][0] == f"checking {len(index.parts)} parts"
    assert installed_host.staging_entries() == []
    _damage(last, "flip")  # flipped back
    read_once(lambda progress: app.install(str(out), OPTIONS, progress=progress))
    assert installed_host.active_payload() == _files(2)


def test_a_flipped_byte_names_the_part(
    installed_host: Host, split2: tuple[Path, PartIndex, bytes]
) -> None:
    out, index, _ = split2
    k = len(index.parts)
    last = index.parts[-1]
    _damage(out / last.file, "flip")
    blob = (out / last.file).read_bytes()
    record = _refused(
        installed_host,
        str(out),
        f"part {k} of {k} ({last.file}) is corrupt: sha256 "
        f"{hashlib.sha256(blob).hexdigest()[:16]}... expected {last.sha256[:16]}...; "
        "re-copy it from the source medium",
    )
    # Refused at P3, after the one pass had read the head and reached the bad part.
    assert record["parts"] == k
    assert record["manifest_sha256"] == index.manifest_sha256


def test_a_truncated_part_is_named(
    installed_host: Host, split2: tuple[Path, PartIndex, bytes]
) -> None:
    out, index, _ = split2
    k = len(index.parts)
    _damage(out / "bundle.tar.002", "truncate")
    _refused(
        installed_host,
        str(out),
        f"part 2 of {k} (bundle.tar.002) is corrupt: {PART - 1000} bytes, expected {PART}; "
        "re-copy it from the source medium",
    )


def test_a_missing_part_is_named(
    installed_host: Host, split2: tuple[Path, PartIndex, bytes]
) -> None:
    out, index, _ = split2
    k = len(index.parts)
    (out / "bundle.tar.003").unlink()
    _refused(
        installed_host,
        str(out),
        f"part 3 of {k} (bundle.tar.003) is missing; re-copy it from the source medium",
    )
    # Given as files, a missing part is named the same way.
    files = [str(out / p.file) for p in index.parts if p.number != 3]
    _refused(installed_host, files, f"part 3 of {k} (bundle.tar.003) is missing")


def test_swapped_parts_are_named(
    installed_host: Host, split2: tuple[Path, PartIndex, bytes]
) -> None:
    out, index, _ = split2
    k = len(index.parts)
    two, three = out / "bundle.tar.002", out / "bundle.tar.003"
    a, b = two.read_bytes(), three.read_bytes()
    two.write_bytes(b)
    three.write_bytes(a)
    _refused(
        installed_host,
        str(out),
        f"part 2 of {k} (bundle.tar.002) holds the bytes of part 3 of {k} (bundle.tar.003): "
        "parts swapped or misnamed; re-copy it from the source medium (2 bad parts: "
        "bundle.tar.002, bundle.tar.003)",
    )


def test_a_part_from_another_bundle_is_named(
    installed_host: Host, split2: tuple[Path, PartIndex, bytes]
) -> None:
    out, index, _ = split2
    k = len(index.parts)
    other, _ = _split(installed_host, _bundle(installed_host, "3.0.0", seed=3), "v3")
    shutil.copy(other / "bundle.tar.004", out / "bundle.tar.004")
    _refused(installed_host, str(out), f"part 4 of {k} (bundle.tar.004) is corrupt: sha256 ")


def test_an_index_from_another_bundle_is_refused(
    installed_host: Host, split2: tuple[Path, PartIndex, bytes]
) -> None:
    out, index, _ = split2
    other, other_index = _split(installed_host, _bundle(installed_host, "3.0.0", seed=3), "v3")
    assert len(other_index.parts) == len(index.parts)
    shutil.copy(other / "bundle.tar.parts.json", out / "bundle.tar.parts.json")
    _refused(
        installed_host,
        str(out),
        f"part index bundle.tar.parts.json matches none of the {len(index.parts)} parts beside "
        "it: they belong to another split, or it does",
    )


def test_a_forged_index_is_refused_by_the_signed_head(
    installed_host: Host, split2: tuple[Path, PartIndex, bytes]
) -> None:
    """An index whose part hashes match but which names another bundle's manifest: P4."""
    out, index, _ = split2
    _, other_index = _split(installed_host, _bundle(installed_host, "3.0.0", seed=3), "v3")
    forged = replace(index, version="3.0.0", manifest_sha256=other_index.manifest_sha256)
    (out / index.index_file).write_bytes(forged.to_bytes())
    record = _refused(
        installed_host,
        str(out),
        f"part index bundle.tar.parts.json is for demo 3.0.0 (manifest sha256 "
        f"{other_index.manifest_sha256[:16]}...), but its parts hold demo 2.0.0 (manifest "
        f"sha256 {index.manifest_sha256[:16]}...): use the index that came with these parts",
    )
    assert record["manifest_sha256"] == index.manifest_sha256  # read, verified, then refused


def test_odd_arguments_are_refused(
    installed_host: Host, split2: tuple[Path, PartIndex, bytes]
) -> None:
    out, index, _ = split2
    stray = installed_host.bundles / "bundle.tar.999"
    stray.write_bytes(b"x")
    _refused(
        installed_host,
        [str(out), str(stray)],
        "is not a part of bundle.tar: its part index bundle.tar.parts.json does not list it",
    )
    # Only the first part given: the others are named as missing, not read as a short bundle.
    _refused(
        installed_host,
        str(out / "bundle.tar.001"),
        f"part 2 of {len(index.parts)} (bundle.tar.002) is missing; re-copy it from the source",
    )
    copy = installed_host.bundles / "elsewhere"
    copy.mkdir()
    shutil.copy(out / "bundle.tar.001", copy / "bundle.tar.001")
    with pytest.raises(InputError, match="is given twice"):
        installed_host.appliance.verify([str(out), str(copy / "bundle.tar.001")])
    with pytest.raises(InputError, match="standard input"):
        installed_host.appliance.verify([str(out), "-"])
    (out / index.index_file).unlink()
    with pytest.raises(InputError, match="no part index"):
        installed_host.appliance.verify(str(out))


# -- parity -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parity", "damage"),
    [
        (1, {"bundle.tar.003": "missing"}),
        (1, {"bundle.tar.001": "flip"}),  # the part that holds the signed head
        (1, {"bundle.tar.005": "missing"}),  # the short last part
        (2, {"bundle.tar.002": "truncate", "bundle.tar.003": "flip"}),
        (2, {"bundle.tar.004": "missing", "bundle.tar.p001": "flip"}),
    ],
)
def test_parity_rebuilds_lost_and_corrupt_parts_and_installs(
    installed_host: Host,
    caplog: pytest.LogCaptureFixture,
    parity: int,
    damage: dict[str, str],
) -> None:
    data = _bundle(installed_host)
    out, index = _split(installed_host, data, "v2", parity=parity)
    assert len(index.parts) == 5
    for name, how in damage.items():
        if how == "missing":
            (out / name).unlink()
        else:
            _damage(out / name, how)
    caplog.set_level(logging.WARNING, logger="appliance.parts")
    installed_host.appliance.verify(str(out))
    installed_host.appliance.install(str(out), OPTIONS)
    assert installed_host.active_payload() == _files(2)
    rebuilt = sorted(n for n in damage if not n.startswith("bundle.tar.p"))
    record = installed_host.last_audit()
    assert (record["outcome"], record["rebuilt_parts"]) == ("ok", rebuilt)
    said = [r.getMessage() for r in caplog.records]
    for name in rebuilt:
        assert any(f"({name})" in m and m.endswith("rebuilding it from parity") for m in said)


def test_more_bad_parts_than_parity_is_refused(installed_host: Host) -> None:
    out, _ = _split(installed_host, _bundle(installed_host), "v2", parity=1)
    (out / "bundle.tar.002").unlink()
    _damage(out / "bundle.tar.004", "flip")
    _refused(
        installed_host,
        str(out),
        "part 2 of 5 (bundle.tar.002) is missing; re-copy it from the source medium (2 bad "
        "parts: bundle.tar.002, bundle.tar.004); the 1 parity part(s) can rebuild at most 1",
    )


def test_a_malformed_index_and_an_unbounded_rebuild_are_refused(installed_host: Host) -> None:
    data = _bundle(installed_host)
    out, index = _split(installed_host, data, "v2")
    (out / index.index_file).write_bytes(index.to_bytes().replace(b'"number":2', b'"number":7'))
    _refused(
        installed_host,
        str(out),
        "bundle.tar.parts.json: part index: parts are not numbered 1 to 5 in order",
    )
    # The index is not signed: its stripe size must not choose how much memory a rebuild
    # takes (5 parts x 16 MiB stripes, twice, is more than the host's 64 MiB).
    source = installed_host.bundles / "v2" / "bundle.tar"
    wide = installed_host.bundles / "wide"
    split_bundle(source, wide, part_size=PART, parity=1, stripe_bytes=16 << 20)
    (wide / "bundle.tar.002").unlink()
    _refused(
        installed_host,
        str(wide),
        "cannot rebuild part 2 of 5 (bundle.tar.002): 5 parts of 16777216-byte parity stripes "
        "need more than 67108864 bytes of memory",
    )


# -- the command line -------------------------------------------------------------------------


def test_the_commands(installed_host: Host) -> None:
    source = installed_host.bundles / "bundle.tar"
    source.write_bytes(_bundle(installed_host))
    out = installed_host.bundles / "parts"
    said = ok(builder("split", source, "--size", "256K", "--parity", "1", "-o", out)).out
    assert said.startswith("wrote 5 part(s) of at most 262144 bytes and 1 parity part(s)")
    root = installed_host.root
    (out / "bundle.tar.004").unlink()
    result = ok(appliance(root, "verify", out))
    assert result.out.startswith("OK demo 2.0.0")
    assert "warning: part 4 of 5 (bundle.tar.004) is missing; rebuilding it from parity" in (
        result.err
    )
    (out / "bundle.tar.p001").unlink()
    assert_error(
        appliance(root, "install", out),
        3,
        "error: part 4 of 5 (bundle.tar.004) is missing; re-copy it from the source medium",
    )
    assert_error(appliance(root, "install", out, "-"), 2, "standard input")
