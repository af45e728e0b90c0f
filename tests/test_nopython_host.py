"""The standalone ``appliance`` on a host with no Python at all (docs/adr/0018).

The host is a Debian root made by ``debootstrap --variant=minbase`` from Debian's own packages:
it has no python3 (asserted: no ``python*`` anywhere on its PATH, and ``command -v`` finds
none), and the test runs everything inside it with ``chroot``, so nothing of this machine's
Python is reachable: the only interpreter in there is the frozen program. The root is made once
and kept as a tar under ``.build/nopython-root/`` (keyed by the suite), so CI pays for the
download once.

Inside the root, the frozen program runs ``trust init`` (with the fingerprint, as an operator
does), ``preflight``, ``verify``, ``install`` of a bundle with a pip environment (set up by the
program's own pip, under the program as the environment's interpreter, then the model health
check), a second install, ``status``, ``rollback``, ``history --check`` and ``keys add``; then
``serve``, and a chat completion is asked with the official ``openai`` client from outside the
root over loopback (a chroot shares the network namespace). Needs root (chroot, mount).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import openai
import pytest
from frozen import Frozen, frozen_program
from pkgfactory import make_wheel
from server_helpers import requires_llama, wait_for, write_model
from simulator import BundleSimulator

from signing.manifest import EnvironmentSpec
from signing.requirements import HostRequirements

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
ROOT_CACHE = Path(__file__).resolve().parent.parent / ".build" / "nopython-root"
INSIDE = "/opt/appliance"  # where the program lies inside the root
STATE = "/var/lib/appliance"
RUNTIME = {"backend": "llama.cpp", "context_size": 256, "threads": 1}
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
}

pytestmark = [
    requires_llama,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="chroot and mount need root (CI runs as root)"),
    pytest.mark.skipif(shutil.which("chroot") is None, reason="chroot is not installed"),
]


def root_tarball() -> Path:
    """The minbase root of ``SUITE`` as a tar, made by debootstrap on first use."""
    tar = ROOT_CACHE / f"{SUITE}-minbase.tar"
    if tar.is_file():
        return tar
    if shutil.which("debootstrap") is None:
        pytest.fail("debootstrap is not installed (apt-get install debootstrap)")
    work = ROOT_CACHE / f"tmp-{SUITE}"
    shutil.rmtree(work, ignore_errors=True)
    ROOT_CACHE.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(
        ["debootstrap", "--variant=minbase", SUITE, str(work), MIRROR],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    partial = tar.with_suffix(".partial")
    subprocess.run(
        ["tar", "--numeric-owner", "-cf", str(partial), "-C", str(work), "."], check=True
    )
    partial.rename(tar)
    shutil.rmtree(work, ignore_errors=True)
    return tar


@pytest.fixture(scope="module")
def program() -> Frozen:
    return frozen_program()


@pytest.fixture
def host_root(program: Frozen) -> Iterator[Path]:
    """The Debian root with the program copied in and /proc mounted; unmounted, then removed.
    Not under pytest's tmp_path: another pytest run's clean-up must never walk into a mounted
    /proc, and hard links to the program need the same file system as .build/."""
    root = ROOT_CACHE / f"run-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    with tarfile.open(root_tarball()) as tar:
        tar.extractall(root, filter="fully_trusted")  # noqa: S202 - our own debootstrap tar
    target = root / INSIDE.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:  # hard links where the file system allows: 300 MB copied in no time
        shutil.copytree(program.folder, target, symlinks=True, copy_function=os.link)
    except OSError:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(program.folder, target, symlinks=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    try:
        yield root
    finally:
        unmounted = subprocess.run(["umount", str(root / "proc")], check=False)
        if unmounted.returncode == 0:
            shutil.rmtree(root, ignore_errors=True)


def inside(root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``args`` inside the root with a clean environment."""
    return subprocess.run(
        ["chroot", str(root), *args],
        capture_output=True,
        text=True,
        check=False,
        env=CHROOT_ENV,
        timeout=timeout,
    )


def appliance(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = inside(root, f"{INSIDE}/appliance", "--root", STATE, *args)
    assert result.returncode == 0, f"appliance {' '.join(args)}:\n{result.stdout}{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def env_bundle(sim: BundleSimulator, work: Path, name: str, version: str, model: bytes) -> bytes:
    """A bundle with a pip environment holding one wheel (``slotmark``) that the health check
    and the server import from the slot (smoke import)."""
    wheel = make_wheel(work / name, "slotmark", "1.0", files={"slotmark/__init__.py": "V = 1\n"})
    data = wheel.read_bytes()
    files = {
        "model/tiny.gguf": model,
        "recipe.toml": f'name = "{name}"\n'.encode(),
        f"env/wheels/{wheel.name}": data,
        "env/requirements.txt": (
            f"slotmark==1.0 --hash=sha256:{hashlib.sha256(data).hexdigest()}\n".encode()
        ),
    }
    spec = EnvironmentSpec(
        type="pip",
        platform="linux_x86_64",
        python="3.11",
        install_list="env/requirements.txt",
        packages="env/wheels",
        smoke_imports=("slotmark",),
    )
    manifest, payload = sim.manifest(
        name=name, version=version, files=files, runtime=RUNTIME, environment=spec
    )
    # What the builder derives for such an environment: its Python, and modest room.
    needs = HostRequirements(memory_bytes=64 << 20, disk_bytes=64 << 20, python="3.11")
    return sim.bundle_bytes(replace(manifest, requires=needs), payload)


def test_the_standalone_program_installs_and_serves_on_a_host_without_python(
    host_root: Path, tmp_path: Path
) -> None:
    root = host_root
    # No Python in the root: none on its PATH, none that a shell finds.
    for folder in ("usr/local/bin", "usr/bin", "bin", "usr/local/sbin", "usr/sbin", "sbin"):
        found = (
            sorted(p.name for p in (root / folder).glob("python*"))
            if (root / folder).is_dir()
            else []
        )
        assert found == [], f"{folder}: {found}"
    probe = inside(root, "sh", "-c", "command -v python3 || command -v python || echo none")
    assert probe.stdout.strip() == "none"

    sim = BundleSimulator()
    work = root / "work"
    work.mkdir()
    (work / "root.json").write_bytes(sim.root_bytes())
    model = write_model(tmp_path / "tiny.gguf", context=256).read_bytes()
    (work / "a.tar").write_bytes(env_bundle(sim, tmp_path, "demo", "1.0.0", model))
    (work / "b.tar").write_bytes(env_bundle(sim, tmp_path, "demo", "1.1.0", model))

    fingerprint = sim.signed_root.fingerprint
    assert (
        fingerprint
        in appliance(root, "trust", "init", "/work/root.json", "--fingerprint", fingerprint).stdout
    )
    pre = appliance(root, "preflight", "/work/a.tar")
    assert "standalone appliance" in pre.stdout + pre.stderr
    assert "OK demo 1.0.0" in appliance(root, "verify", "/work/a.tar").stdout
    appliance(root, "install", "/work/a.tar")
    slot = root / STATE.lstrip("/")
    python = (slot / "current").resolve() / "env" / "bin" / "python"
    assert python.is_symlink()
    assert str((python.parent / python.readlink()).readlink()) == f"{INSIDE}/appliance"
    in_env = inside(
        root,
        str(Path("/") / python.relative_to(root)),
        "-c",
        "import slotmark, sys; print(sys.prefix)",
    )
    assert in_env.returncode == 0, in_env.stderr
    appliance(root, "install", "/work/b.tar")
    status = json.loads(appliance(root, "status", "--json").stdout)
    assert "1.1.0" in json.dumps(status)
    appliance(root, "rollback")
    assert "1.0.0" in appliance(root, "status").stdout
    appliance(root, "history", "--check")
    key = appliance(root, "keys", "add", "tester").stdout.strip().splitlines()[-1]

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        ["chroot", str(root), f"{INSIDE}/appliance", "--root", STATE, "serve", "--port", str(port)],
        env=CHROOT_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)

        def up() -> bool:
            if server.poll() is not None:
                log = server.stderr.read() if server.stderr else ""
                pytest.fail(f"serve exited {server.returncode}: {log}")
            try:
                return [m.id for m in client.models.list().data] == ["demo"]
            except openai.APIConnectionError:
                return False

        wait_for(up, timeout_s=120, what="serve inside the root")
        started = time.monotonic()
        reply = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Hello"}], max_tokens=4
        )
        assert reply.choices[0].message.content is not None
        assert reply.usage is not None and reply.usage.completion_tokens >= 1
        assert time.monotonic() - started < 60
        # The server runs under the slot's environment: the program, as its python.
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[0].decode().endswith("/env/bin/python")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        finally:
            server.kill()
