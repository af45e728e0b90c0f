"""The command-line contract of docs/cli.md: commands, exit codes, one-line errors, --json."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from helpers_cli import (
    APPLIANCE,
    BUILDER,
    MIB,
    Result,
    World,
    appliance,
    assert_error,
    audit_records,
    builder,
    clean_env,
    current_target,
    get_world,
    ok,
    run,
    run_all,
    slot_name,
    tree_digest,
    wait_for,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return get_world(tmp_path_factory)


def _documented_commands(section: str) -> set[str]:
    """First words of the command column of a table in docs/cli.md after ``## section``."""
    text = DOCS.read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return {m.group(1) for m in re.finditer(r"^\| `([a-z-]+)", text, re.MULTILINE)}


def test_help_lists_every_documented_command() -> None:
    programs = {
        BUILDER: "appliance-builder (online machine)",
        APPLIANCE: "appliance (isolated host)",
    }
    results = run_all(*(partial(run, [program, "--help"]) for program in programs))
    for section, result in zip(programs.values(), results, strict=True):
        documented = _documented_commands(section)
        assert len(documented) >= 6
        listed = set(re.findall(r"^  ([a-z-]+)\s", ok(result).out, re.MULTILINE))
        assert documented <= listed, (section, documented - listed)


Case = tuple[str, Callable[[], Result], int, tuple[str, ...]]


def _check_errors(cases: list[Case]) -> None:
    """Run every case at once; each must exit with its code and one line naming its fragments."""
    results = run_all(*(call for _, call, _, _ in cases))
    for (label, _, code, fragments), result in zip(cases, results, strict=True):
        try:
            assert_error(result, code, *fragments)
        except AssertionError as exc:
            raise AssertionError(f"case {label!r}: {exc}") from None


def test_usage_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    """Usage errors are one 'error:' line pointing at --help, exit 2, no traceback."""
    results = run_all(
        partial(appliance, tmp_path, "no-such-command"),
        partial(appliance, tmp_path, "install", "x.tar", "--keep", "0"),
        partial(builder, "build"),
    )
    for result in results:
        assert result.rc == 2, result.describe()
        lines = result.err.splitlines()
        assert len(lines) == 1, result.describe()
        assert lines[0].startswith("error: "), result.describe()
        assert "--help" in lines[0], result.describe()
    assert not tmp_path.joinpath("slots").exists()


def test_bad_input_is_one_line_exit_2_or_3(tmp_path: Path, world: World) -> None:
    host = world.new_host(tmp_path / "host")
    bundle = world.bundles["1.0.0"]
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\0" * 2048)
    not_root = tmp_path / "root.json"
    not_root.write_text(json.dumps({"signed": {}}))
    absent = tmp_path / "absent"
    _check_errors([
        ("no bundle", partial(appliance, host, "verify", absent), 2,
         ("cannot open bundle", str(absent))),
        ("bad time", partial(appliance, host, "install", bundle, "--assume-time", "yesterday"),
         2, ("--assume-time", "YYYY-MM-DDTHH:MM:SSZ")),
        ("no root file", partial(appliance, host, "trust", "update", absent), 2,
         ("cannot read", str(absent))),
        ("no key file", partial(builder, "sign", bundle, "--key", absent), 2, (str(absent),)),
        ("inspect junk", partial(builder, "inspect", junk), 3, ("format",)),
        ("inspect absent", partial(builder, "inspect", absent), 2, (str(absent),)),
        ("not a root", partial(builder, "root", "verify", not_root), 3, ("root",)),
    ])  # fmt: skip
    assert not (host / "current").exists()
    assert list((host / "slots").iterdir()) == []


def test_appliance_root_from_environment(tmp_path: Path, world: World) -> None:
    host = world.new_host(tmp_path / "host", "v1")
    status = ok(
        run([APPLIANCE, "status", "--json"], env=clean_env(APPLIANCE_ROOT=str(host)))
    ).json()
    assert status["root"] == str(host)
    assert status["active"]["version"] == "1.0.0"


def test_json_goes_to_stdout_alone(tmp_path: Path, world: World) -> None:
    """--json output is pure JSON on stdout; nothing on stderr (no progress bar off a tty)."""
    host = world.new_host(tmp_path / "host")
    for args in (
        ("verify", world.bundles["1.0.0"], "--json"),
        ("install", world.bundles["1.0.0"], "--json"),
        ("status", "--json"),
    ):
        result = ok(appliance(host, *args))
        assert isinstance(result.json(), dict)
        assert result.err == ""


def test_exit_codes_3_4_and_6(tmp_path: Path, world: World) -> None:
    host = world.new_host(tmp_path / "host", "v1")
    active = host / "slots" / slot_name(1, "1.0.0")
    before = tree_digest(active)
    # 3: one byte of model weights changed.
    tampered = tmp_path / "tampered.tar"
    data = bytearray(world.bundles["2.0.0"].read_bytes())
    data[100_000] ^= 0xFF
    tampered.write_bytes(bytes(data))
    assert_error(
        appliance(host, "install", tampered), 3, "payload/model/model.bin", "sha256 mismatch"
    )
    # 4: a replay of the installed version.
    assert_error(appliance(host, "install", world.bundles["1.0.0"]), 4, "already installed in slot")
    assert current_target(host) == f"slots/{active.name}"
    assert tree_digest(active) == before
    assert list((host / "staging").iterdir()) == []
    assert [r["outcome"] for r in audit_records(host)[-2:]] == ["refused", "refused"]
    # 6: damaged local state.
    (active / "slot.json").write_text("{")
    assert_error(appliance(host, "status"), 6, "slot", "damaged")
    (host / "state.json").write_text("[]")
    assert_error(appliance(host, "install", world.bundles["2.0.0"]), 6, "state", "damaged")


def _interrupt_install(world: World, host: Path) -> subprocess.CompletedProcess[bytes]:
    data = world.big_bundle.read_bytes()
    # A job started in the background by a non-interactive shell inherits SIGINT ignored, and
    # the appliance rightly honours that (as under nohup): reset it for the child, so the test
    # means the same wherever CI runs it from.
    reset_sigint = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", reset_sigint, APPLIANCE, "--root", host, "install", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    assert proc.stdin is not None
    partial = host / "staging" / slot_name(2, "2.0.0") / "payload" / "model" / "model.bin"
    try:
        proc.stdin.write(data[: 8 * MIB])
        proc.stdin.flush()
        wait_for(
            lambda: partial.exists() and partial.stat().st_size >= MIB,
            what="the install to be mid-payload",
        )
        proc.send_signal(signal.SIGINT)
        # stdin stays open until the process is gone: an EOF now would race the interrupt.
        proc.wait(timeout=30)
        assert proc.stdout is not None
        assert proc.stderr is not None
        stdout, stderr = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:  # pragma: no cover - only when an assertion failed
            proc.kill()
            proc.wait()
        proc.stdin.close()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def interrupted(world: World, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    host = world.new_host(tmp_path_factory.mktemp("sigint") / "host", "v1")
    result = _interrupt_install(world, host)
    assert result.returncode == 130, result
    return host, result.stderr


def test_ctrl_c_exits_130_and_cleans_staging(interrupted: tuple[Path, bytes]) -> None:
    host, stderr = interrupted
    assert b"Traceback" not in stderr
    assert current_target(host) == f"slots/{slot_name(1, '1.0.0')}"
    assert list((host / "staging").iterdir()) == []
    assert not (host / "slots" / slot_name(2, "2.0.0")).exists()


def test_ctrl_c_prints_one_error_line(interrupted: tuple[Path, bytes]) -> None:
    _, stderr = interrupted
    assert stderr.decode().splitlines() == ["error: interrupted"]


def test_root_that_is_a_file_is_bad_input_not_a_bug(tmp_path: Path, world: World) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    result = appliance(not_a_dir, "install", world.bundles["1.0.0"])
    assert result.rc in (2, 5), result.describe()
    assert_error(result, result.rc, str(not_a_dir))
