"""``appliance serve`` on a host with no network at all (DESIGN invariant 7).

The whole exchange runs inside a fresh network namespace (``unshare -n``) that has nothing but
a loopback interface: a signed bundle with a real GGUF is installed beforehand, then a script in
the namespace starts ``python -m appliance serve``, talks to it with the openai client, installs
a second bundle and sees the server follow the switch of ``current``, and lists every socket of
the namespace. A server that needed the network (a CDN, a model hub, a DNS lookup) would fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from server_helpers import requires_llama, write_model
from simulator import Host

from appliance.apikeys import KeyStore, key_file

pytestmark = requires_llama

SCRIPT = r"""
import json, os, signal, socket, subprocess, sys, time
import urllib.request

import openai

root, bundle, key = sys.argv[1:4]
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
url = f"http://127.0.0.1:{port}"
server = subprocess.Popen(
    [sys.executable, "-m", "appliance", "--root", root, "serve", "--port", str(port),
     "--max-concurrency", "1"],
    stderr=subprocess.PIPE, text=True,
)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
deadline = time.monotonic() + 30
while True:
    try:
        if opener.open(url + "/healthz", timeout=1).status == 200:
            break
    except OSError:
        if server.poll() is not None or time.monotonic() > deadline:
            print(json.dumps({"error": "server did not start", "stderr": server.stderr.read()}))
            sys.exit(1)
        time.sleep(0.1)

client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)
out = {}
first = client.chat.completions.create(
    model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
)
out["first_model"] = first.model
out["first_tokens"] = first.usage.completion_tokens
installed = subprocess.run(
    [sys.executable, "-m", "appliance", "--root", root, "install", bundle],
    capture_output=True, text=True,
)
out["install_rc"] = installed.returncode
out["install_err"] = installed.stderr
deadline = time.monotonic() + 20
while [m.id for m in client.models.list().data] != ["other"] and time.monotonic() < deadline:
    time.sleep(0.2)
out["models_after_switch"] = [m.id for m in client.models.list().data]
second = client.chat.completions.create(
    model="other", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
)
out["second_model"] = second.model
try:
    client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}])
    out["old_model_status"] = 200
except openai.APIStatusError as exc:
    out["old_model_status"] = exc.status_code

sockets = []
for proto in ("tcp", "tcp6", "udp", "udp6"):
    with open(f"/proc/net/{proto}") as table:
        for line in list(table)[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            sockets.append([proto, local, remote, int(local.split(":")[1], 16),
                            int(remote.split(":")[1], 16)])
out["port"] = port
out["sockets"] = sockets
server.send_signal(signal.SIGTERM)
out["server_rc"] = server.wait(timeout=30)
out["server_stderr"] = server.stderr.read()
print(json.dumps(out))
"""


def _unshare_works() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, check=False
    )
    return probe.returncode == 0


def _bundle_files(model: bytes) -> dict[str, bytes]:
    return {
        "model/tiny.gguf": model,
        "recipe.toml": b'name = "demo"\nversion = "1.0.0"\n\n[runtime]\nbackend = "llama.cpp"\n',
    }


def test_serve_with_no_network_at_all(tmp_path: Path, host: Host) -> None:
    if not _unshare_works():
        pytest.skip("'unshare -n' is not permitted here: cannot build a network-free namespace")
    model = write_model(tmp_path / "tiny.gguf", context=512).read_bytes()
    runtime = {"backend": "llama.cpp", "context_size": 512}
    host.install(host.sim.bundle("1.0.0", files=_bundle_files(model), runtime=runtime))
    second = host.write(
        host.sim.bundle("1.0.0", name="other", files=_bundle_files(model), runtime=runtime)
    )
    key = KeyStore(key_file(host.root)).add("offline")
    script = tmp_path / "inside.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    result = subprocess.run(
        [
            "unshare",
            "-n",
            "sh",
            "-c",
            'ip link set lo up && exec "$0" "$@"',
            sys.executable,
            str(script),
            str(host.root),
            str(second),
            key,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["first_model"] == "demo"
    assert out["first_tokens"] > 0
    assert out["install_rc"] == 0, out["install_err"]
    assert out["models_after_switch"] == ["other"]
    assert out["second_model"] == "other"
    assert out["old_model_status"] == 404
    port = out["port"]
    strays = [s for s in out["sockets"] if port not in (s[3], s[4])]
    assert strays == [], f"sockets other than the server's own: {strays}"
    assert out["server_rc"] == 0, out["server_stderr"]
