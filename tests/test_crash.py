"""kill -9 during an install: the old slot keeps serving, untouched; the next run cleans up.

Two ways to die: the installer's own fault injection (APPLIANCE_FAULT_INJECT names a step of
docs/bundle-format.md section 8 and the process SIGKILLs itself there), and a real external
``kill -9`` while the payload is streaming in from a pipe.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from functools import partial
from pathlib import Path

import pytest
from helpers_cli import (
    APPLIANCE,
    MIB,
    World,
    appliance,
    assert_error,
    audit_records,
    clean_env,
    current_target,
    get_world,
    ok,
    run_all,
    slot_name,
    tree_digest,
    wait_for,
)

from signing.bundle import Limits, open_bundle, read_head

S1 = slot_name(1, "1.0.0")
S2 = slot_name(2, "2.0.0")
FAULTS = ("after-payload", "after-commit", "after-switch")
CRASHES = (*FAULTS[:1], "mid-stream", *FAULTS[1:])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return get_world(tmp_path_factory)


def _kill_mid_stream(world: World, host: Path) -> None:
    """Pipe the 24 MiB bundle into `install -`, stop half-way, and kill -9 the installer once
    staging holds a partial payload file."""
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
        proc.stdin.write(data[: len(data) // 2])
        proc.stdin.flush()
        wait_for(
            lambda: partial.exists() and partial.stat().st_size >= 4 * MIB,
            what="a partial payload file in staging",
        )
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:  # pragma: no cover - only when an assertion failed
            proc.kill()
            proc.wait()
        proc.stdin.close()
    assert 0 < partial.stat().st_size < world.BIG_MODEL_SIZE


def crash(world: World, host: Path, point: str) -> None:
    """Install demo 2.0.0 over 1.0.0 and die at ``point``."""
    if point == "mid-stream":
        _kill_mid_stream(world, host)
        return
    result = appliance(
        host, "install", world.bundles["2.0.0"], env=clean_env(APPLIANCE_FAULT_INJECT=point)
    )
    assert result.rc == -signal.SIGKILL, result.describe()


def _status_and_check(host: Path) -> str:
    """`status --json` and `history --check` (both read-only, run at once); the active version."""
    status, check = run_all(
        partial(appliance, host, "status", "--json"), partial(appliance, host, "history", "--check")
    )
    ok(check)
    return str(ok(status).json()["active"]["version"])


def _assert_slot_holds_bundle(world: World, slot: Path, version: str) -> None:
    limits = Limits()
    with world.bundles[version].open("rb") as fh:
        manifest_bytes = read_head(open_bundle(fh, limits), limits).manifest_bytes
    assert (slot / "bundle" / "manifest.json").read_bytes() == manifest_bytes
    for entry in json.loads(manifest_bytes)["entries"]:
        source = world.source_file(version, entry["path"])
        assert (slot / "payload" / entry["path"]).read_bytes() == source.read_bytes()


@pytest.mark.parametrize("point", CRASHES)
def test_crash_leaves_a_complete_active_slot(tmp_path: Path, world: World, point: str) -> None:
    host = world.new_host(tmp_path / "host", "v1")
    v1_before = tree_digest(host / "slots" / S1)
    state_before = (host / "state.json").read_bytes()

    crash(world, host, point)

    assert tree_digest(host / "slots" / S1) == v1_before  # the old slot: not one byte changed
    if point == "after-switch":
        assert current_target(host) == f"slots/{S2}"
        _assert_slot_holds_bundle(world, host / "slots" / S2, "2.0.0")
        expected = "2.0.0"
    else:
        assert current_target(host) == f"slots/{S1}"
        assert (host / "state.json").read_bytes() == state_before
        expected = "1.0.0"
    # Evidence that the process died where we meant it to.
    if point in ("after-payload", "mid-stream"):
        assert [p.name for p in (host / "staging").iterdir()] == [S2]
        assert not (host / "slots" / S2).exists()
    else:
        assert list((host / "staging").iterdir()) == []
        _assert_slot_holds_bundle(world, host / "slots" / S2, "2.0.0")  # complete, by I8
    assert _status_and_check(host) == expected


@pytest.mark.parametrize("point", ["after-payload", "mid-stream"])
def test_next_install_cleans_up_and_succeeds(tmp_path: Path, world: World, point: str) -> None:
    host = world.new_host(tmp_path / "host", "v1")
    crash(world, host, point)
    result = ok(appliance(host, "install", world.bundles["2.0.0"], "--json"))
    assert result.json()["id"] == S2
    assert current_target(host) == f"slots/{S2}"
    _assert_slot_holds_bundle(world, host / "slots" / S2, "2.0.0")
    assert list((host / "staging").iterdir()) == []
    assert list((host / "trash").iterdir()) == []
    record = audit_records(host)[-1]
    assert (record["event"], record["outcome"]) == ("install", "ok")
    assert record["recovered"] == [f"staging/{S2}"]
    ok(appliance(host, "history", "--check"))


@pytest.mark.parametrize("point", ["after-commit", "after-switch"])
def test_after_commit_the_same_version_again_is_a_replay(
    tmp_path: Path, world: World, point: str
) -> None:
    """Once slots/ holds the verified 2.0.0 (I8), the slots are the ground truth: installing
    2.0.0 again is a replay (exit 4), even if I9 or I10 never ran; `rollback --to` serves."""
    host = world.new_host(tmp_path / "host", "v1")
    crash(world, host, point)
    expected = S2 if point == "after-switch" else S1
    assert_error(
        appliance(host, "install", world.bundles["2.0.0"]),
        4,
        "already installed in slot",
        "rollback --to 2.0.0",
    )
    assert current_target(host) == f"slots/{expected}"
    assert sorted(p.name for p in (host / "slots").iterdir()) == [S1, S2]
    assert list((host / "staging").iterdir()) == []
    assert list((host / "trash").iterdir()) == []
    ok(appliance(host, "history", "--check"))


def test_after_commit_the_inactive_slot_serves_rollback_to(tmp_path: Path, world: World) -> None:
    """docs/bundle-format.md: a crash between I8 and I9 leaves a complete, verified but
    inactive slot, which `rollback --to` can use."""
    host = world.new_host(tmp_path / "host", "v1")
    crash(world, host, "after-commit")
    assert "-> 2.0.0" in ok(appliance(host, "rollback", "--to", "2.0.0")).out
    assert current_target(host) == f"slots/{S2}"
    _assert_slot_holds_bundle(world, host / "slots" / S2, "2.0.0")
    ok(appliance(host, "history", "--check"))


@pytest.fixture(scope="module", params=["after-commit", "after-switch"])
def crashed_then_v3(
    request: pytest.FixtureRequest, world: World, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[dict[str, object]]]:
    """A crash at request.param while installing 2.0.0, then 3.0.0 installed; the audit
    records as they stood right after that install."""
    host = world.new_host(tmp_path_factory.mktemp("crashed") / "host", "v1")
    crash(world, host, request.param)
    result = ok(appliance(host, "install", world.bundles["3.0.0"], "--json"))
    assert result.json()["id"] == slot_name(3, "3.0.0")
    return host, audit_records(host)


def test_slot_numbers_stay_unique_after_a_crash(
    crashed_then_v3: tuple[Path, list[dict[str, object]]],
) -> None:
    host, _ = crashed_then_v3
    seqs = sorted(json.loads((p / "slot.json").read_bytes())["seq"] for p in host.glob("slots/*"))
    assert seqs == [1, 2, 3]
    assert json.loads((host / "state.json").read_bytes())["highest"] == {"demo": "3.0.0"}
    # Rolling back from 3.0.0 goes to 2.0.0, the newest slot before it.
    assert "-> 2.0.0" in ok(appliance(host, "rollback")).out
    assert current_target(host) == f"slots/{S2}"


def test_the_audit_log_accounts_for_a_slot_left_by_a_crash(
    crashed_then_v3: tuple[Path, list[dict[str, object]]],
) -> None:
    _, records = crashed_then_v3
    assert any(S2 in json.dumps(record) for record in records), records
