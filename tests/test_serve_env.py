"""``appliance serve`` runs the backend under the active slot's environment, and moves to the
next slot's interpreter when ``current`` switches to a slot that needs another one.

A real server process, real slots with pip environments set up by the real installer (with the
model health check), the real tiny GGUF and llama.cpp; which interpreter serves is read from
``/proc/<pid>/cmdline`` and from a module that only the slot's environment has.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from pkgfactory import make_wheel
from server_helpers import requires_llama, wait_for, write_model
from simulator import Host

from appliance.apikeys import KeyStore, key_file
from appliance.installer import InstallOptions
from signing.manifest import EnvironmentSpec

pytestmark = requires_llama

RUNTIME = {"backend": "llama.cpp", "context_size": 256}
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


def env_bundle(host: Host, name: str, model: bytes, marker: str | None) -> bytes:
    """A bundle named ``name``; with ``marker``, a pip environment holding a wheel ``slotmark``
    whose VALUE is ``marker``."""
    files = {"model/tiny.gguf": model, "recipe.toml": f'name = "{name}"\n'.encode()}
    if marker is None:
        manifest, payload = host.sim.manifest(name=name, files=files, runtime=RUNTIME)
        return host.sim.bundle_bytes(manifest, payload)
    wheel = make_wheel(
        host.bundles / marker,
        "slotmark",
        "1.0",
        files={"slotmark/__init__.py": f"VALUE = {marker!r}\n"},
    )
    data = wheel.read_bytes()
    files[f"env/wheels/{wheel.name}"] = data
    files["env/requirements.txt"] = (
        f"slotmark==1.0 --hash=sha256:{hashlib.sha256(data).hexdigest()}\n".encode()
    )
    spec = EnvironmentSpec(
        type="pip",
        platform="linux_x86_64",
        python=PY,
        install_list="env/requirements.txt",
        packages="env/wheels",
        smoke_imports=("slotmark",),
    )
    manifest, payload = host.sim.manifest(name=name, files=files, runtime=RUNTIME, environment=spec)
    return host.sim.bundle_bytes(manifest, payload)


def cmdline(server: subprocess.Popen[str]) -> list[str]:
    if server.poll() is not None:
        log = server.stderr.read() if server.stderr else ""
        pytest.fail(f"serve exited with status {server.returncode}:\n{log}")
    # Empty for an instant while the process is in execve: the callers' waits try again.
    return Path(f"/proc/{server.pid}/cmdline").read_bytes().decode().split("\0")[:-1] or [""]


def served(url: str, key: str) -> list[str]:
    """The model ids ``/v1/models`` lists; none while the server is (re)starting."""
    request = urllib.request.Request(  # noqa: S310 - loopback
        f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=5) as response:
            return [m["id"] for m in json.loads(response.read())["data"]]
    except OSError:
        return []


def test_serve_runs_under_the_slot_environment_and_follows_it(tmp_path: Path, host: Host) -> None:
    model = write_model(tmp_path / "tiny.gguf", context=256).read_bytes()
    first = host.install(env_bundle(host, "demo", model, "one"), InstallOptions())
    key = KeyStore(key_file(host.root)).add("test")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "appliance", "--root", host.root, "serve", "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: served(url, key) == ["demo"], timeout_s=60, what="the server to start")
        assert cmdline(server)[0] == f"{first.path}/env/bin/python"
        # The serving interpreter has the slot's own package; the appliance's does not.
        in_slot = subprocess.run(
            [cmdline(server)[0], "-c", "import slotmark; print(slotmark.VALUE)"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert in_slot.stdout == "one\n"
        host_has_it = subprocess.run(
            [sys.executable, "-c", "import slotmark"], capture_output=True, check=False
        )
        assert host_has_it.returncode != 0
        # Switch to a slot with another environment: serve drains and re-executes into it.
        second = host.install(env_bundle(host, "other", model, "two"), InstallOptions())
        wait_for(
            lambda: cmdline(server)[0] == f"{second.path}/env/bin/python",
            timeout_s=60,
            what="serve to re-execute under the new slot's interpreter",
        )
        wait_for(lambda: served(url, key) == ["other"], timeout_s=60, what="the new model")
        assert host.last_audit()["event"] == "confirm"  # the new process confirmed the slot
        # A slot without an environment is served by the appliance's own interpreter again.
        host.install(env_bundle(host, "third", model, None), InstallOptions())
        wait_for(
            lambda: cmdline(server)[0] == sys.executable,
            timeout_s=60,
            what="serve to go back to the appliance's interpreter",
        )
        wait_for(lambda: served(url, key) == ["third"], timeout_s=60, what="the third model")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            rc = server.wait(timeout=30)
        finally:
            server.kill()
        log = server.stderr.read() if server.stderr else ""
    assert rc == 0, log
    assert "re-executing under" in log
