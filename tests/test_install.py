"""appliance on a host directory, as a subprocess: trust, verify, install, slots, rollback,
the host lock, the audit log, clocks, and all of it with no network at all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from functools import partial
from pathlib import Path

import pytest
from helpers_cli import (
    APPLIANCE,
    DAY,
    MIB,
    World,
    appliance,
    assert_error,
    audit_lines,
    audit_records,
    build,
    clean_env,
    current_target,
    get_world,
    iso,
    now_epoch,
    ok,
    random_bytes,
    run_all,
    slot_name,
    tree_digest,
    wait_for,
    write_recipe,
)

from signing.bundle import Limits, open_bundle, read_head


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return get_world(tmp_path_factory)


def _head(bundle: Path) -> tuple[bytes, bytes]:
    limits = Limits()
    with bundle.open("rb") as fh:
        head = read_head(open_bundle(fh, limits), limits)
    return head.manifest_bytes, head.signature_block


# -- install, keep, status, rollback ----------------------------------------------------------


def test_install_three_keep_two_status_and_rollback(tmp_path: Path, world: World) -> None:
    host = world.new_host(tmp_path / "host", "v1")
    out = ok(appliance(host, "install", world.bundles["2.0.0"], "--keep", "2")).out
    assert out.strip() == f"installed demo 2.0.0 into slot {slot_name(2, '2.0.0')}; now active"
    slot3 = ok(appliance(host, "install", world.bundles["3.0.0"], "--keep", "2", "--json")).json()
    assert slot3["version"] == "3.0.0"
    assert slot3["id"] == slot_name(3, "3.0.0")
    s1, s2, s3 = slot_name(1, "1.0.0"), slot_name(2, "2.0.0"), slot_name(3, "3.0.0")
    assert sorted(p.name for p in (host / "slots").iterdir()) == [s2, s3]
    assert current_target(host) == f"slots/{s3}"
    assert audit_records(host)[-1]["removed_slots"] == [s1]
    assert list((host / "trash").iterdir()) == []

    status = ok(appliance(host, "status", "--json")).json()
    assert status["root"] == str(host)
    assert status["trust"]["version"] == 1
    assert status["trust"]["fingerprint"] == world.fingerprint
    assert status["active"]["id"] == s3
    assert status["active"]["signers"] == world_signer_ids(world)
    assert [s["version"] for s in status["slots"]] == ["2.0.0", "3.0.0"]
    assert status["highest_installed"] == {"demo": "3.0.0"}
    assert status["time_floor"] == iso(world.epoch)

    rolled = ok(appliance(host, "rollback", "--json")).json()
    assert (rolled["from"]["version"], rolled["to"]["version"]) == ("3.0.0", "2.0.0")
    assert current_target(host) == f"slots/{s2}"
    assert_error(appliance(host, "rollback"), 5, "no slot older than the active one (2.0.0)")
    assert current_target(host) == f"slots/{s2}"
    assert "-> 3.0.0" in ok(appliance(host, "rollback", "--to", "3.0.0")).out
    assert current_target(host) == f"slots/{s3}"
    assert_error(appliance(host, "rollback", "--to", "3.0.0"), 5, "already active")
    assert_error(appliance(host, "rollback", "--to", "1.0.0"), 5, "no slot holds version 1.0.0")
    # Rolling back does not lower the highest installed version: 2.0.0 stays a replay.
    assert json.loads((host / "state.json").read_bytes())["highest"] == {"demo": "3.0.0"}
    events = [(r["event"], r["outcome"]) for r in audit_records(host)]
    assert events[-5:] == [
        ("rollback", "ok"),
        ("rollback", "failed"),
        ("rollback", "ok"),
        ("rollback", "failed"),
        ("rollback", "failed"),
    ]


def world_signer_ids(world: World) -> list[str]:
    from builder.keyfiles import load_public_key

    return sorted(load_public_key(Path(f"{k}.pub")).keyid for k in world.signers)


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_installed_slot_holds_exact_bytes(tmp_path: Path, world: World, source: str) -> None:
    bundle = world.bundles["1.0.0"]
    if source == "stdin":
        host = world.new_host(tmp_path / "host")
        ok(appliance(host, "install", "-", input=bundle.read_bytes()))
    else:  # the v1 host template was installed from the file
        host = world.new_host(tmp_path / "host", "v1")
    slot = host / "slots" / slot_name(1, "1.0.0")
    assert current_target(host) == f"slots/{slot.name}"
    manifest_bytes, signature_block = _head(bundle)
    manifest = json.loads(manifest_bytes)
    payload = slot / "payload"
    files = sorted(p.relative_to(payload).as_posix() for p in payload.rglob("*") if p.is_file())
    assert [e["path"] for e in manifest["entries"]] == files
    assert files == ["model/model.bin", "recipe.toml", "sbom.cdx.json"]
    for entry in manifest["entries"]:
        data = (payload / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        if entry["kind"] != "sbom":  # the builder made the SBOM; the rest are the sources
            assert data == world.source_file("1.0.0", entry["path"]).read_bytes()
        assert (payload / entry["path"]).stat().st_mode & 0o777 == 0o644
    assert (slot / "bundle" / "manifest.json").read_bytes() == manifest_bytes
    assert (slot / "bundle" / "signatures.json").read_bytes() == signature_block.rstrip(b" ")
    meta = json.loads((slot / "slot.json").read_bytes())
    assert meta["name"] == "demo"
    assert meta["version"] == "1.0.0"
    assert meta["seq"] == 1
    assert meta["signers"] == world_signer_ids(world)
    assert meta["created"] == iso(world.epoch)
    assert meta["allow_downgrade"] is False
    assert list((host / "staging").iterdir()) == []


# -- verify and trust -------------------------------------------------------------------------


def test_verify_writes_nothing_but_the_audit_record(tmp_path: Path, world: World) -> None:
    host = world.new_host(tmp_path / "host")
    before = tree_digest(host)
    lines_before = audit_lines(host)
    out = ok(appliance(host, "verify", world.bundles["2.0.0"])).out
    assert out.startswith("OK demo 2.0.0: 3 files")
    info = ok(
        appliance(host, "verify", "-", "--json", input=world.bundles["3.0.0"].read_bytes())
    ).json()
    assert info["verified"] is True
    assert info["version"] == "3.0.0"
    assert info["signers"] == world_signer_ids(world)
    after = tree_digest(host)
    for audit_file in ("audit.jsonl", "audit.head"):
        before.pop(audit_file)
        after.pop(audit_file)
    assert after == before
    assert not (host / "current").exists()
    assert list((host / "slots").iterdir()) == []
    new = [json.loads(line) for line in audit_lines(host)[len(lines_before) :]]
    assert [(r["event"], r["outcome"], r["version"]) for r in new] == [
        ("verify", "ok", "2.0.0"),
        ("verify", "ok", "3.0.0"),
    ]


def test_verify_and_install_refused_without_trusted_root(tmp_path: Path, world: World) -> None:
    host = tmp_path / "host"
    assert_error(appliance(host, "verify", world.bundles["1.0.0"]), 5, "no trusted root")
    assert_error(
        appliance(host, "install", world.bundles["1.0.0"]), 5, "no trusted root", "trust init"
    )
    assert not (host / "current").exists()
    assert not list((host / "slots").glob("*"))
    assert [(r["event"], r["outcome"]) for r in audit_records(host)] == [("install", "failed")]


def test_trust_init_fingerprint_and_twice(tmp_path: Path, world: World) -> None:
    host = tmp_path / "host"
    wrong = "0" * 64
    assert_error(
        appliance(host, "trust", "init", world.root_json, "--fingerprint", wrong),
        2,
        "does not match",
        world.fingerprint,
    )
    assert not (host / "trust" / "root.json").exists()
    assert list((host / "trust" / "history").iterdir()) == []
    out = ok(
        appliance(
            host, "trust", "init", world.root_json, "--fingerprint", world.fingerprint.upper()
        )
    ).out
    assert world.fingerprint in out
    assert (host / "trust" / "root.json").read_bytes() == world.root_json.read_bytes()
    assert_error(appliance(host, "trust", "init", world.root_json), 5, "already installed")
    assert (host / "trust" / "root.json").read_bytes() == world.root_json.read_bytes()
    outcomes = [(r["event"], r["outcome"]) for r in audit_records(host)]
    assert outcomes == [("trust-init", "failed"), ("trust-init", "ok"), ("trust-init", "failed")]


def test_trust_update_rotation_refused_then_accepted(tmp_path: Path, world: World) -> None:
    rot = world.rotation()
    host = world.new_host(tmp_path / "host", "v1")
    assert_error(
        appliance(host, "trust", "update", rot["unsigned_by_old"]),
        3,
        "not signed by a threshold of the trusted root (version 1)",
    )
    assert (host / "trust" / "root.json").read_bytes() == world.root_json.read_bytes()
    assert ok(appliance(host, "trust", "update", rot["v2"])).out.strip() == (
        "trusted root is now version 2"
    )
    assert (host / "trust" / "root.json").read_bytes() == rot["v2"].read_bytes()
    assert (host / "trust" / "history" / "1.root.json").read_bytes() == (
        world.root_json.read_bytes()
    )
    # Same bundle keys in v2: bundles still verify; the same root again is no rotation.
    ok(appliance(host, "verify", world.bundles["2.0.0"]))
    assert_error(
        appliance(host, "trust", "update", rot["v2"]),
        3,
        "version 2 does not follow trusted version 2",
    )
    assert (host / "trust" / "root.json").read_bytes() == rot["v2"].read_bytes()
    assert [(r["event"], r["outcome"], r.get("root_version")) for r in audit_records(host)[2:]] == [
        ("trust-update", "refused", None), ("trust-update", "ok", 2), ("verify", "ok", None),
        ("trust-update", "refused", None),
    ]  # fmt: skip


# -- the host lock ----------------------------------------------------------------------------


def test_second_install_fails_while_one_holds_the_lock(tmp_path: Path, world: World) -> None:
    host = world.new_host(tmp_path / "host", "v1")
    big = world.big_bundle
    data = big.read_bytes()
    first = subprocess.Popen(
        [APPLIANCE, "--root", host, "install", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    assert first.stdin is not None
    try:
        first.stdin.write(data[: len(data) // 2])
        first.stdin.flush()
        partial = host / "staging" / slot_name(2, "2.0.0") / "payload" / "model" / "model.bin"
        wait_for(
            lambda: partial.exists() and partial.stat().st_size >= 4 * MIB,
            what="the first install to be mid-payload",
        )
        # flock is non-blocking: the second install must give up at once, not wait for the
        # first (which cannot finish while this test holds back half of its bundle).
        second = appliance(host, "install", world.bundles["3.0.0"], timeout=30)
        assert_error(second, 5, "another appliance operation is running", f"pid {first.pid}")
        # verify takes no lock: it runs beside the install, and its audit record is chained.
        ok(appliance(host, "verify", world.bundles["3.0.0"]))
        assert current_target(host) == f"slots/{slot_name(1, '1.0.0')}"
        first.stdin.write(data[len(data) // 2 :])
        first.stdin.close()
        assert first.wait(timeout=60) == 0, first.stderr.read() if first.stderr else ""
    finally:
        if first.poll() is None:  # pragma: no cover - only when an assertion failed
            first.kill()
            first.wait()
    assert current_target(host) == f"slots/{slot_name(2, '2.0.0')}"
    assert list((host / "staging").iterdir()) == []
    ok(appliance(host, "history", "--check"))


# -- the audit log ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def history_host(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A host with 5 audit records: trust-init, install 1.0.0, verify 2.0.0, install 2.0.0,
    and a refused replay of 1.0.0."""
    host = world.new_host(tmp_path_factory.mktemp("history") / "host", "v1")
    ok(appliance(host, "verify", world.bundles["2.0.0"]))
    ok(appliance(host, "install", world.bundles["2.0.0"]))
    assert_error(
        appliance(host, "install", world.bundles["1.0.0"]),
        4,
        "already installed in slot",
        "rollback --to 1.0.0",
    )
    return host


def _copy(host: Path, dest: Path) -> Path:
    shutil.copytree(host, dest, symlinks=True)
    return dest


def test_history_text_and_check(history_host: Path) -> None:
    records = audit_records(history_host)
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert [(r["event"], r["outcome"]) for r in records] == [
        ("trust-init", "ok"),
        ("install", "ok"),
        ("verify", "ok"),
        ("install", "ok"),
        ("install", "refused"),
    ]
    assert records[0]["prev"] == "0" * 64
    assert "already installed in slot" in records[4]["error"]
    history, check = run_all(
        partial(appliance, history_host, "history"),
        partial(appliance, history_host, "history", "--check"),
    )
    text = ok(history).out.splitlines()
    assert len(text) == 5
    assert "install" in text[1] and "demo 1.0.0" in text[1]
    assert "refused" in text[4]
    assert "5 records" in ok(check).out


def test_history_json_is_one_record_per_line(history_host: Path) -> None:
    out = ok(appliance(history_host, "history", "--json")).stdout
    records = [json.loads(line) for line in out.splitlines()]
    assert records == audit_records(history_host)
    assert out == (history_host / "audit.jsonl").read_bytes()  # as stored


def test_history_check_detects_an_edited_record(tmp_path: Path, history_host: Path) -> None:
    host = _copy(history_host, tmp_path / "host")
    lines = audit_lines(host)
    assert b'"outcome":"ok"' in lines[1]
    lines[1] = lines[1].replace(b'"outcome":"ok"', b'"outcome":"no"')  # still canonical JSON
    (host / "audit.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    line = assert_error(appliance(host, "history", "--check"), 6, "chain broken", "line 2")
    assert "line 3" in line


def test_history_check_detects_a_deleted_record(tmp_path: Path, history_host: Path) -> None:
    host = _copy(history_host, tmp_path / "host")
    lines = audit_lines(host)
    del lines[2]
    (host / "audit.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert_error(appliance(host, "history", "--check"), 6, "audit log line 3")


def test_history_check_detects_an_edited_last_record(tmp_path: Path, history_host: Path) -> None:
    host = _copy(history_host, tmp_path / "host")
    lines = audit_lines(host)
    lines[-1] = lines[-1].replace(b'"outcome":"refused"', b'"outcome":"ok"')
    (host / "audit.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert_error(appliance(host, "history", "--check"), 6, "line 5")


# -- clocks -----------------------------------------------------------------------------------


def test_assume_time_in_the_future_expires_the_bundle(tmp_path: Path, world: World) -> None:
    host = world.new_host(tmp_path / "host", "v1")
    future = iso(now_epoch() + 3 * 365 * DAY)  # bundles last a year; the root ten
    assert_error(
        appliance(host, "install", world.bundles["2.0.0"], "--assume-time", future),
        3,
        "bundle demo 2.0.0 expired at",
    )
    record = audit_records(host)[-1]
    assert (record["event"], record["outcome"]) == ("install", "refused")
    assert record["assumed_time"] == future
    assert "clock_behind" not in record
    assert current_target(host) == f"slots/{slot_name(1, '1.0.0')}"
    # Without the override the same bundle installs: the refusal was the clock's doing.
    ok(appliance(host, "install", world.bundles["2.0.0"]))


@pytest.fixture(scope="module")
def expired_before_floor(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle signed a day before T (the world's `created`) that expired at T - 1 second."""
    d = tmp_path_factory.mktemp("old")
    recipe = write_recipe(d, version="0.9.0", model=random_bytes(4096, seed=7), valid_days=1)
    out = d / "demo-0.9.0.tar"
    build(recipe, out, world.signers, epoch=world.epoch - DAY - 1)
    return out


def test_assume_time_is_floored_at_the_newest_signing_time(
    tmp_path: Path, world: World, expired_before_floor: Path
) -> None:
    t = world.epoch
    just_before = iso(t - 2)  # the old bundle is still valid at this instant...
    fresh = world.new_host(tmp_path / "fresh", "trusted")
    host = world.new_host(tmp_path / "host", "v1")  # holds a bundle created at T
    assert json.loads((host / "state.json").read_bytes())["time_floor"] == iso(t)
    on_fresh, on_host = run_all(
        partial(appliance, fresh, "verify", expired_before_floor, "--assume-time", just_before),
        partial(appliance, host, "verify", expired_before_floor, "--assume-time", just_before),
    )
    ok(on_fresh)
    record = audit_records(fresh)[-1]
    assert record["assumed_time"] == just_before
    assert "clock_behind" not in record
    # ...but once a bundle created at T is installed, no clock may go back before T.
    assert_error(on_host, 3, "bundle demo 0.9.0 expired at", iso(t - 1))
    record = audit_records(host)[-1]
    assert (record["event"], record["outcome"]) == ("verify", "refused")
    assert record["assumed_time"] == just_before
    assert "clock_behind" in record
    assert_error(
        appliance(
            host, "install", expired_before_floor, "--allow-downgrade", "--assume-time", just_before
        ),
        3,
        "expired",
    )
    assert current_target(host) == f"slots/{slot_name(1, '1.0.0')}"


# -- no network -------------------------------------------------------------------------------


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def test_host_commands_work_with_no_network(tmp_path: Path, world: World) -> None:
    if not _unshare_works():
        pytest.skip("'unshare -n true' fails here (needs root or user namespaces)")
    nonet = ["unshare", "-n"]
    probe = subprocess.run(
        [
            *nonet,
            "python3",
            "-c",
            "import socket; s = socket.socket(); s.settimeout(2); s.connect(('192.0.2.1', 80))",
        ],
        capture_output=True,
        text=True,
    )
    assert probe.returncode != 0
    assert "unreachable" in probe.stderr.lower(), probe.stderr
    host = tmp_path / "host"

    def offline(*args: str | os.PathLike[str]) -> None:
        ok(appliance(host, *args, prefix=nonet))

    offline("trust", "init", world.root_json, "--fingerprint", world.fingerprint)
    offline("verify", world.bundles["1.0.0"])
    offline("install", world.bundles["1.0.0"])
    offline("install", world.bundles["2.0.0"])
    offline("status")
    offline("rollback")
    offline("history", "--check")
    assert current_target(host) == f"slots/{slot_name(1, '1.0.0')}"
    assert [r["outcome"] for r in audit_records(host)] == ["ok"] * 5
