"""``serve`` follows the active slot: swap on install, confirm a trial, roll back a bad model.

Real host directories (installed through the real ``Appliance``), real GGUF files loaded by the
real llama.cpp backend; :class:`SlotFollower` is driven by calling ``check()`` instead of
waiting for its polling thread.
"""

from __future__ import annotations

import pytest
from server_helpers import requires_llama, wait_for, write_model
from simulator import Host

from appliance.host import HostState
from appliance.installer import InstallOptions
from appliance.server.holder import ModelHolder
from appliance.server.serve import SlotFollower
from signing.errors import ModelError, StateError

pytestmark = requires_llama

RUNTIME = {"backend": "llama.cpp", "context_size": 256}
NO_HEALTH_CHECK = InstallOptions(skip_health_check=True)  # serve's own check is under test


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_model(tmp_path_factory.mktemp("follow") / "tiny.gguf", context=256).read_bytes()


def install(host: Host, name: str, version: str, model: bytes) -> str:
    files = {"model/tiny.gguf": model, "recipe.toml": f'name = "{name}"\n'.encode()}
    bundle = host.sim.bundle(version, name=name, files=files, runtime=RUNTIME)
    return host.install(bundle, NO_HEALTH_CHECK).id


def on_trial(host: Host) -> str | None:
    trial = HostState.load(host.root / "state.json").trial
    return trial.slot if trial is not None else None


def test_follows_installs_and_confirms_the_trial(host: Host, model: bytes) -> None:
    first = install(host, "demo", "1.0.0", model)
    assert on_trial(host) == first
    holder = ModelHolder()
    follower = SlotFollower(host.root, holder, parallel=1)
    follower.load_active()
    backend = holder.get()
    assert backend is not None
    assert backend.model_id == "demo"
    assert on_trial(host) is None  # the model loaded: the trial is over
    assert follower.check() is False  # nothing moved

    second = install(host, "other", "1.0.0", model)
    assert on_trial(host) == second
    assert follower.check() is True
    swapped = holder.get()
    assert swapped is not None
    assert swapped.model_id == "other"
    assert on_trial(host) is None
    holder.close()


def test_a_model_that_does_not_load_is_rolled_back_within_its_trial(
    host: Host, model: bytes
) -> None:
    good = install(host, "demo", "1.0.0", model)
    holder = ModelHolder()
    follower = SlotFollower(host.root, holder, parallel=1)
    follower.load_active()
    bad = install(host, "demo", "1.1.0", b"GGUF\x03\x00\x00\x00 not a model at all")
    switched = host.appliance.slots.current()
    assert switched is not None
    assert switched.id == bad
    assert follower.check() is False  # nothing new to serve: back on the slot already served
    current = host.appliance.slots.current()
    assert current is not None
    assert current.id == good
    served = holder.get()
    assert served is not None
    assert served.model_id == "demo"
    last = host.last_audit()
    assert last["event"] == "rollback"
    assert last["automatic"] is True
    assert last["slot_from"] == bad
    holder.close()


def test_out_of_trial_a_bad_model_is_reported_and_the_old_one_serves(
    host: Host, model: bytes
) -> None:
    install(host, "demo", "1.0.0", model)
    holder = ModelHolder()
    follower = SlotFollower(host.root, holder, parallel=1)
    follower.load_active()
    no_trial = InstallOptions(skip_health_check=True, grace_period_s=0)
    files = {"model/tiny.gguf": b"GGUF\x03\x00\x00\x00 broken", "recipe.toml": b"x"}
    bad = host.install(host.sim.bundle("1.1.0", files=files, runtime=RUNTIME), no_trial).id
    assert follower.check() is False
    current = host.appliance.slots.current()
    assert current is not None
    assert current.id == bad  # nothing switched behind the operator's back
    served = holder.get()
    assert served is not None
    assert served.model_id == "demo"
    holder.close()


def test_serve_cannot_start_on_an_empty_host(host: Host) -> None:
    follower = SlotFollower(host.root, ModelHolder(), parallel=1)
    with pytest.raises(StateError, match="no active slot"):
        follower.load_active()


def test_serve_cannot_start_on_a_model_that_does_not_load_out_of_trial(host: Host) -> None:
    files = {"model/tiny.gguf": b"GGUF\x03\x00\x00\x00 broken", "recipe.toml": b"x"}
    no_trial = InstallOptions(skip_health_check=True, grace_period_s=0)
    host.install(host.sim.bundle("1.0.0", files=files, runtime=RUNTIME), no_trial)
    follower = SlotFollower(host.root, ModelHolder(), parallel=1)
    with pytest.raises(ModelError):
        follower.load_active()


def test_the_polling_thread_follows_by_itself(host: Host, model: bytes) -> None:
    install(host, "demo", "1.0.0", model)
    holder = ModelHolder()
    follower = SlotFollower(host.root, holder, parallel=1, interval_s=0.05)
    follower.load_active()
    follower.start()
    try:
        install(host, "other", "1.0.0", model)
        wait_for(lambda: getattr(holder.get(), "model_id", None) == "other", what="the swap")
    finally:
        follower.stop()
        holder.close()
