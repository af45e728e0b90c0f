"""Health-checked activation (step I7) and the trial period after it, with real models.

A bundle whose model llama.cpp cannot load is refused before the switch; one that passes is
on trial until ``serve`` confirms it, and an ``auto_rollback`` inside the grace period brings
the previous slot back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.installer import Appliance, InstallOptions
from builder.build import build_bundle
from builder.tinymodel import write_tiny_llama
from signing.errors import ModelError
from signing.keys import SigningKey
from signing.metadata import BUNDLE_ROLE, ROOT_ROLE, Role, Root, sign_root
from tests.simulator import snapshot_host

pytest.importorskip("llama_cpp", reason="health checks load models with llama-cpp-python")

RECIPE = """[bundle]
name = "demo"
version = "{version}"
[model]
path = "{model}"
[runtime]
backend = "llama.cpp"
context_size = 128
"""


class World:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.key = SigningKey.generate()
        root = Root(
            version=1,
            expires=_in_days(365),
            keys={self.key.keyid: self.key.public_key},
            roles={
                ROOT_ROLE: Role(keyids=(self.key.keyid,), threshold=1),
                BUNDLE_ROLE: Role(keyids=(self.key.keyid,), threshold=1),
            },
        )
        self.root_bytes = sign_root(root, [self.key]).to_bytes()
        self.good_model = base / "tiny.gguf"
        write_tiny_llama(self.good_model)
        self.bad_model = base / "broken.gguf"
        self.bad_model.write_bytes(b"GGUF" + b"\x00" * 4096)  # a GGUF magic, then nonsense

    def bundle(self, version: str, model: Path) -> Path:
        directory = self.base / f"recipe-{version}"
        directory.mkdir(exist_ok=True)
        shutil.copy(model, directory / model.name)
        recipe = directory / "recipe.toml"
        recipe.write_text(RECIPE.format(version=version, model=model.name))
        out = self.base / f"demo-{version}.tar"
        build_bundle(recipe, out, [self.key])
        return out

    def host(self, path: Path) -> Appliance:
        app = Appliance(path)
        app.trust_init(self.root_bytes, fingerprint=None)
        return app


def _in_days(days: int) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) + timedelta(days=days)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("health"))


def _state(app: Appliance) -> dict[str, object]:
    return json.loads(app.paths.state.read_bytes())  # type: ignore[no-any-return]


def test_a_model_that_runs_is_activated_on_trial(world: World, tmp_path: Path) -> None:
    app = world.host(tmp_path / "host")
    slot = app.install(str(world.bundle("1.0.0", world.good_model)), InstallOptions())
    assert app.slots.current() == slot
    record = list(app.audit.records())[-1]
    assert (record["event"], record["outcome"], record["health_check"]) == ("install", "ok", "ok")
    trial = _state(app)["trial"]
    assert isinstance(trial, dict)
    assert (trial["slot"], trial["previous"]) == (slot.id, None)
    # serve confirms the slot once its model is loaded: the trial ends, and it is logged.
    assert app.confirm(slot.id) is True
    assert _state(app)["trial"] is None
    assert app.confirm(slot.id) is False
    assert list(app.audit.records())[-1]["event"] == "confirm"


def test_a_model_that_does_not_load_is_refused_and_nothing_changes(
    world: World, tmp_path: Path
) -> None:
    app = world.host(tmp_path / "host")
    app.install(str(world.bundle("1.0.0", world.good_model)), InstallOptions())
    before = snapshot_host(app.paths.root)
    with pytest.raises(ModelError, match="health check failed"):
        app.install(str(world.bundle("2.0.0", world.bad_model)), InstallOptions())
    assert snapshot_host(app.paths.root) == before
    assert not any(app.paths.staging.iterdir())
    record = list(app.audit.records())[-1]
    assert (record["event"], record["outcome"], record["health_check"]) == (
        "install",
        "refused",
        "failed",
    )
    assert record["version"] == "2.0.0"


def test_skip_health_check_activates_and_is_logged(world: World, tmp_path: Path) -> None:
    app = world.host(tmp_path / "host")
    slot = app.install(
        str(world.bundle("2.0.0", world.bad_model)), InstallOptions(skip_health_check=True)
    )
    assert app.slots.current() == slot
    record = list(app.audit.records())[-1]
    assert record["skip_health_check"] is True
    assert "health_check" not in record


def test_auto_rollback_within_the_grace_period(world: World, tmp_path: Path) -> None:
    app = world.host(tmp_path / "host")
    good = app.install(str(world.bundle("1.0.0", world.good_model)), InstallOptions())
    app.confirm(good.id)
    bad = app.install(
        str(world.bundle("2.0.0", world.bad_model)), InstallOptions(skip_health_check=True)
    )
    restored = app.auto_rollback(bad.id, reason="llama.cpp cannot load the model")
    assert restored is not None
    assert restored.id == good.id
    assert app.slots.current() == good
    record = list(app.audit.records())[-1]
    assert (record["event"], record["automatic"], record["slot_from"], record["slot"]) == (
        "rollback",
        True,
        bad.id,
        good.id,
    )
    assert _state(app)["trial"] is None
    # A second report for the same slot changes nothing: it is no longer on trial.
    assert app.auto_rollback(bad.id, reason="again") is None
    assert app.slots.current() == good


def test_no_auto_rollback_after_the_grace_period(world: World, tmp_path: Path) -> None:
    app = world.host(tmp_path / "host")
    app.install(str(world.bundle("1.0.0", world.good_model)), InstallOptions())
    bad = app.install(
        str(world.bundle("2.0.0", world.bad_model)),
        InstallOptions(skip_health_check=True, grace_period_s=0),
    )
    assert app.auto_rollback(bad.id, reason="late") is None
    assert app.slots.current() == bad


def test_health_check_from_the_cli_exit_code_7(world: World, tmp_path: Path) -> None:
    app = world.host(tmp_path / "host")
    bundle = world.bundle("3.0.0", world.bad_model)
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "--root", str(app.paths.root), "install", str(bundle)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 7, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: health check failed")
