"""Shared helpers for the CLI-level tests (test_cli, test_builder, test_install, test_crash).

Everything here drives the real console scripts as subprocesses, with real keys, real tar
files and real directories: no mocks. The expensive artefacts (keys, a root, three bundles,
a large bundle, host directories at a few stages) are built once per test session through
:func:`get_world` and copied per test, so the suite stays fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from builder.keyfiles import write_key_pair
from signing.keys import SigningKey

DAY = 86_400
MIB = 1 << 20


def _console_script(name: str) -> str:
    """The console script installed beside the running interpreter (the venv's bin dir)."""
    bindir = Path(sys.executable).parent
    found = shutil.which(name, path=str(bindir)) or shutil.which(name)
    if found is None:  # pragma: no cover - an uninstalled checkout
        pytest.fail(f"console script {name!r} not found next to {sys.executable}; pip install -e .")
    return found


BUILDER = _console_script("appliance-builder")
APPLIANCE = _console_script("appliance")


# -- running the commands ---------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    args: list[str]
    rc: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.stdout)

    def describe(self) -> str:
        return f"$ {' '.join(self.args)}\nrc={self.rc}\nstdout:\n{self.out}\nstderr:\n{self.err}"


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without anything that could steer the commands by accident.

    The bundles of these tests carry random bytes, not models, so installs skip the model
    health check (tests/test_health.py covers it with real models).
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("APPLIANCE_") and k != "SOURCE_DATE_EPOCH"
    }
    env["APPLIANCE_SKIP_HEALTH_CHECK"] = "1"
    env.update(extra)
    return env


def run(
    args: Iterable[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    prefix: Iterable[str] = (),
    timeout: float = 120,
) -> Result:
    argv = [*prefix, *(os.fspath(a) for a in args)]
    proc = subprocess.run(
        argv,
        input=input if input is not None else b"",
        capture_output=True,
        env=dict(env) if env is not None else clean_env(),
        timeout=timeout,
    )
    return Result(argv, proc.returncode, proc.stdout, proc.stderr)


def builder(*args: str | os.PathLike[str], **kwargs: Any) -> Result:
    return run([BUILDER, *args], **kwargs)


def appliance(root: Path, *args: str | os.PathLike[str], **kwargs: Any) -> Result:
    return run([APPLIANCE, "--root", root, *args], **kwargs)


def run_all(*calls: Callable[[], Result]) -> list[Result]:
    """Run independent commands concurrently (each is a process: the cores do the work)."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def ok(result: Result) -> Result:
    assert result.rc == 0, result.describe()
    assert "Traceback" not in result.err, result.describe()
    return result


def assert_error(result: Result, code: int, *fragments: str) -> str:
    """Exit ``code``, exactly one ``error:`` line on stderr naming every fragment, no traceback.

    The error is the last line; progress notes before it (the builder says what it fetches)
    are allowed, other ``error:`` lines are not.
    """
    assert result.rc == code, result.describe()
    assert "Traceback" not in result.err, result.describe()
    lines = result.err.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, f"expected one error line on stderr\n{result.describe()}"
    line = lines[-1]
    assert line == errors[0], result.describe()
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


# -- time -------------------------------------------------------------------------------------


def iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_epoch() -> int:
    return int(time.time())


# -- files ------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under ``root``: files by sha256 and mode, symlinks by target, directories."""
    result: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            result[rel] = "link:" + str(path.readlink())
        elif path.is_dir():
            result[rel] = "dir"
        else:
            mode = oct(path.stat().st_mode & 0o7777)
            result[rel] = f"{mode}:{sha256_file(path)}"
    return result


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def write_recipe(
    directory: Path,
    *,
    version: str,
    model: bytes | None = None,
    name: str = "demo",
    valid_days: int | None = None,
    model_path: str = "model.bin",
    extra: str = "",
) -> Path:
    """A recipe with a plain random-bytes model beside it (model file written if given)."""
    directory.mkdir(parents=True, exist_ok=True)
    if model is not None:
        (directory / model_path).write_bytes(model)
    lines = ["[bundle]", f'name = "{name}"', f'version = "{version}"']
    if valid_days is not None:
        lines.append(f"valid_days = {valid_days}")
    lines += ["", "[model]", f'path = "{model_path}"', "", "[runtime]", 'backend = "llama.cpp"']
    lines.append("context_size = 256")
    recipe = directory / "recipe.toml"
    recipe.write_text("\n".join(lines) + "\n" + extra)
    return recipe


def build(
    recipe: Path, out: Path, keys: Iterable[Path], *, epoch: int, extra: Iterable[str] = ()
) -> Result:
    key_args = [a for k in keys for a in ("--key", str(k))]
    env = clean_env(SOURCE_DATE_EPOCH=str(epoch))
    return ok(builder("build", recipe, *key_args, "-o", out, *extra, env=env))


def new_key(path: Path) -> Path:
    """A fixture key pair written by the library (``keygen`` itself is tested in test_builder;
    this saves a builder start-up per key)."""
    write_key_pair(path, SigningKey.generate(), None)
    return path


def audit_lines(host: Path) -> list[bytes]:
    return (host / "audit.jsonl").read_bytes().splitlines()


def audit_records(host: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in audit_lines(host)]


def current_target(host: Path) -> str:
    return str((host / "current").readlink())


def wait_for(
    predicate: Callable[[], bool], *, timeout: float = 30, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def slot_name(seq: int, version: str, name: str = "demo") -> str:
    return f"{seq:06d}-{name}-{version}"


# -- the shared world -------------------------------------------------------------------------


@dataclass
class World:
    """Keys, a 2-of-2 root and bundles demo 1.0.0/2.0.0/3.0.0, built once per session."""

    dir: Path
    epoch: int  # SOURCE_DATE_EPOCH of every bundle: the manifests' `created`
    root_json: Path = field(init=False)
    big_bundle: Path = field(init=False)  # demo 2.0.0 with a 24 MiB model: catchable mid-stream
    fingerprint: str = field(init=False)
    keys: dict[str, Path] = field(default_factory=dict)
    recipes: dict[str, Path] = field(default_factory=dict)
    bundles: dict[str, Path] = field(default_factory=dict)
    _cache: dict[str, Any] = field(default_factory=dict)

    VERSIONS = ("1.0.0", "2.0.0", "3.0.0")
    MODEL_SIZE = 256 * 1024
    BIG_MODEL_SIZE = 24 * MIB

    def setup(self) -> None:
        keydir = self.dir / "keys"
        keydir.mkdir()
        for name in ("root", "a", "b"):
            self.keys[name] = keydir / f"{name}.pem"
            new_key(self.keys[name])
        self.root_json = self.dir / "root.json"
        jobs: list[Callable[[], Result]] = [
            partial(
                builder, "root", "create", "--root-key", self.keys["root"],
                "--bundle-key", f"{self.keys['a']}.pub", "--bundle-key", f"{self.keys['b']}.pub",
                "--threshold", "2", "--expires", iso(now_epoch() + 10 * 365 * DAY),
                "-o", self.root_json,
            )
        ]  # fmt: skip
        for i, version in enumerate(self.VERSIONS, start=1):
            recipe = write_recipe(
                self.dir / f"src-{version}", version=version,
                model=random_bytes(self.MODEL_SIZE, seed=i),
            )  # fmt: skip
            self.recipes[version] = recipe
            self.bundles[version] = self.dir / f"demo-{version}.tar"
            jobs.append(partial(build, recipe, self.bundles[version], self.signers,
                                epoch=self.epoch))  # fmt: skip
        big = write_recipe(
            self.dir / "src-big", version="2.0.0",
            model=random_bytes(self.BIG_MODEL_SIZE, seed=99),
        )  # fmt: skip
        self.big_bundle = self.dir / "demo-2.0.0-big.tar"
        jobs.append(partial(build, big, self.big_bundle, self.signers, epoch=self.epoch))
        created = ok(run_all(*jobs)[0])
        self.fingerprint = created.out.split("fingerprint ")[1].split()[0]

    @property
    def signers(self) -> list[Path]:
        return [self.keys["a"], self.keys["b"]]

    def source_file(self, version: str, entry: str) -> Path:
        """The source of a payload entry of bundle ``version`` (``model/model.bin``...)."""
        if entry == "sbom.cdx.json":  # the builder makes it: its source is the bundle itself
            out = self.dir / f"sbom-{version}.cdx.json"
            if not out.exists():
                with tarfile.open(self.bundles[version]) as tar:
                    member = tar.extractfile(f"payload/{entry}")
                    assert member is not None
                    out.write_bytes(member.read())
            return out
        src = self.recipes[version].parent
        return src / ("recipe.toml" if entry == "recipe.toml" else entry.removeprefix("model/"))

    def rotation(self) -> dict[str, Path]:
        """Root v2 with a new root key: ``unsigned_by_old`` (new key only) and ``v2`` (both)."""
        if "rotation" not in self._cache:
            new = new_key(self.dir / "keys" / "root-new.pem")
            only_new = self.dir / "root-v2-new-only.json"
            ok(
                builder(
                    "root", "create", "--previous", self.root_json, "--root-key", new,
                    "--bundle-key", f"{self.keys['a']}.pub",
                    "--bundle-key", f"{self.keys['b']}.pub",
                    "--threshold", "2", "--expires", iso(now_epoch() + 10 * 365 * DAY),
                    "-o", only_new,
                )
            )  # fmt: skip
            both = self.dir / "root-v2.json"
            shutil.copyfile(only_new, both)
            ok(builder("root", "sign", both, "--key", self.keys["root"]))
            self._cache["rotation"] = {"new_key": new, "unsigned_by_old": only_new, "v2": both}
        return self._cache["rotation"]  # type: ignore[no-any-return]

    def host_template(self, stage: str) -> Path:
        """A host directory at ``stage``: ``trusted`` (trust init only) or ``v1`` (+ 1.0.0)."""
        key = f"host-{stage}"
        if key not in self._cache:
            host = self.dir / key
            if stage == "trusted":
                fp = self.fingerprint
                ok(appliance(host, "trust", "init", self.root_json, "--fingerprint", fp))
            elif stage == "v1":
                self.new_host(host, "trusted")
                ok(appliance(host, "install", self.bundles["1.0.0"]))
            else:  # pragma: no cover
                raise ValueError(stage)
            self._cache[key] = host
        return self._cache[key]  # type: ignore[no-any-return]

    def new_host(self, dest: Path, stage: str = "trusted") -> Path:
        """A private copy of a host template (symlinks kept as symlinks)."""
        shutil.copytree(self.host_template(stage), dest, symlinks=True)
        return dest


_WORLD: dict[str, World] = {}


def get_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """The session's world, built on first use and shared by every test module."""
    if "world" not in _WORLD:
        # Ten days ago, so bundles are valid now and their `created` is a real time floor.
        world = World(dir=tmp_path_factory.mktemp("world"), epoch=now_epoch() - 10 * DAY)
        world.setup()
        _WORLD["world"] = world
    return _WORLD["world"]
