"""Property tests of the strict tar reader and the manifest parser (hypothesis).

Totality: whatever the input, ``signing.tarstream.TarReader`` with ``signing.bundle``'s
``read_head``/``stream_payload`` (and ``appliance.verifier.verify_head`` between them), and
``signing.manifest.BundleManifest.from_bytes``, either succeed or raise a
``signing.errors.AirgapError`` subclass: never IndexError, ValueError, UnicodeError, ...

Strength: a valid bundle always verifies and delivers exactly its files; every proper prefix
of it is refused as truncated; every single-byte change is refused, except inside a header's
checksum field, where some spellings of the same number are equivalent.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simulator import (
    GNU_MAGIC,
    TEN_GIB,
    USTAR_MAGIC,
    BundleSimulator,
    Host,
    Member,
    assemble,
    header_offsets,
    octal_size,
    ustar_header,
)

from appliance.verifier import VerifiedManifest, verify_head
from builder.pack import write_bundle
from signing.bundle import DiscardSink, Limits, open_bundle, read_head, stream_payload
from signing.canonical import MAX_INT, MIN_INT, encode_canonical
from signing.errors import AirgapError, FormatError
from signing.manifest import BACKENDS, DTYPES, BundleManifest, Entry

SIM = BundleSimulator(signature_space=1024)
SMALL = Limits(chunk_bytes=64, max_trailing_bytes=4096)
DEFAULT = Limits()

PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- running the real reader ------------------------------------------------------------------


class CollectSink:
    """A PayloadSink that keeps what it is given, to compare with the files."""

    def __init__(self, chunk: int) -> None:
        self._buffer = bytearray(chunk)
        self.files: dict[str, bytes] = {}
        self._current: str | None = None
        self._data = bytearray()

    def buffer(self) -> bytearray:
        return self._buffer

    def begin(self, entry: Entry) -> None:
        assert self._current is None
        self._current = entry.path
        self._data = bytearray()

    def write(self, buffer: bytearray, length: int) -> None:
        self._data += buffer[:length]

    def end(self, entry: Entry) -> None:
        assert entry.path == self._current
        self.files[entry.path] = bytes(self._data)
        self._current = None


def read_bundle(data: bytes, limits: Limits = SMALL, sink: Any = None) -> VerifiedManifest:
    """V1 to V9 over ``data``, as ``appliance verify`` runs them."""
    tar = open_bundle(io.BytesIO(data), limits)
    head = read_head(tar, limits)
    verified = verify_head(head, root=SIM.root, now=SIM.now)
    stream_payload(tar, verified.manifest, sink or DiscardSink(limits.chunk_bytes), limits=limits)
    return verified


def outcome(run: Callable[[], object]) -> AirgapError | None:
    """None on success, the AirgapError on refusal; anything else fails the test."""
    try:
        run()
    except AirgapError as exc:
        return exc
    return None


# -- strategies -------------------------------------------------------------------------------

SAFE = "abcdefghijklmnopqrstuvwxyz0123456789._-"
components = st.text(SAFE, min_size=1, max_size=24).filter(lambda c: c not in (".", ".."))
paths = st.lists(components, min_size=1, max_size=6).map("/".join).filter(lambda p: len(p) <= 200)


def _no_file_is_a_directory(files: dict[str, bytes]) -> bool:
    return not any(other.startswith(path + "/") for path in files for other in files)


file_sets = st.dictionaries(paths, st.binary(max_size=1500), min_size=1, max_size=6).filter(
    _no_file_is_a_directory
)


def build(files: dict[str, bytes]) -> bytes:
    manifest, payload = SIM.manifest(files=files)
    return SIM.bundle_bytes(manifest, payload)


GOOD_FILES = {"model/tiny.gguf": bytes(range(256)) * 3, "recipe.toml": b"[runtime]\n"}
GOOD_MANIFEST, GOOD_PAYLOAD = SIM.manifest(files=GOOD_FILES)
GOOD_MEMBERS = SIM.members(GOOD_MANIFEST, GOOD_PAYLOAD)
GOOD = SIM.bundle_bytes(GOOD_MANIFEST, GOOD_PAYLOAD)
HEAD = assemble(GOOD_MEMBERS[:3], end=b"")

NAMES = [
    "payload/model/tiny.gguf",
    "payload/recipe.toml",
    "payload/zz",
    "payload/../x",
    "/etc/x",
    "format",
    "manifest.json",
    "signatures.json",
    "",
    "payload/model/tiny.gguf/",
    "payload//x",
]
TYPEFLAGS = [bytes([c]) for c in b"0\x000123456789xgLKSVAZ"]


@st.composite
def raw_members(draw: st.DrawFn) -> Member:
    """A tar member with random, often hostile, header fields and data."""
    name = draw(
        st.sampled_from(NAMES)
        | paths.map(lambda p: "payload/" + p[:90])
        | st.binary(min_size=1, max_size=60)  # not UTF-8, NULs inside, ...
    )
    size = draw(st.integers(0, 1200) | st.sampled_from([TEN_GIB, 8**11 - 1, 1 << 24]))
    header = ustar_header(
        name,
        typeflag=draw(st.sampled_from(TYPEFLAGS)),
        prefix=draw(st.sampled_from(["", "", "payload", "payload/..", "/"])),
        linkname=draw(st.sampled_from(["", "", "/etc/shadow"])),
        magic=draw(st.sampled_from([USTAR_MAGIC, USTAR_MAGIC, GNU_MAGIC, bytes(8)])),
        size_field=draw(st.sampled_from([octal_size(size), bytes([0x80]) + bytes(11)])),
        checksum=draw(st.none() | st.none() | st.integers(0, 0o777777)),
    )
    data = draw(st.binary(max_size=min(size, 1200)))
    padding = draw(st.sampled_from([None, None, b"", b"\x01" * 7]))
    label = name if isinstance(name, str) else name.decode("latin-1")
    return Member(label, data, header=header, padding=padding)


tails = st.tuples(
    st.lists(raw_members(), max_size=4),
    st.sampled_from([bytes(1024), bytes(512), b"", bytes(512) + b"\x01" + bytes(511)]),
    st.sampled_from([b"", bytes(5000), b"x"]),
)


# -- the tar reader: totality ----------------------------------------------------------------


@PROPERTY
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data: bytes) -> None:
    outcome(lambda: read_bundle(data))


@PROPERTY
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_after_a_valid_head(tail: bytes) -> None:
    outcome(lambda: read_bundle(HEAD + tail))


@PROPERTY
@given(tails)
def test_hostile_members_after_a_valid_head(tail: tuple[list[Member], bytes, bytes]) -> None:
    members, end, trailer = tail
    outcome(lambda: read_bundle(HEAD + assemble(members, end=end, trailer=trailer)))


@PROPERTY
@given(tails, st.integers(0, 3))
def test_hostile_members_anywhere(tail: tuple[list[Member], bytes, bytes], keep: int) -> None:
    members, end, trailer = tail
    data = assemble(
        [*GOOD_MEMBERS[:keep], *members, *GOOD_MEMBERS[keep:]], end=end, trailer=trailer
    )
    outcome(lambda: read_bundle(data))


# -- the tar reader: valid bundles, mutations, truncations ----------------------------------


@PROPERTY
@given(file_sets)
def test_valid_bundles_always_verify(files: dict[str, bytes]) -> None:
    data = build(files)
    for limits in (SMALL, DEFAULT):
        sink = CollectSink(limits.chunk_bytes)
        verified = read_bundle(data, limits, sink)
        assert sink.files == files
        assert [e.path for e in verified.manifest.entries] == sorted(files)


@FEW
@given(file_sets)
def test_simulated_bundles_are_what_the_builder_writes(files: dict[str, bytes]) -> None:
    manifest, payload = SIM.manifest(files=files)
    with tempfile.TemporaryDirectory() as tmp:
        sources = {}
        for index, path in enumerate(payload):
            sources[path] = Path(tmp, f"{index}")
            sources[path].write_bytes(payload[path])
        out = Path(tmp, "bundle.tar")
        write_bundle(
            out,
            manifest,
            sources,
            SIM.sign(manifest.to_bytes()),
            signature_space=SIM.signature_space,
        )
        assert out.read_bytes() == SIM.bundle_bytes(manifest, payload)


@FEW
@given(file_sets)
def test_valid_bundles_install_exactly_their_files(files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        host = Host(root=Path(tmp, "host"), bundles=Path(tmp, "bundles"), sim=SIM)
        host.trust_init()
        slot = host.install(build(files))
        assert host.active_payload() == files
        assert (
            slot.manifest_sha256
            == hashlib.sha256(SIM.manifest(files=files)[0].to_bytes()).hexdigest()
        )


def _boundaries(data: bytes) -> list[int]:
    points = [len(data) - 2 * 512, len(data) - 512]
    for offset in header_offsets(data):
        points += [offset, offset + 148, offset + 512]
    return points


bundles = file_sets.map(build) | st.just(GOOD)


@st.composite
def bundles_and_offsets(draw: st.DrawFn) -> tuple[bytes, int]:
    """A valid bundle and an offset in it, biased towards headers and boundaries."""
    data = draw(bundles)
    near = st.sampled_from(_boundaries(data)).flatmap(
        lambda p: st.integers(max(p - 3, 0), min(p + 3, len(data) - 1))
    )
    return data, draw(st.integers(0, len(data) - 1) | near)


@PROPERTY
@given(bundles_and_offsets())
def test_every_truncation_is_refused(case: tuple[bytes, int]) -> None:
    data, cut = case
    error = outcome(lambda: read_bundle(data[:cut]))
    assert type(error) is FormatError, f"cut at {cut} of {len(data)}: {error!r}"
    assert "truncated in" in str(error)


@PROPERTY
@given(bundles_and_offsets(), st.integers(1, 255))
def test_every_single_byte_change_is_refused(case: tuple[bytes, int], delta: int) -> None:
    data, offset = case
    mutated = bytearray(data)
    mutated[offset] = (mutated[offset] + delta) % 256
    error = outcome(lambda: read_bundle(bytes(mutated)))
    in_checksum = any(h + 148 <= offset < h + 156 for h in header_offsets(data))
    if not in_checksum:
        assert error is not None, f"a change at byte {offset} was accepted"


@PROPERTY
@given(bundles, st.integers(1, 64))
def test_trailing_data_is_bounded(data: bytes, extra: int) -> None:
    """Zeros after the end marker: accepted up to the limit, refused beyond; non-zero data
    is always refused."""
    zeros = SMALL.max_trailing_bytes + extra - 32
    error = outcome(lambda: read_bundle(data + bytes(zeros)))
    assert (error is None) == (zeros <= SMALL.max_trailing_bytes), error
    error = outcome(lambda: read_bundle(data + bytes(extra) + b"\x01"))
    assert isinstance(error, FormatError)


# -- the manifest parser ----------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(MIN_INT, MAX_INT)
    | st.text(max_size=16)
    | st.sampled_from(
        [
            "../x",
            "/etc/x",
            "",
            "1.0",
            "model",
            "llama.cpp",
            "a" * 300,
            "2026-13-01T00:00:00Z",
            "2026-01-01T00:00:00Z",
            "0" * 64,
        ]
    )
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


runtimes = st.fixed_dictionaries(
    {"backend": st.sampled_from(sorted(BACKENDS))},
    optional={
        "context_size": st.integers(16, MAX_INT),
        "gpu_layers": st.integers(-1, 1000),
        "threads": st.integers(1, 256),
        "dtype": st.sampled_from(sorted(DTYPES)),
    },
)


def _slots(value: Any) -> Iterator[tuple[Any, Any]]:
    """(container, key) for every value nested in ``value``."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield value, key
            yield from _slots(item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield value, index
            yield from _slots(item)


@st.composite
def mutated_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A valid manifest as a JSON value, with one value replaced, one key removed or added."""
    manifest, _ = SIM.manifest(files=draw(file_sets))
    doc = copy.deepcopy(manifest.to_dict())
    container, key = draw(st.sampled_from(list(_slots(doc))))
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        container[key] = draw(json_values)
    elif action == "delete":
        del container[key]
    else:
        target = container if isinstance(container, dict) else doc
        target[draw(st.text(max_size=8))] = draw(json_values)
    return doc


def assert_parses_or_refuses(data: bytes) -> None:
    try:
        manifest = BundleManifest.from_bytes(data)
    except FormatError:
        return
    assert manifest.to_bytes() == data
    assert BundleManifest.from_bytes(manifest.to_bytes()) == manifest


@PROPERTY
@given(st.binary(max_size=2000))
def test_manifest_parser_arbitrary_bytes(data: bytes) -> None:
    assert_parses_or_refuses(data)


@PROPERTY
@given(json_values)
def test_manifest_parser_arbitrary_json(value: Any) -> None:
    assert_parses_or_refuses(encode_canonical(value))


@PROPERTY
@given(mutated_documents())
def test_manifest_parser_mutated_documents(doc: dict[str, Any]) -> None:
    assert_parses_or_refuses(encode_canonical(doc))


@PROPERTY
@given(file_sets, st.data())
def test_manifest_parser_mutated_bytes(files: dict[str, bytes], data: st.DataObject) -> None:
    raw = bytearray(SIM.manifest(files=files)[0].to_bytes())
    offset = data.draw(st.integers(0, len(raw) - 1))
    raw[offset] = (raw[offset] + data.draw(st.integers(1, 255))) % 256
    assert_parses_or_refuses(bytes(raw))


def _separators(raw: bytes) -> list[int]:
    """Offsets of the ``,`` and ``:`` of a JSON text that are not inside strings."""
    found = []
    inside = escaped = False
    for index, c in enumerate(raw):
        if escaped:
            escaped = False
        elif inside and c == ord("\\"):
            escaped = True
        elif c == ord('"'):
            inside = not inside
        elif not inside and c in b",:":
            found.append(index)
    return found


def _respell(raw: bytes, how: str, at: int) -> bytes:
    """The same JSON value as ``raw`` spelled another way (valid JSON, not canonical)."""
    if how == "space":  # whitespace after a separator (outside strings)
        seps = _separators(raw)
        i = seps[at % len(seps)] + 1
        return raw[:i] + b" " + raw[i:]
    if how == "escape":  # a letter inside a string as \u00XX
        letters = [i for i, c in enumerate(raw) if chr(c).isalpha()]
        i = letters[at % len(letters)]
        return raw[:i] + f"\\u{raw[i]:04x}".encode() + raw[i + 1 :]
    if how == "order":  # the top-level keys in reverse order
        value = json.loads(raw)
        return json.dumps(dict(reversed(value.items())), separators=(",", ":")).encode()
    return raw + b"\n"


@PROPERTY
@given(file_sets, st.sampled_from(["space", "escape", "order", "newline"]), st.integers(0, 999))
def test_manifest_parser_refuses_other_spellings(
    files: dict[str, bytes], how: str, at: int
) -> None:
    """Exactly one encoding is accepted: what is verified is what is parsed."""
    raw = SIM.manifest(files=files)[0].to_bytes()
    other = _respell(raw, how, at)
    assert json.loads(other) == json.loads(raw)
    with pytest.raises(FormatError, match="not canonical JSON"):
        BundleManifest.from_bytes(other)


@PROPERTY
@given(file_sets, st.data())
def test_manifest_round_trip(files: dict[str, bytes], data: st.DataObject) -> None:
    manifest, _ = SIM.manifest(
        files=files,
        version=data.draw(st.sampled_from(["1.0.0", "1.10.0", "2!1.0rc1.post2.dev3", "0"])),
        runtime=data.draw(runtimes),
    )
    raw = manifest.to_bytes()
    again = BundleManifest.from_bytes(raw)
    assert again == manifest
    assert again.to_bytes() == raw


def _manifest_with(change: Callable[[dict[str, Any]], None]) -> bytes:
    doc = copy.deepcopy(GOOD_MANIFEST.to_dict())
    change(doc)
    return encode_canonical(doc)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d["entries"][0].update(kind=["model"]), "unknown kind"),
        (lambda d: d["runtime"].update(backend={"name": "llama.cpp"}), "runtime.backend"),
        (lambda d: d.update(version="1" * 5000), "version is longer than"),
    ],
    ids=["unhashable-kind", "unhashable-backend", "version-of-5000-digits"],
)
def test_manifest_parser_unhashable_and_absurd_values(
    change: Callable[[dict[str, Any]], None], match: str
) -> None:
    """Regressions: these escaped from_bytes as TypeError/ValueError before."""
    with pytest.raises(FormatError, match=match):
        BundleManifest.from_bytes(_manifest_with(change))
