"""``appliance-builder freeze``: the standalone program, reproducible, with what analysis misses.

The program is frozen once per set of inputs (tests/frozen.py) and a second time here from the
same inputs: the two tars must be the same bytes, and the sha256 that freeze prints must be
the tar's. The frozen program is then run as itself and as the interpreter of slot
environments (docs/adr/0018), to show that the hooks brought what PyInstaller's analysis
cannot see: llama-cpp-python's ctypes-loaded libraries and its llama-server, cryptography's
Rust bindings, pydantic-core, and uvicorn's modules imported by name.
"""

from __future__ import annotations

import hashlib
import importlib
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from frozen import Frozen, frozen_program, inputs_key, run_freeze
from helpers_cli import assert_error, builder, clean_env
from server_helpers import requires_llama
from simulator import BundleSimulator

from signing.requirements import HostRequirements

pytestmark = [requires_llama, pytest.mark.slow]

COMMANDS = (
    "trust", "verify", "install", "status", "rollback", "history", "preflight", "keys",
    "serve", "service",
)  # fmt: skip


@pytest.fixture(scope="module")
def program() -> Frozen:
    return frozen_program()


def file_digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=False, timeout=300
    )


def test_two_freezes_give_the_same_bytes(program: Frozen, tmp_path: Path) -> None:
    assert hashlib.sha256(program.tar.read_bytes()).hexdigest() == program.sha256
    again = run_freeze(tmp_path / "again")
    if inputs_key() != program.key:  # a working tree edited meanwhile (never on CI)
        pytest.skip("the freeze's inputs changed during the test: nothing to compare")
    if again.sha256 != program.sha256:
        ours, theirs = file_digests(program.folder), file_digests(again.folder)
        differ = sorted(
            name for name in ours.keys() | theirs.keys() if ours.get(name) != theirs.get(name)
        )
        pytest.fail(f"two freezes differ in {len(differ)} file(s): {differ[:10]}")
    assert again.tar.read_bytes() == program.tar.read_bytes()
    # What to hand over out of band is printed with it.
    for words in ("size", "root fingerprint", f"sha256sum {program.tar.name}"):
        assert words in again.output
    # The tar holds the folder, and nothing else.
    listed = run("tar", "-tf", again.tar).stdout.splitlines()
    assert "appliance/appliance" in listed
    assert all(name.startswith("appliance") for name in listed)


def test_the_program_has_every_offline_command(program: Frozen) -> None:
    version = run(program.program, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("appliance, version ")
    shown = run(program.program, "--help").stdout
    for command in COMMANDS:
        assert f"  {command} " in shown, command


def uvicorn_modules() -> list[str]:
    """The modules uvicorn imports by name from its config tables, that this venv has."""
    from uvicorn import config

    tables = (config.LOOP_FACTORIES, config.HTTP_PROTOCOLS, config.WS_PROTOCOLS, config.LIFESPAN)
    found = []
    for table in tables:
        for target in table.values():
            if not target:
                continue
            name = target.split(":")[0]
            try:
                importlib.import_module(name)
            except ImportError:
                continue
            found.append(name)
    assert "uvicorn.protocols.http.h11_impl" in found
    return found


def test_hooks_bring_what_analysis_cannot_see(program: Frozen) -> None:
    script = """
import importlib, subprocess, sys
# cryptography's Rust bindings: sign and verify with the project's own key type
from signing.keys import SigningKey
key = SigningKey.generate()
sig = key.sign(b"x")
key.public_key.verify(sig, b"x")
# pydantic-core: a model validates
from signing.manifest import EnvironmentSpec
EnvironmentSpec(type="pip", platform="linux_x86_64", python="3.11",
                install_list="a", packages="b")
# uvicorn's modules imported by name from its config strings (those this venv can import)
for name in sys.argv[1:]:
    importlib.import_module(name)
# llama-cpp-python: libllama through ctypes, and the engine beside it
import llama_cpp
assert llama_cpp.llama_cpp._lib is not None
from appliance.runtime.llamaengine import find_server
binary = find_server()
assert binary.runtime is not None and binary.runtime.variants
out = subprocess.run([str(binary.server), "--version"], capture_output=True, text=True,
                     env={"LD_LIBRARY_PATH": str(binary.lib)})
assert out.returncode == 0, out.stderr
print("hooks ok")
"""
    result = run(program.program, "-c", script, *uvicorn_modules())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hooks ok"


def test_the_program_is_an_environment_interpreter(program: Frozen, tmp_path: Path) -> None:
    venv = tmp_path / "env"
    made = run(program.program, "-m", "venv", "--without-pip", venv)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = venv / "lib" / "python3.11" / "site-packages"
    (site / "onlyhere.py").write_text("VALUE = 7\n")
    shown = run(python, "-c", "import sys, onlyhere; print(sys.prefix, onlyhere.VALUE)")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.split() == [str(venv), "7"]
    # pip runs from the program's own copy; it sees the env's packages only.
    runner = program.folder / "_internal" / "pip" / "__pip-runner__.py"
    checked = run(python, runner, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # A program that is not the interpreter: the command line, and options it does not know.
    refused = run(python, "-Z", "-c", "pass")
    assert refused.returncode == 2
    assert refused.stderr.strip() == "appliance (as python): unsupported option -Z"


def test_the_builder_refuses_a_recipe_the_standalone_program_cannot_run(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"weights")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        '[bundle]\nname = "demo"\nversion = "1.0.0"\n\n[model]\npath = "model.bin"\n\n'
        '[runtime]\nbackend = "llama.cpp"\n\n[requires]\nstandalone = true\n\n'
        '[environment]\ntype = "pip"\nplatform = "manylinux_2_28_x86_64"\npython = "3.12"\n'
        'requirements = ["alpha==1.0"]\n'
    )
    result = builder("lock", recipe, env=clean_env())
    assert_error(result, 2, "standalone", "3.12", "3.11")


def test_the_preflight_says_why_a_bundle_for_another_python_cannot_run(
    program: Frozen, tmp_path: Path
) -> None:
    sim = BundleSimulator()
    manifest, payload = sim.manifest()
    needs = HostRequirements(memory_bytes=1 << 20, disk_bytes=1 << 20, python="3.12")
    bundle = tmp_path / "b.tar"
    bundle.write_bytes(sim.bundle_bytes(replace(manifest, requires=needs), payload))
    root_json = tmp_path / "root.json"
    root_json.write_bytes(sim.root_bytes())
    host = tmp_path / "host"
    fingerprint = sim.signed_root.fingerprint
    trusted = run(
        program.program, "--root", host, "trust", "init", root_json, "--fingerprint", fingerprint
    )
    assert trusted.returncode == 0, trusted.stderr
    result = run(program.program, "--root", host, "preflight", bundle)
    assert result.returncode == 11, result.stdout + result.stderr
    shown = result.stdout + result.stderr
    assert "standalone appliance's own" in shown
    assert "requires.standalone = true" in shown
    assert "Traceback" not in shown


def test_the_freeze_lock_pins_what_pyproject_names() -> None:
    import tomllib

    from builder.freeze import LOCK, pinned_freeze_tools

    pyproject = tomllib.loads((LOCK.parent.parent / "pyproject.toml").read_text())
    named = dict(
        line.split("==") for line in pyproject["project"]["optional-dependencies"]["freeze"]
    )
    pins = pinned_freeze_tools()
    assert {name: pins[name] for name in named} == named
    assert LOCK.read_text().count("--hash=sha256:") >= len(pins)
