"""A systemd unit that runs ``appliance serve`` from the active slot.

The unit runs the appliance's own interpreter (the one installing it), so the service uses the
same offline environment as the CLI. It is hardened the way a network-facing service on an
isolated host should be: no new privileges, a read-only system except the appliance root, a
private /tmp, no kernel tunables, only IP and Unix sockets. ``LimitNOFILE`` lifts the open-file
limit from the default 1,024, which ``serve`` divides among client connections
(appliance/server/connections.py). ``serve`` follows the ``current`` link itself, so rollbacks
and installs do not need a unit change.

The unit listens on loopback unless told another address; opening it to the network is the
operator's explicit act, behind a firewall rule and with TLS (docs/operator-guide.md).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from appliance.fsutil import atomic_write

UNIT_NAME: Final = "appliance.service"
DEFAULT_UNIT_DIR: Final = Path("/etc/systemd/system")


@dataclass(frozen=True)
class ServiceSpec:
    root: Path
    host: str = "127.0.0.1"
    port: int = 8080
    user: str | None = None
    python: str = sys.executable
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_min_version: str | None = None

    def exec_start(self) -> str:
        argv = [
            self.python,
            "-m",
            "appliance",
            "--root",
            str(self.root),
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        for flag, value in (
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--tls-min-version", self.tls_min_version),
        ):
            if value is not None:
                argv += [flag, str(value)]
        return " ".join(shlex.quote(a) for a in argv)


def render_unit(spec: ServiceSpec) -> str:
    user = f"User={spec.user}\n" if spec.user else ""
    return f"""[Unit]
Description=airgap-appliance local inference service
Documentation=file://{spec.root}/
After=local-fs.target network.target
ConditionPathExists={spec.root}/current

[Service]
Type=exec
{user}ExecStart={spec.exec_start()}
Restart=on-failure
RestartSec=5
TimeoutStopSec=30
LimitNOFILE=65536
Environment=HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=strict
ProtectHome=read-only
ReadWritePaths={spec.root}
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictSUIDSGID=yes
LockPersonality=yes

[Install]
WantedBy=multi-user.target
"""


def write_unit(spec: ServiceSpec, unit_dir: Path) -> Path:
    unit_dir.mkdir(parents=True, exist_ok=True)
    path = unit_dir / UNIT_NAME
    atomic_write(path, render_unit(spec).encode("utf-8"))
    return path
