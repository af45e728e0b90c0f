"""The systemd unit that `appliance service install` writes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers_cli import APPLIANCE, ok, run


def _install(tmp_path: Path, *extra: str) -> Path:
    unit_dir = tmp_path / "units"
    ok(
        run(
            [
                APPLIANCE,
                "--root",
                tmp_path / "host",
                "service",
                "install",
                "--unit-dir",
                unit_dir,
                *extra,
            ]
        )
    )
    return unit_dir / "appliance.service"


def test_unit_runs_serve_from_this_interpreter_hardened(tmp_path: Path) -> None:
    everywhere = "0.0.0.0"  # noqa: S104 - the unit is told where to listen; nothing binds here
    unit = _install(tmp_path, "--host", everywhere, "--port", "9000", "--user", "appliance")
    text = unit.read_text()
    root = (tmp_path / "host").resolve()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert exec_start.split()[:3] == [f"ExecStart={sys.executable}", "-m", "appliance"]
    assert f"--root {root} serve --host 0.0.0.0 --port 9000" in exec_start
    for directive in (
        "User=appliance",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ReadWritePaths={root}",
        f"ConditionPathExists={root}/current",
        "WantedBy=multi-user.target",
    ):
        assert directive in text.splitlines(), directive


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not here")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    unit = _install(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    # The same check refuses a broken unit, so the pass above means something.
    broken = tmp_path / "broken" / "appliance.service"
    broken.parent.mkdir()
    broken.write_text(
        unit.read_text()
        .replace("Restart=on-failure", "Restart=sometimes")
        .replace(f"ExecStart={sys.executable}", "ExecStart=/nonexistent/python")
    )
    bad = subprocess.run(
        ["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, check=False
    )
    assert bad.returncode != 0
