"""Chunk hashes (signing.chunks) and hashing on every core (appliance.hashpool).

A file larger than 64 MiB is listed with one sha256 per 64 MiB piece and checked piece by piece
on a pool of threads, at install (read back from the staged file) and at verify (where it lies
in the bundle file or in its parts). A bad byte is refused with the exact region named, the same
line whatever the number of threads and whether the bundle came as a file or through a pipe; a
failure earlier in the stream wins over a later one, as in a sequential pass; the active slot
stays byte-identical and the refusal is audited.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import pytest
from simulator import BundleSimulator, Host, from_pipe, header_offsets

from appliance.installer import Appliance, InstallOptions
from appliance.slots import SlotPaths
from signing.bundle import Limits
from signing.canonical import encode_canonical
from signing.chunks import CHUNK_BYTES, ChunkedDigest, chunk_count
from signing.errors import FormatError, PayloadError
from signing.manifest import BundleManifest, Entry

OPTIONS = InstallOptions(skip_health_check=True)
BIG = "model/weights.bin"
# Two full chunks and a short third one; a small file beside it.
BIG_SIZE = 2 * CHUNK_BYTES + 12_345


@pytest.fixture(scope="module")
def weights() -> bytes:
    return os.urandom(BIG_SIZE)


@pytest.fixture
def files(weights: bytes) -> dict[str, bytes]:
    return {BIG: weights, "model/config.json": b"{}", "recipe.toml": b'name = "demo"\n'}


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1 :]


def big_data_offset(bundle: bytes) -> int:
    """Where the big member's data starts in the bundle."""
    for offset in header_offsets(bundle):
        if bundle[offset : offset + 100].rstrip(b"\0") == f"payload/{BIG}".encode():
            return offset + 512
    raise AssertionError("no big member")


def refusal(host: Host, data: bytes, *, source: str, verb: str, threads: int) -> str:
    app = Appliance(host.root, limits=Limits(hash_threads=threads))
    before = host.snapshot()
    with pytest.raises((FormatError, PayloadError)) as info:
        if source == "pipe":
            from_pipe(data, lambda: _run(app, "-", verb))
        else:
            _run(app, str(host.write(data)), verb)
    assert host.snapshot() == before or verb == "verify"
    return str(info.value)


def _run(app: Appliance, source: str, verb: str) -> None:
    if verb == "install":
        app.install(source, OPTIONS)
    else:
        app.verify(source)


def test_the_builder_digest_lists_one_hash_per_chunk(weights: bytes) -> None:
    digest = ChunkedDigest()
    for start in range(0, len(weights), 1_000_003):  # pieces that straddle chunk ends
        digest.update(weights[start : start + 1_000_003])
    assert digest.hexdigest() == hashlib.sha256(weights).hexdigest()
    assert digest.chunks() == tuple(
        hashlib.sha256(weights[i : i + CHUNK_BYTES]).hexdigest()
        for i in range(0, len(weights), CHUNK_BYTES)
    )
    assert chunk_count(CHUNK_BYTES) == 0 and chunk_count(CHUNK_BYTES + 1) == 2
    small = ChunkedDigest()
    small.update(b"x" * CHUNK_BYTES)
    assert small.chunks() == ()


def test_the_manifest_refuses_a_wrong_chunk_list(
    sim: BundleSimulator, files: dict[str, bytes]
) -> None:
    manifest, _ = sim.manifest(files=files)
    big = next(e for e in manifest.entries if e.path == BIG)
    assert len(big.chunks) == 3
    cases = {
        "one too few": (big.chunks[:2], "2 chunk hashes for"),
        "on a small file": None,
        "not hex": ((*big.chunks[:2], "Z" * 64), "a chunk hash is not 64 lowercase hex digits"),
    }
    for name, case in cases.items():
        if case is None:
            with pytest.raises(FormatError, match="1 chunk hashes for 2 bytes, expected 0"):
                Entry(path="a", size=2, sha256="0" * 64, kind="file", chunks=("0" * 64,))
            continue
        chunks, message = case
        raw = manifest.to_dict()
        for entry in raw["entries"]:
            if entry["path"] == BIG:
                entry["chunks"] = list(chunks)
        with pytest.raises(FormatError, match=message):
            BundleManifest.from_bytes(encode_canonical(raw))
        assert name
    raw = manifest.to_dict()
    raw["entries"][1]["chunks"] = "abc"
    with pytest.raises(FormatError, match="chunks must be a list"):
        BundleManifest.from_bytes(encode_canonical(raw))


@pytest.mark.parametrize("threads", [1, 3])
def test_a_chunked_bundle_installs_and_verifies(
    host: Host, sim: BundleSimulator, files: dict[str, bytes], threads: int
) -> None:
    bundle = sim.bundle(files=files)
    app = Appliance(host.root, limits=Limits(hash_threads=threads))
    app.verify(str(host.write(bundle)))
    slot = app.install(str(host.write(bundle)), OPTIONS)
    staged = SlotPaths(slot.path).payload / BIG
    assert staged.read_bytes() == files[BIG]


def test_a_bad_byte_names_its_chunk_the_same_way_everywhere(
    host: Host, sim: BundleSimulator, files: dict[str, bytes]
) -> None:
    host.install(sim.bundle(files=files))  # an active slot that must not change
    bundle = sim.bundle(version="1.1.0", files=files)
    manifest, _ = sim.manifest(version="1.1.0", files=files)
    big = next(e for e in manifest.entries if e.path == BIG)
    # A byte in chunk 2 of 3.
    bad = flip(bundle, big_data_offset(bundle) + CHUNK_BYTES + 77)
    actual = hashlib.sha256(
        flip(files[BIG], CHUNK_BYTES + 77)[CHUNK_BYTES : 2 * CHUNK_BYTES]
    ).hexdigest()
    expected = (
        f"bundle: member 'payload/{BIG}' sha256 mismatch in bytes {CHUNK_BYTES}..{2 * CHUNK_BYTES} "
        f"(chunk 2 of 3; manifest {big.chunks[1][:16]}..., payload {actual[:16]}...)"
    )
    for verb in ("install", "verify"):
        for source in ("file", "pipe"):
            for threads in (1, 2, 4):
                if source == "pipe" and threads > 1:
                    continue  # a pipe is hashed in the reading thread
                got = refusal(host, bad, source=source, verb=verb, threads=threads)
                assert got == expected, (verb, source, threads)
    record = host.last_audit()
    assert record["outcome"] == "refused"
    assert "chunk 2 of 3" in record["error"]


def test_the_first_bad_range_in_stream_order_is_named(
    host: Host, sim: BundleSimulator, files: dict[str, bytes]
) -> None:
    """Chunks 1 and 3 are both bad; with several threads chunk 3 may finish first, but the
    refusal names chunk 1, as a sequential pass would. A structural fault after a bad chunk
    (bytes after the end of the archive) is reported as the bad chunk."""
    bundle = sim.bundle(files=files)
    start = big_data_offset(bundle)
    bad = flip(flip(bundle, start + 5), start + 2 * CHUNK_BYTES + 5)
    for threads in (1, 2, 4):
        for verb in ("install", "verify"):
            got = refusal(host, bad, source="file", verb=verb, threads=threads)
            assert "(chunk 1 of 3;" in got, (verb, threads, got)
    trailing = flip(bundle, start + 5) + b"x" * 4096
    for verb in ("install", "verify"):
        got = refusal(host, trailing, source="file", verb=verb, threads=4)
        assert "(chunk 1 of 3;" in got, got


def test_a_bundle_truncated_inside_a_chunk_is_refused_as_truncated(
    host: Host, sim: BundleSimulator, files: dict[str, bytes]
) -> None:
    bundle = sim.bundle(files=files)
    cut = big_data_offset(bundle) + CHUNK_BYTES + 1000
    for verb in ("install", "verify"):
        file_refusal = refusal(host, bundle[:cut], source="file", verb=verb, threads=2)
        assert file_refusal == refusal(host, bundle[:cut], source="pipe", verb=verb, threads=1)
        assert file_refusal.startswith(f"bundle: truncated in member 'payload/{BIG}'")


def test_limits_default_to_one_hash_thread_per_core() -> None:
    assert Limits().hash_threads == 0
    assert dataclasses.replace(Limits(), hash_threads=2).hash_threads == 2
