"""Issue 8, the host half: no input, fault or damaged host state may brick the host or falsify
its audit trail. One test (or a small family) per class of the adversarial pass, each with the
real fault where the machine allows it: a small tmpfs for ENOSPC and EROFS (as root), kill -9,
SIGTERM and SIGINT from outside, planted files and links.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from helpers_cli import (
    APPLIANCE,
    World,
    appliance,
    assert_error,
    audit_lines,
    audit_records,
    clean_env,
    current_target,
    get_world,
    ok,
    slot_name,
    wait_for,
)
from simulator import Host, make_keys

from appliance.audit import MAX_RECORD_BYTES, AuditLog
from appliance.installer import InstallOptions
from appliance.lock import HostLock
from signing.canonical import encode_canonical
from signing.errors import VerificationError
from signing.manifest import encode_signature_block
from signing.threshold import Signature

S1, S2 = slot_name(1, "1.0.0"), slot_name(2, "2.0.0")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return get_world(tmp_path_factory)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of the test's own: real ENOSPC and, remounted, real EROFS."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for real ENOSPC/EROFS needs root (CI runs as root)")
    mount = tmp_path / "fs"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte; return the filler."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while os.write(fd, bytes(size)):
                    pass
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler


def _check(host: Path) -> int:
    out = ok(appliance(host, "history", "--check")).out
    return int(out.split("intact: ")[1].split()[0])


# -- 1. bounded records ----------------------------------------------------------------------


def test_a_huge_signature_block_is_refused_with_a_bounded_record(host: Host) -> None:
    """4,800 signatures by unknown keys: refused, in one bounded record; appends go on."""
    sim = host.sim
    manifest, payload = sim.manifest()
    raw = manifest.to_bytes()
    strangers = make_keys(4800)
    sigs = [Signature(k.keyid, k.sign(raw)) for k in strangers]
    block = encode_signature_block(sigs, space=1 << 20)  # V3's limit, whole
    assert len(block) > 600_000
    bad = host.write(sim.bundle_bytes(manifest, payload, signature_block=block))
    with pytest.raises(VerificationError) as refused:
        host.appliance.verify(str(bad))
    assert len(refused.value.diagnostics()) <= 2000
    lines = audit_lines(host.root)
    assert all(len(line) <= MAX_RECORD_BYTES for line in lines)
    assert json.loads(lines[-1])["outcome"] == "refused"
    host.install(sim.bundle("1.0.0"))  # the host is not bricked
    assert host.appliance.audit.check() == len(lines) + 1


def test_every_field_of_a_record_is_bounded(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    from datetime import UTC, datetime

    now = datetime(2026, 1, 1, tzinfo=UTC)
    log.append(
        time=now,
        event="verify",
        outcome="refused",
        error="x" * 1_000_000,
        signers=[f"key{i}" for i in range(10_000)],
    )
    # Bounded field by field and still too large: only the core fields stay, named as cut.
    log.append(
        time=now,
        event="verify",
        outcome="refused",
        error="e",
        nested={f"k{i}": ["y" * 5000] * 100 for i in range(30)},
    )
    log.append(time=now, event="verify", outcome="ok")
    lines = (tmp_path / "audit.jsonl").read_bytes().splitlines()
    assert all(len(line) <= MAX_RECORD_BYTES for line in lines)
    record = json.loads(lines[0])
    assert len(record["error"]) <= 1000 and record["error"].endswith("more characters cut)")
    assert record["signers"][-1] == "… 9980 more"
    cut = json.loads(lines[1])
    assert (cut["error"], cut["truncated_fields"]) == ("e", ["nested"])
    assert log.check() == 3


def test_a_legacy_record_longer_than_64_kib_does_not_brick_appends(host: Host) -> None:
    """A log written before records were bounded: appends read the long last line back."""
    log = host.appliance.audit
    path, head = log.path, log.head_path
    last = path.read_bytes().splitlines()[-1]
    record = {
        "seq": 2,
        "prev": hashlib.sha256(last).hexdigest(),
        "time": "2026-01-01T00:00:00Z",
        "event": "verify",
        "outcome": "refused",
        "error": "z" * 140_000,
    }
    line = encode_canonical(record)
    with path.open("ab") as fh:
        fh.write(line + b"\n")
    head.write_bytes(encode_canonical({"count": 2, "sha256": hashlib.sha256(line).hexdigest()}))
    host.install(host.sim.bundle("1.0.0"))
    assert log.check() == 3


# -- 2. whole-or-nothing appends, torn tails ---------------------------------------------------


def test_a_full_disk_uses_the_reserve_so_the_record_lands(small_fs: Path, world: World) -> None:
    host = world.new_host(small_fs / "host", "v1")
    ok(appliance(host, "verify", world.bundles["2.0.0"]))  # makes the reserve
    assert (host / "audit.reserve").stat().st_size > 0
    before = _check(host)
    filler = _fill(small_fs)
    ok(appliance(host, "verify", world.bundles["2.0.0"]))
    assert _check(host) == before + 1
    filler.unlink()
    ok(appliance(host, "verify", world.bundles["2.0.0"]))
    assert (host / "audit.reserve").stat().st_size > 0  # held again once there is room


def test_a_full_disk_without_reserve_appends_nothing_and_recovers(
    small_fs: Path, world: World
) -> None:
    host = world.new_host(small_fs / "host", "v1")
    (host / "audit.reserve").unlink(missing_ok=True)
    log_before = (host / "audit.jsonl").read_bytes()
    head_before = (host / "audit.head").read_bytes()
    filler = _fill(small_fs)
    # Fill the last partial page of the log too, so that the record cannot fit anywhere.
    assert_error(appliance(host, "verify", world.bundles["2.0.0"]), 5, "audit log")
    assert (host / "audit.jsonl").read_bytes() == log_before  # nothing torn left behind
    assert (host / "audit.head").read_bytes() == head_before
    filler.unlink()
    count = _check(host)
    ok(appliance(host, "verify", world.bundles["2.0.0"]))
    assert _check(host) == count + 1


def test_a_torn_tail_is_quarantined_with_a_recovered_record(world: World, tmp_path: Path) -> None:
    """What kill -9 inside the record's write leaves: bytes after the last newline, with the
    head still anchoring the last whole record."""
    host = world.new_host(tmp_path / "host", "v1")
    count = _check(host)
    fragment = b'{"error":"half a rec'
    with (host / "audit.jsonl").open("ab") as fh:
        fh.write(fragment)
    out = ok(appliance(host, "history", "--check")).out
    assert f"intact: {count} records" in out and "interrupted append" in out
    ok(appliance(host, "verify", world.bundles["2.0.0"]))
    records = audit_records(host)
    recovered, verify = records[-2], records[-1]
    assert (recovered["outcome"], recovered["torn_bytes"]) == ("recovered", len(fragment))
    assert (host / recovered["kept_in"]).read_bytes() == fragment
    assert recovered["torn_sha256"] == hashlib.sha256(fragment).hexdigest()
    assert verify["event"] == "verify"
    assert _check(host) == count + 2


def test_a_torn_tail_behind_a_cut_head_is_tampering(world: World, tmp_path: Path) -> None:
    host = world.new_host(tmp_path / "host", "v1")
    lines = (host / "audit.jsonl").read_bytes().splitlines(keepends=True)
    # The newest record cut in half: the head anchors it, so this is no torn append.
    (host / "audit.jsonl").write_bytes(b"".join(lines[:-1]) + lines[-1][:20])
    assert_error(appliance(host, "verify", world.bundles["2.0.0"]), 6, "repair")


# -- 3. the truth about an install that activated ---------------------------------------------


def test_a_disk_full_after_the_switch_is_activated_incomplete(small_fs: Path, world: World) -> None:
    host = world.new_host(small_fs / "host", "v1")
    ok(appliance(host, "verify", world.bundles["1.0.0"]))  # the reserve is in place
    state_before = (host / "state.json").read_bytes()
    result = appliance(
        host,
        "install",
        world.bundles["2.0.0"],
        env=clean_env(APPLIANCE_FAULT_INJECT="fill-disk:after-switch"),
    )
    assert_error(result, 10, "activated", "host state could not be saved", "appliance repair")
    assert current_target(host) == f"slots/{S2}"
    assert (host / "state.json").read_bytes() == state_before
    record = audit_records(host)[-1]
    assert (record["event"], record["outcome"], record["activated"]) == (
        "install",
        "activated-incomplete",
        True,
    )
    assert record["slot"] == S2
    (host / ".fault-fill").unlink()
    repaired = ok(appliance(host, "repair")).out
    assert "rebuilt state.json" in repaired
    status = json.loads(ok(appliance(host, "status", "--json")).out)
    assert status["highest_installed"] == {"demo": "2.0.0"}
    _check(host)


def test_an_option_out_of_range_is_refused_before_anything_is_written(
    world: World, tmp_path: Path
) -> None:
    host = world.new_host(tmp_path / "host", "v1")
    before = audit_lines(host)
    result = appliance(host, "install", world.bundles["2.0.0"], "--grace-period", "300000000000")
    assert result.rc == 2 and "--grace-period" in result.err and "Traceback" not in result.err
    assert audit_lines(host) == before
    assert current_target(host) == f"slots/{S1}"
    with pytest.raises(Exception, match="grace-period"):
        InstallOptions(grace_period_s=300_000_000_000)


def test_an_unexpected_exception_is_audited_with_its_type(
    installed_host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug (here a library call that fails in a way nobody planned for) still writes the
    record, then propagates unchanged."""

    def broken(path: object) -> object:
        raise RuntimeError("disk_usage exploded")

    monkeypatch.setattr(shutil, "disk_usage", broken)
    with pytest.raises(RuntimeError, match="exploded"):
        installed_host.install(installed_host.sim.bundle("2.0.0"))
    record = installed_host.last_audit()
    assert (record["outcome"], record["activated"]) == ("failed", False)
    assert record["error"] == "internal error: RuntimeError: disk_usage exploded"
    assert installed_host.staging_entries() == []


# -- 4. tamper evidence is never overwritten ---------------------------------------------------


def _cut_newest(host: Path) -> None:
    lines = (host / "audit.jsonl").read_bytes().splitlines(keepends=True)
    (host / "audit.jsonl").write_bytes(b"".join(lines[:-2]))


TAMPERING = {
    "head deleted": lambda host: (host / "audit.head").unlink(),
    "head corrupted": lambda host: (host / "audit.head").write_bytes(b'{"count":1,"sha256":"0"}'),
    "newest records cut": _cut_newest,
    "log removed": lambda host: (host / "audit.jsonl").unlink(),
}


@pytest.mark.parametrize("how", sorted(TAMPERING))
def test_tampering_survives_the_next_operation_until_reanchored(
    how: str, world: World, tmp_path: Path
) -> None:
    host = world.new_host(tmp_path / "host", "v1")
    ok(appliance(host, "verify", world.bundles["1.0.0"]))
    TAMPERING[how](host)
    assert_error(appliance(host, "history", "--check"), 6)
    files = {p.name: p.read_bytes() for p in host.glob("audit.*") if p.is_file()}
    for command in (("verify", world.bundles["2.0.0"]), ("install", world.bundles["2.0.0"])):
        assert_error(appliance(host, *command), 6, "appliance repair --reanchor-audit-log")
    assert_error(appliance(host, "rollback"), 6, "repair")
    assert {p.name: p.read_bytes() for p in host.glob("audit.*") if p.is_file()} == files
    assert_error(appliance(host, "history", "--check"), 6)  # still caught
    assert current_target(host) == f"slots/{S1}"
    # Repair refuses to accept the damage unless told to, then keeps the evidence.
    assert_error(appliance(host, "repair"), 6, "--reanchor-audit-log")
    ok(appliance(host, "repair", "--reanchor-audit-log"))
    first = audit_records(host)[0]
    assert (first["event"], first["outcome"]) == ("audit", "reanchored")
    if "audit.jsonl" in files:
        kept = (host / first["previous_log"]).read_bytes()
        assert kept == files["audit.jsonl"]
        assert first["previous_log_sha256"] == hashlib.sha256(kept).hexdigest()
    assert audit_records(host)[1]["event"] == "repair"
    _check(host)
    ok(appliance(host, "install", world.bundles["2.0.0"]))


# -- 9, 12. exit codes for EROFS and EPIPE ------------------------------------------------------


def test_a_read_only_root_exits_5(small_fs: Path, world: World) -> None:
    host = world.new_host(small_fs / "host", "v1")
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    for command in (
        ("verify", world.bundles["2.0.0"]),
        ("install", world.bundles["2.0.0"]),
        ("rollback",),
        ("keys", "add", "alice"),
        ("repair",),
    ):
        assert_error(appliance(host, *command), 5, "Read-only file system")
    assert current_target(host) == f"slots/{S1}"


def test_a_closed_stdout_is_not_an_internal_error(world: World, tmp_path: Path) -> None:
    host = world.new_host(tmp_path / "host", "v1")
    read_end, write_end = os.pipe()
    os.close(read_end)  # `appliance status | true`, with `true` gone before the first write
    try:
        proc = subprocess.run(
            [APPLIANCE, "--root", host, "status"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=clean_env(),
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141
    assert proc.stderr == b""


# -- 10. damaged host state ----------------------------------------------------------------------


def test_a_dangling_current_is_refused_before_writing_then_repaired(
    world: World, tmp_path: Path
) -> None:
    host = world.new_host(tmp_path / "host", "v1")
    shutil.rmtree(host / "slots" / S1)  # an operator removed the active slot by hand
    assert_error(appliance(host, "install", world.bundles["2.0.0"]), 6, "appliance repair")
    assert list((host / "slots").iterdir()) == []
    assert list((host / "staging").iterdir()) == []
    assert_error(appliance(host, "rollback", "--to", "1.0.0"), 6, "appliance repair")
    assert_error(appliance(host, "status"), 6, "current points at")
    out = ok(appliance(host, "repair")).out
    assert "no valid slot is left" in out
    ok(appliance(host, "install", world.bundles["2.0.0"]))
    assert current_target(host) == f"slots/{S2}"
    assert audit_records(host)[-2]["event"] == "repair"
    _check(host)


def test_a_stray_directory_in_slots_is_ignored_with_a_warning(world: World, tmp_path: Path) -> None:
    host = world.new_host(tmp_path / "host", "v1")
    (host / "slots" / "lost+found").mkdir()
    installed = ok(appliance(host, "install", world.bundles["2.0.0"]))
    assert "warning: ignoring slots/lost+found" in installed.err
    assert_error(appliance(host, "status"), 6, "lost+found")
    out = ok(appliance(host, "repair")).out
    assert "moved slots/lost+found to quarantine/lost+found" in out
    assert (host / "quarantine" / "lost+found").is_dir()
    assert ok(appliance(host, "status")).err == ""


def test_a_symlinked_slot_with_a_forged_version_is_never_adopted(
    world: World, tmp_path: Path
) -> None:
    host = world.new_host(tmp_path / "host", "v1")
    forged = tmp_path / "elsewhere" / slot_name(9, "99.0")
    shutil.copytree(host / "slots" / S1, forged)
    meta = json.loads((forged / "slot.json").read_bytes())
    meta.update(seq=9, version="99.0")
    (forged / "slot.json").write_text(json.dumps(meta))
    (host / "slots" / forged.name).symlink_to(forged)
    ok(appliance(host, "install", world.bundles["2.0.0"]))  # not refused as a downgrade
    status = json.loads(appliance(host, "status", "--json").out)
    assert status["highest_installed"] == {"demo": "2.0.0"}
    assert all(s["version"] != "99.0" for s in status["slots"])
    ok(appliance(host, "repair"))
    assert forged.is_dir()  # only the link went
    assert not (host / "slots" / forged.name).is_symlink()


def test_a_current_outside_the_root_is_not_shown_as_active(world: World, tmp_path: Path) -> None:
    host = world.new_host(tmp_path / "host", "v1")
    outside = tmp_path / "outside"
    shutil.copytree(host / "slots" / S1, outside)
    (host / "current").unlink()
    (host / "current").symlink_to(outside)
    result = appliance(host, "status", "--json")
    assert_error(result, 6, "outside slots/")
    assert json.loads(result.out)["active"] is None
    ok(appliance(host, "repair"))
    assert current_target(host) == f"slots/{S1}"


def test_a_damaged_state_file_is_rebuilt_by_repair(world: World, tmp_path: Path) -> None:
    host = world.new_host(tmp_path / "host", "v1")
    (host / "state.json").write_text('{"highest": []')
    assert_error(appliance(host, "install", world.bundles["2.0.0"]), 6, "appliance repair")
    ok(appliance(host, "repair"))
    assert json.loads((host / "state.json").read_bytes())["highest"] == {"demo": "1.0.0"}
    ok(appliance(host, "install", world.bundles["2.0.0"]))


# -- 11. audit gaps: a busy lock, signals --------------------------------------------------------


def test_an_install_refused_by_a_busy_lock_is_audited(world: World, tmp_path: Path) -> None:
    host = world.new_host(tmp_path / "host", "v1")
    with HostLock(host / "lock"):
        assert_error(appliance(host, "install", world.bundles["2.0.0"]), 5, "another appliance")
    record = audit_records(host)[-1]
    assert (record["event"], record["outcome"]) == ("install", "refused")
    assert "another appliance operation is running" in record["error"]
    _check(host)


def _health_check_child(installer_pid: int) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"appliance.runtime.healthcheck" in cmdline and ppid == installer_pid:
            return int(proc.name)
    return None


def _gone(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_signal_during_the_health_check_ends_the_child_and_tells_the_truth(
    sig: signal.Signals, world: World, tmp_path: Path
) -> None:
    host = world.new_host(tmp_path / "host", "v1")
    before = len(audit_lines(host))
    env = clean_env(APPLIANCE_FAULT_INJECT="hang:health-check")
    del env["APPLIANCE_SKIP_HEALTH_CHECK"]
    # SIGINT at its default for the child, as tests/test_cli.py explains.
    reset = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", reset, APPLIANCE, "--root", host, "install", world.bundles["2.0.0"]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        child = wait_for(lambda: _health_check_child(proc.pid), what="the health-check child")
        proc.send_signal(sig)
        proc.wait(timeout=60)
        wait_for(lambda: _gone(child), what="the health-check child to end")
    finally:
        if proc.poll() is None:  # pragma: no cover - only when an assertion failed
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode()
    assert current_target(host) == f"slots/{S1}"
    assert list((host / "staging").iterdir()) == [] or sig == signal.SIGKILL
    if sig == signal.SIGKILL:
        assert len(audit_lines(host)) == before  # nothing can be said; the next run cleans up
        ok(appliance(host, "install", world.bundles["2.0.0"]))
        return
    expected = {signal.SIGTERM: (143, "terminated (SIGTERM)"), signal.SIGINT: (130, "interrupted")}
    code, error = expected[sig]
    assert proc.returncode == code, stderr
    assert stderr.splitlines() == [f"error: {error}"]
    record = audit_records(host)[-1]
    assert (record["event"], record["outcome"], record["error"]) == ("install", "failed", error)
    assert "health_check" not in record  # never "ok" for a check that did not finish
    assert record["activated"] is False


def test_sigterm_mid_payload_is_audited_and_cleans_staging(world: World, tmp_path: Path) -> None:
    host = world.new_host(tmp_path / "host", "v1")
    data = world.big_bundle.read_bytes()
    proc = subprocess.Popen(
        [APPLIANCE, "--root", host, "install", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    assert proc.stdin is not None
    partial = host / "staging" / S2 / "payload" / "model" / "model.bin"
    try:
        proc.stdin.write(data[: len(data) // 3])
        proc.stdin.flush()
        wait_for(lambda: partial.exists() and partial.stat().st_size > 0, what="mid-payload")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        if proc.poll() is None:  # pragma: no cover
            proc.kill()
            proc.wait()
        proc.stdin.close()
    assert list((host / "staging").iterdir()) == []
    record = audit_records(host)[-1]
    assert (record["outcome"], record["error"]) == ("failed", "terminated (SIGTERM)")
    _check(host)


# -- 13. a bundle dated far ahead -----------------------------------------------------------------


def test_a_future_dated_bundle_cannot_raise_the_time_floor(host: Host) -> None:
    sim = host.sim
    future = sim.now + timedelta(days=200)
    bundle = sim.bundle("1.0.0", created=future)
    with pytest.raises(VerificationError, match="more than a day after this host's clock"):
        host.install(bundle)
    assert host.last_audit()["outcome"] == "refused"
    # The host is not locked: an honest bundle still installs.
    host.install(sim.bundle("1.0.1"))
    # An operator who knows better vouches for the time; it is logged.
    host.install(
        sim.bundle("2.0.0", created=future),
        InstallOptions(skip_health_check=True, assume_time=future),
    )
    assert host.last_audit()["assumed_time"]
