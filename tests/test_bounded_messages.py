"""Bounded messages (hardening issue 8, item 1): a refusal is one short line whatever the input.

A signature block of about 4,800 signatures by unknown keys fits the 1 MiB limit; it was
refused, but with a 134 KB message, one audit record too big for the log. Messages are now
bounded where they are built (``signing.bounded``: lists show a few items and ``… N more``,
quoted values are cut with their length), and ``AirgapError.diagnostics()`` cuts whatever still
slips through. Small inputs keep their exact messages (tests/test_attacks.py asserts them).
"""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

import pytest
from simulator import BundleSimulator, Host, Member, assemble, ustar_header

from signing.bounded import MAX_ITEMS, MAX_LINE, MAX_QUOTED, clip, listing, quote
from signing.bundle import Limits, open_bundle, read_head
from signing.canonical import decode_canonical, encode_canonical
from signing.errors import AirgapError, FormatError, InputError, RotationError, SignatureError
from signing.manifest import BundleManifest, decode_signature_block, encode_signature_block
from signing.metadata import ROOT_ROLE, Signature, SignedRoot, verify_rotation
from signing.threshold import short_keyid, verify_threshold

LIMITS = Limits()


def stranger_signatures(count: int) -> list[Signature]:
    """``count`` signatures by keys no root knows (well-formed, deterministic)."""
    return [
        Signature(hashlib.sha256(b"stranger %d" % i).hexdigest(), bytes(64)) for i in range(count)
    ]


def assert_short(error: AirgapError, *fragments: str) -> str:
    """The message is bounded at its source, and so is the one line the operator sees."""
    line = error.diagnostics()
    assert len(str(error)) <= MAX_LINE, f"{len(str(error))} characters"
    assert len(line) <= MAX_LINE
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


# -- the helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["", "payload/model/tiny.gguf", "it's", "\x00\u202e", None, True, 5, [1, "a"], {"k": [None]}],
)
def test_quote_of_a_small_value_is_its_repr(value: object) -> None:
    assert quote(value) == repr(value)


def test_quote_cuts_long_values_and_says_how_long() -> None:
    text = quote("a" * 100_000)
    assert len(text) <= MAX_QUOTED + 40
    assert text.endswith("… (100000 characters)")
    assert text.startswith("'aaa")
    # Escapes make a repr longer than its string: the cut is on the repr.
    assert len(quote("\x01" * 1000)) <= MAX_QUOTED + 40
    assert quote(["a" * 10] * 100_000).endswith("… (100000 items)")


def test_quote_does_not_build_the_whole_repr() -> None:
    """A hostile list of a million items costs what its first 256 characters cost."""
    huge = [[["x" * 50] * 1000] * 1000]
    start = time.perf_counter()
    assert len(quote(huge)) <= MAX_QUOTED + 40
    assert time.perf_counter() - start < 0.05


def test_listing_shows_a_fixed_number_of_items() -> None:
    items = [f"item {i}" for i in range(MAX_ITEMS)]
    assert listing(items) == "; ".join(items)
    many = [f"item {i}" for i in range(4800)]
    assert listing(many) == "; ".join([*many[:MAX_ITEMS], f"… {4800 - MAX_ITEMS} more"])
    assert listing(["x" * 10_000]).endswith("more characters cut)")


def test_clip() -> None:
    assert clip("short") == "short"
    cut = clip("y" * 200_000)
    assert len(cut) <= MAX_LINE
    assert cut.endswith(f"({200_000 - cut.index(' …')} more characters cut)")


def test_diagnostics_is_bounded_and_one_line() -> None:
    """The last line of defence: whatever a message holds, the audit record stays short."""
    error = FormatError("first\n line\t" + "z" * 200_000)
    line = error.diagnostics()
    assert len(line) <= MAX_LINE
    assert line.startswith("first line zzz")
    assert line.endswith("more characters cut)")
    assert FormatError(" two \n\n words ").diagnostics() == "two words"


# -- lists: signatures, keyids, problems ------------------------------------------------------


def test_thousands_of_unknown_signatures_make_a_short_message() -> None:
    sim = BundleSimulator()
    message = b"manifest bytes"
    signatures = [*sim.sign(message, sim.bundle_keys[:1]), *stranger_signatures(4800)]
    with pytest.raises(SignatureError) as caught:
        verify_threshold(
            message,
            signatures,
            keys=sim.root.keys,
            role=sim.root.roles["bundle"],
            role_name="bundle",
            what="bundle manifest",
        )
    first = short_keyid(min(s.keyid for s in signatures if s.keyid != sim.bundle_keys[0].keyid))
    line = assert_short(
        caught.value,
        "bundle manifest: 1 of 2 required signatures from role 'bundle'; ",
        f"unknown keyid {first}; ",
        f"; … {4800 - MAX_ITEMS} more",
    )
    assert line.count("unknown keyid") == MAX_ITEMS


def test_a_bundle_of_4800_unknown_signatures_is_refused_in_one_short_record(
    installed_host: Host,
) -> None:
    """The reproduction: a real bundle whose signature block fills the 1 MiB limit."""
    sim = installed_host.sim
    manifest, payload = sim.manifest(version="2.0.0")
    block = encode_signature_block(
        stranger_signatures(4800), space=LIMITS.max_signature_bytes
    )  # within the limit: the refusal is the threshold's, not the size check's
    data = sim.bundle_bytes(manifest, payload, signature_block=block)
    before = installed_host.snapshot()
    with pytest.raises(SignatureError) as caught:
        installed_host.install(data)
    assert installed_host.snapshot() == before
    assert_short(caught.value, "0 of 2 required signatures", f"… {4800 - MAX_ITEMS} more")
    record = installed_host.last_audit()
    assert record["outcome"] == "refused"
    assert len(record["error"]) <= MAX_LINE
    assert f"… {4800 - MAX_ITEMS} more" in record["error"]
    # The log stays usable: the chain checks, and the next install goes through.
    count = len(installed_host.audit_records())
    assert installed_host.appliance.audit.check() == count
    assert installed_host.install(sim.bundle_bytes(manifest, payload)).version == "2.0.0"


def test_a_root_rotation_with_thousands_of_signatures() -> None:
    sim = BundleSimulator()
    trusted = sim.root
    sim.rotate(root_keys=1)
    new = sim.signed_root
    flooded = SignedRoot(new.root, tuple(stranger_signatures(3000)))
    with pytest.raises(RotationError) as caught:
        verify_rotation(trusted, flooded)
    assert_short(caught.value, "not signed by a threshold of the trusted root", "more")
    assert ROOT_ROLE in str(caught.value)


def test_a_signature_block_with_thousands_of_bad_entries() -> None:
    """Only the first bad entry is named: parsing stops there."""
    entries = [{"keyid": "x" * 5000, "sig": "y"}] * 1000
    body = encode_canonical({"signatures": entries})
    with pytest.raises(FormatError) as caught:
        decode_signature_block(body)
    assert_short(caught.value, "signatures signature 0: signature keyid must be")


# -- single values: names, paths, versions, keys ----------------------------------------------


def _signed_manifest_bytes(sim: BundleSimulator, change: dict[str, object]) -> bytes:
    doc = sim.manifest(version="2.0.0")[0].to_dict() | change
    return encode_canonical(doc)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"name": "N" * 100_000}, "manifest: name 'NNN"),
        ({"version": "1" * 100_000}, "version is longer than 64 characters"),
        ({"_type": ["x" * 1000] * 1000}, "manifest: _type must be 'bundle', got ['xxx"),
        ({"x" * 100_000: 1}, "manifest: unknown field 'xxx"),
        ({"runtime": {"backend": "llama.cpp", "k" * 100_000: 1}}, "unknown runtime setting"),
        ({"format_version": {"v": "1" * 100_000}}, "format_version {'v': '111"),
    ],
    ids=["name", "version", "type", "unknown-field", "runtime-key", "format-version"],
)
def test_huge_values_in_a_signed_manifest(
    installed_host: Host, change: dict[str, object], fragment: str
) -> None:
    """Signed by a threshold, so they reach the parser in ``install``: one short record."""
    sim = installed_host.sim
    manifest, payload = sim.manifest(version="2.0.0")
    raw = _signed_manifest_bytes(sim, change)
    data = sim.bundle_bytes(manifest, payload, manifest_bytes=raw)
    with pytest.raises(FormatError) as caught:
        installed_host.install(data)
    assert_short(caught.value, fragment)
    record = installed_host.last_audit()
    assert record["outcome"] == "refused"
    assert fragment in record["error"]
    assert len(record["error"]) <= MAX_LINE


def test_a_huge_entry_kind() -> None:
    sim = BundleSimulator()
    doc = sim.manifest()[0].to_dict()
    doc["entries"][0]["kind"] = "k" * 100_000
    with pytest.raises(FormatError) as caught:
        BundleManifest.from_bytes(encode_canonical(doc))
    assert_short(caught.value, "unknown kind 'kkk", "(100000 characters)")


def test_canonical_json_locations_and_keys_are_bounded() -> None:
    key = "k" * 10_000
    with pytest.raises(FormatError) as caught:
        decode_canonical(b'{"%s":1,"%s":2}' % (key.encode(), key.encode()), what="manifest")
    assert_short(caught.value, "manifest: duplicate key 'kkk")
    nested = b"".join(b'{"%s":' % (key.encode()) for _ in range(60))
    data = nested + b'"\\ud800"' + b"}" * 60
    with pytest.raises(FormatError) as caught:
        decode_canonical(data, what="manifest")
    assert_short(caught.value, "manifest: string at $['kkk", "contains a lone surrogate")


def _member_with_a_long_name() -> bytes:
    """A header whose name and prefix fill all 256 characters with control characters (each
    is four characters of repr: a 1 KB name in a message before the fix)."""
    header = ustar_header(b"\x01" * 100, 0, prefix=b"\x7f" * 155)
    return assemble([Member("x", b"", header=header)])


def test_a_member_name_of_control_characters() -> None:
    with pytest.raises(FormatError) as caught:
        read_head(open_bundle(io.BytesIO(_member_with_a_long_name()), LIMITS), LIMITS)
    line = assert_short(caught.value, "bundle: expected member 'format', found '\\x7f")
    assert len(line) < 2 * MAX_QUOTED
    assert "(256 characters)" in line


def test_a_huge_fingerprint_given_to_trust_init(tmp_path: Path) -> None:
    sim = BundleSimulator()
    host = Host(root=tmp_path / "host", bundles=tmp_path / "bundles", sim=sim)
    with pytest.raises(InputError) as caught:
        host.appliance.trust_init(sim.root_bytes(), fingerprint="f" * 100_000)
    assert_short(caught.value, f"root fingerprint {sim.signed_root.fingerprint} does not match")
    assert len(host.last_audit()["error"]) <= MAX_LINE
