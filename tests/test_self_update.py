"""The standalone program replaces itself from a signed bundle and goes back (issue 12, item 4).

The real frozen program (tests/frozen.py) travels in a signed bundle as its entry of kind
``program``; ``appliance install`` verifies and stores it like any payload file, and
``appliance self update`` switches ``HOME/current`` to it after the new program's self-test on
this host. An equal or older program is refused unless ``--allow-downgrade``; a failed
self-test leaves the running program in place; ``self rollback`` goes back; every step is
audited, and the trust store, the slots and the API keys are untouched.
"""

from __future__ import annotations

import json
import stat
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from frozen import Frozen, frozen_program
from helpers_cli import appliance, assert_error, ok
from simulator import DEFAULT_FILES, Host

from signing.errors import FormatError
from signing.manifest import Entry


@pytest.fixture(scope="module")
def program() -> Frozen:
    return frozen_program()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A program home whose current program is an old one (0.0.1), as the operator left it."""
    home = tmp_path / "opt-appliance"
    old = home / "versions" / "0.0.1" / "appliance"
    old.mkdir(parents=True)
    script = old / "appliance"
    script.write_text("#!/bin/sh\necho 'appliance, version 0.0.1'\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    (home / "current").symlink_to(Path("versions") / "0.0.1")
    return home


@pytest.fixture
def carrying(host: Host, program: Frozen) -> Host:
    """``host`` with a bundle installed whose payload carries the frozen program."""
    files = dict(DEFAULT_FILES) | {f"program/{program.tar.name}": program.tar.read_bytes()}
    host.install(host.sim.bundle("1.0.0", files=files))
    return host


def trust_and_keys(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted([*(root / "trust").rglob("*"), *(root / "slots").rglob("*.json")])
        if p.is_file()
    }


def test_update_switches_to_the_carried_program_after_its_self_test(
    carrying: Host, home: Path, program: Frozen
) -> None:
    root = carrying.root
    before = trust_and_keys(root)
    result = ok(appliance(root, "self", "update", "--home", home, "--json"))
    summary = json.loads(result.out)
    version = summary["program_version"]
    assert summary["replaced"] == "0.0.1"
    assert (home / "current").readlink() == Path("versions") / version
    assert (home / "previous").readlink() == Path("versions") / "0.0.1"
    new = home / "current" / "appliance" / "appliance"
    # The new program runs this host.
    out = subprocess.run(
        [str(new), "--root", str(root), "self", "test"], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("self-test ok: root v1, audit log ")
    record = carrying.last_audit()
    assert (record["event"], record["outcome"]) == ("self-update", "ok")
    assert record["program_version"] == version and record["replaced"] == "0.0.1"
    assert trust_and_keys(root) == before
    # The same program again: refused, audited; --allow-downgrade replaces it.
    again = appliance(root, "self", "update", "--home", home)
    assert_error(again, 4, f"program {version} is not newer than the current program {version}")
    assert carrying.last_audit()["outcome"] == "refused"
    ok(appliance(root, "self", "update", "--home", home, "--allow-downgrade"))
    assert (home / "current").readlink() == Path("versions") / version
    # Back to the program the first update replaced.
    ok(appliance(root, "self", "rollback", "--home", home))
    assert (home / "current").readlink() == Path("versions") / "0.0.1"
    assert carrying.last_audit()["event"] == "self-rollback"


def test_a_failed_self_test_leaves_the_running_program(carrying: Host, home: Path) -> None:
    root = carrying.root
    trusted = root / "trust" / "root.json"
    aside = root / "root.json.aside"
    trusted.rename(aside)  # the new program cannot read this host's trust store
    try:
        result = appliance(root, "self", "update", "--home", home)
    finally:
        aside.rename(trusted)
    assert_error(result, 5, "the new program failed its self-test on this host")
    assert (home / "current").readlink() == Path("versions") / "0.0.1"
    assert sorted(p.name for p in (home / "versions").iterdir()) == ["0.0.1"]
    assert carrying.last_audit()["outcome"] == "failed"


def test_a_slot_without_a_program_and_a_damaged_program_are_refused(
    carrying: Host, home: Path, program: Frozen
) -> None:
    root = carrying.root
    slot = (root / "current").resolve()
    stored = slot / "payload" / "program" / program.tar.name
    stored.chmod(0o644)
    with stored.open("r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    result = appliance(root, "self", "update", "--home", home)
    assert_error(result, 6, "the program stored in the slot does not match its signed manifest")
    assert (home / "current").readlink() == Path("versions") / "0.0.1"


def test_a_manifest_with_two_programs_is_refused(host: Host) -> None:
    manifest, _ = host.sim.manifest(files=dict(DEFAULT_FILES))
    entries = (
        *manifest.entries,
        Entry("program/a.tar", 1, "0" * 64, "program"),
        Entry("program/b.tar", 1, "0" * 64, "program"),
    )
    with pytest.raises(FormatError, match="more than one entry of kind 'program'"):
        replace(manifest, entries=tuple(sorted(entries, key=lambda e: e.path)))
