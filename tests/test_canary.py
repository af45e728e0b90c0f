"""The canary between slots: CLI commands, routing, restart, automatic abort, promote.

Real components throughout: a host with two installed slots (the real ``Appliance``) of a tiny
GGUF (builder.tinymodel), the real ``appliance canary`` command line, the real llama.cpp engine
(``llama-server`` children) for both slots, a real server on loopback, and a real fault (the
canary's engine killed with SIGKILL). The followers are driven by calling ``check()`` instead
of waiting for their polling threads.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers_cli import Result, appliance
from server_helpers import (
    TEST_KEY_NAME,
    LiveServer,
    live_server,
    load_model,
    requires_llama,
    write_model,
)
from simulator import Host

from appliance.apikeys import KeyStore, key_file
from appliance.canary import CANARY_FILE, CanaryState, Thresholds, bucket
from appliance.evalgate import EVAL_POLICY, EVAL_SET
from appliance.evalset import EvalPolicy
from appliance.installer import InstallOptions
from appliance.runtime.base import SamplingParams
from appliance.server.canary import CanaryFollower, CanaryRoute
from appliance.server.holder import ModelHolder
from appliance.server.serve import SlotFollower
from builder.tinymodel import write_tiny_llama
from signing.errors import HostUnfitError, InputError, StateError
from signing.requirements import HostRequirements

RUNTIME = {"backend": "llama.cpp", "context_size": 256}
NO_HEALTH_CHECK = InstallOptions(skip_health_check=True)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, seed=0)  # as the evaluation gate asks
DEFAULTS = Thresholds(max_error_rate=0.05, min_requests=20, max_eval_mismatch=0.05)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_model(tmp_path_factory.mktemp("canary") / "tiny.gguf", context=256).read_bytes()


def install(host: Host, version: str, model: bytes, **manifest: Any) -> str:
    files = {"model/tiny.gguf": model, "recipe.toml": b'name = "demo"\n'}
    made, payload = host.sim.manifest(version=version, files=files, runtime=RUNTIME)
    if manifest:
        made = replace(made, **manifest)
    options = replace(NO_HEALTH_CHECK, skip_preflight=bool(manifest))
    return host.appliance.install(str(host.write(host.sim.bundle_bytes(made, payload))), options).id


def write_tiny_llama_bytes(path: Path, *, seed: int) -> bytes:
    write_tiny_llama(path, context=256, seed=seed)
    return path.read_bytes()


@pytest.fixture
def two_slots(host: Host, model: bytes) -> tuple[Host, str, str]:
    """``demo 1.1.0`` installed, then ``demo 1.0.0`` active again: (host, active, other)."""
    install(host, "1.0.0", model)
    newer = install(host, "1.1.0", model)
    _, back = host.appliance.rollback()
    return host, back.id, newer


def audit(host: Host, event: str) -> list[dict[str, Any]]:
    return [r for r in host.appliance.audit.records() if r["event"] == event]


def cli(host: Host, *args: str) -> Result:
    return appliance(host.root, "canary", *args)


# -- the commands -----------------------------------------------------------------------------


def test_start_status_abort_are_audited_and_bad_starts_refused(
    two_slots: tuple[Host, str, str],
) -> None:
    host, active, other = two_slots
    KeyStore(key_file(host.root)).add("alice")
    refused = cli(host, "start", "1.1.0", "--keys", "nobody")
    assert refused.rc == InputError.exit_code, refused.describe()
    assert "no API key called 'nobody'" in refused.err
    refused = cli(host, "start", "1.0.0", "--percent", "10")
    assert refused.rc == StateError.exit_code, refused.describe()
    assert "is the active slot already" in refused.err
    neither = cli(host, "start", "1.1.0")
    assert neither.rc == InputError.exit_code
    assert not (host.root / CANARY_FILE).exists()  # nothing refused was written

    started = cli(host, "start", "1.1.0", "--keys", "alice", "--max-error-rate", "0.2")
    assert started.rc == 0, started.describe()
    assert f"slot {other}" in started.out
    status = json.loads(cli(host, "status", "--json").out)
    assert status["canary"]["slot"] == other
    assert status["canary"]["keys"] == ["alice"]
    assert status["canary"]["thresholds"]["max_error_rate"] == "0.2"
    assert status["active"] == active
    record = audit(host, "canary-start")[-1]
    assert (record["outcome"], record["slot"], record["keys"]) == ("ok", other, ["alice"])
    # Bad arguments are refused before the host is touched; a bad target, under the lock.
    assert [r["outcome"] for r in audit(host, "canary-start")] == ["failed", "ok"]

    aborted = cli(host, "abort")
    assert aborted.rc == 0, aborted.describe()
    assert not (host.root / CANARY_FILE).exists()
    assert audit(host, "canary-abort")[-1]["automatic"] is False
    again = cli(host, "abort")
    assert again.rc == StateError.exit_code
    assert "no canary to abort" in again.err
    assert appliance(host.root, "history", "--check").rc == 0


def test_an_install_keeps_the_canary_slot(two_slots: tuple[Host, str, str], model: bytes) -> None:
    """``install --keep 1`` removes every inactive slot, but never the canary's."""
    host, active, other = two_slots
    assert cli(host, "start", "1.1.0", "--percent", "10").rc == 0
    options = replace(NO_HEALTH_CHECK, keep=1)
    files = {"model/tiny.gguf": model, "recipe.toml": b'name = "demo"\n'}
    made, payload = host.sim.manifest(version="1.2.0", files=files, runtime=RUNTIME)
    newest = host.appliance.install(str(host.write(host.sim.bundle_bytes(made, payload))), options)
    remaining = {s.id for s in host.appliance.slots.list()}
    assert remaining == {newest.id, other}, remaining
    assert active not in remaining


def test_start_refuses_when_both_do_not_fit_in_memory(host: Host, model: bytes) -> None:
    install(host, "1.0.0", model)
    huge = HostRequirements(memory_bytes=1 << 50, disk_bytes=1)  # 1 PiB of RAM
    install(host, "1.1.0", model, requires=huge)
    host.appliance.rollback()
    refused = cli(host, "start", "1.1.0", "--percent", "50")
    assert refused.rc == HostUnfitError.exit_code, refused.describe()
    assert "do not fit in memory together" in refused.err
    assert "memory: found" in refused.err
    assert not (host.root / CANARY_FILE).exists()
    assert audit(host, "canary-start")[-1]["outcome"] == "refused"


def test_promote_switches_the_active_slot(two_slots: tuple[Host, str, str]) -> None:
    host, active, other = two_slots
    assert cli(host, "start", "1.1.0", "--percent", "25").rc == 0
    promoted = cli(host, "promote")
    assert promoted.rc == 0, promoted.describe()
    current = host.appliance.slots.current()
    assert current is not None
    assert current.id == other
    assert not (host.root / CANARY_FILE).exists()
    record = audit(host, "canary-promote")[-1]
    assert (record["outcome"], record["slot_from"], record["slot"]) == ("ok", active, other)
    assert cli(host, "promote").rc == StateError.exit_code  # no canary any more


def test_a_damaged_state_is_shown_and_abort_clears_it(two_slots: tuple[Host, str, str]) -> None:
    host, _, _ = two_slots
    (host.root / CANARY_FILE).write_text('{"slot": 1}')
    status = cli(host, "status")
    assert status.rc != 0
    assert "damaged" in status.out
    assert "Traceback" not in status.err
    assert cli(host, "abort").rc == 0
    assert "damaged" in audit(host, "canary-abort")[-1]
    assert cli(host, "status").out.strip() == "no canary"


# -- serving ----------------------------------------------------------------------------------


@dataclass
class Serving:
    live: LiveServer
    route: CanaryRoute
    follower: CanaryFollower
    slots: SlotFollower

    def complete(self, key: str) -> httpx.Response:
        with self.live.http(key=key, timeout=60.0) as http:
            return http.post(
                "/v1/completions", json={"model": "demo", "prompt": "Hello", "max_tokens": 2}
            )

    def to_canary(self, key: str) -> bool:
        """Whether ``key``'s request was answered by the canary (its watch counts it)."""
        before = self.route.watch.total
        response = self.complete(key)
        assert response.status_code == 200, response.text
        return self.route.watch.total == before + 1


@contextmanager
def serving(host: Host) -> Iterator[Serving]:
    """What ``appliance serve`` runs: the active slot, the canary beside it, on loopback."""
    store = KeyStore(key_file(host.root))
    if any(k.name == TEST_KEY_NAME for k in store.list()):
        store.revoke(TEST_KEY_NAME)  # live_server makes it anew (a restart: the second time)
    holder = ModelHolder()
    slots = SlotFollower(host.root, holder, parallel=1, threads=1)
    slots.load_active()
    route = CanaryRoute(DEFAULTS)
    follower = CanaryFollower(host.root, route, parallel=1, threads=1, active=holder)
    follower.check()
    try:
        with live_server(host.root, holder, canary=route, max_concurrency=2) as live:
            yield Serving(live, route, follower, slots)
    finally:
        route.end()
        holder.close()


def add_keys(host: Host, names: list[str]) -> dict[str, str]:
    store = KeyStore(key_file(host.root))
    return {name: store.add(name) for name in names}


@requires_llama
def test_percent_split_is_sticky_within_tolerance_and_survives_a_restart(
    two_slots: tuple[Host, str, str],
) -> None:
    host, _, other = two_slots
    names = [f"user-{i:02d}" for i in range(60)]
    keys = add_keys(host, names)
    assert cli(host, "start", "1.1.0", "--percent", "30").rc == 0
    with serving(host) as s:
        assert s.route.state is not None
        assert s.route.state.slot == other
        with s.live.http() as http:
            listed = http.get("/v1/models").json()["data"]
        assert [(m["id"], m.get("version")) for m in listed] == [("demo", None), ("demo", "1.1.0")]
        routed = {name: s.to_canary(keys[name]) for name in names}
        share = sum(routed.values()) / len(names)
        assert 0.15 <= share <= 0.45, f"{share:.0%} of the keys went to a 30% canary"
        # Sticky: the rule is the key name's hash, so a key never changes sides.
        assert routed == {name: bucket(name) < 30 for name in names}
        assert all(s.to_canary(keys[n]) == routed[n] for n in names[:8])
        samples = s.live.metrics()
        assert any('slot="canary"' in name for name in samples), "no canary series in /metrics"
    # A restart: the state file alone brings the same canary and the same routing back.
    with serving(host) as s:
        assert s.route.state is not None
        assert s.route.state.slot == other
        assert all(s.to_canary(keys[n]) == routed[n] for n in names[:8])


@requires_llama
def test_keys_route_exactly_and_a_killed_canary_aborts_by_itself(
    two_slots: tuple[Host, str, str],
) -> None:
    host, active, other = two_slots
    keys = add_keys(host, ["pilot", "ward-a", "ward-b"])
    started = cli(
        host, "start", "1.1.0", "--keys", "pilot", "--max-error-rate", "0.2", "--min-requests", "4"
    )
    assert started.rc == 0, started.describe()
    with serving(host) as s:
        assert [s.to_canary(keys[n]) for n in ("pilot", "ward-a", "ward-b", "pilot")] == [
            True,
            False,
            False,
            True,
        ]
        backend = s.route.holder.get()
        assert backend is not None
        pid = backend.engine.pid  # type: ignore[attr-defined]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # a real fault: the canary's engine dies
        statuses = []
        for _ in range(40):
            statuses.append(s.complete(keys["pilot"]).status_code)
            s.follower.check()  # the actor's poll
            if s.route.state is None:
                break
        assert s.route.state is None, f"no abort after answers {statuses}"
        assert any(code >= 500 for code in statuses)
        assert not (host.root / CANARY_FILE).exists()
        record = audit(host, "canary-abort")[-1]
        assert record["automatic"] is True
        assert record["slot"] == other
        assert record["measured"]["errors"] >= 1
        assert float(record["measured"]["error_rate"]) > 0.2
        assert "error rate" in record["reason"]
        # The active slot answers the pilot again; nothing was promoted.
        assert s.complete(keys["pilot"]).status_code == 200
        current = host.appliance.slots.current()
        assert current is not None
        assert current.id == active
    assert appliance(host.root, "history", "--check").rc == 0


@requires_llama
def test_serve_follows_start_and_promote(two_slots: tuple[Host, str, str]) -> None:
    host, _, other = two_slots
    keys = add_keys(host, ["pilot"])
    with serving(host) as s:
        assert s.route.state is None
        assert not s.to_canary(keys["pilot"])
        assert cli(host, "start", "1.1.0", "--keys", "pilot").rc == 0
        s.follower.check()
        assert s.to_canary(keys["pilot"])
        assert cli(host, "promote").rc == 0
        s.follower.check()  # the canary ends: its slot is the active one now
        assert s.route.state is None
        assert s.slots.check() is True  # serve follows the switch, as after a rollback
        assert s.slots.serving_slot() == host.root / "slots" / other
        assert s.complete(keys["pilot"]).status_code == 200


def test_state_round_trips_through_canonical_json(tmp_path: Path) -> None:
    state = CanaryState(
        slot="000002-demo-1.1.0",
        name="demo",
        version="1.1.0",
        started="2026-01-01T00:00:00Z",
        percent=7,
        thresholds=Thresholds(
            max_error_rate=0.125, max_p99_ms=900, min_requests=5, max_eval_mismatch=0.1
        ),
    )
    state.save(tmp_path)  # canonical JSON: a float would be refused, the rate is a decimal text
    assert json.loads((tmp_path / CANARY_FILE).read_bytes())["thresholds"]["max_error_rate"] == (
        "0.125"
    )
    assert CanaryState.load(tmp_path) == state


@requires_llama
def test_an_evaluation_mismatch_aborts_before_anything_is_routed(
    host: Host, model: bytes, tmp_path: Path
) -> None:
    """The canary's bundle carries an evaluation set the active model answers right (its own
    greedy answers, as regexes); the canary is another model (other weights), which does not."""
    install(host, "1.0.0", model)
    active_file = tmp_path / "active.gguf"
    active_file.write_bytes(model)
    prompts = [f"Hello number {i}" for i in range(4)]
    backend = load_model(active_file, model_id="demo", parallel=1, context=256)
    try:
        answers = ["".join(c.text for c in backend.generate(p, GREEDY).chunks) for p in prompts]
    finally:
        backend.close()
    items = [
        {"id": f"q{i}", "prompt": p, "expected": f"^{re.escape(a)}$", "check": "regex"}
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
    ]
    other = write_tiny_llama_bytes(tmp_path / "other.gguf", seed=1)
    files = {
        "model/tiny.gguf": other,
        "recipe.toml": b'name = "demo"\n',
        EVAL_SET: "".join(json.dumps(item) + "\n" for item in items).encode(),
        EVAL_POLICY: json.dumps(
            EvalPolicy(min_items=4, max_tokens=GREEDY.max_tokens).to_json()
        ).encode(),
    }
    made, payload = host.sim.manifest(version="1.1.0", files=files, runtime=RUNTIME)
    options = InstallOptions(skip_health_check=True, skip_eval=True)
    other_slot = host.appliance.install(
        str(host.write(host.sim.bundle_bytes(made, payload))), options
    )
    host.appliance.rollback()
    add_keys(host, ["pilot"])
    assert cli(host, "start", "1.1.0", "--keys", "pilot").rc == 0
    with serving(host) as s:  # the follower's first check loads and evaluates the canary
        assert s.route.state is None
        assert s.route.holder.get() is None
    assert not (host.root / CANARY_FILE).exists()
    record = audit(host, "canary-abort")[-1]
    assert (record["automatic"], record["slot"]) == (True, other_slot.id)
    assert "evaluation mismatch" in record["reason"]
    measured = record["measured"]
    assert measured["eval_items"] == 4
    assert measured["eval_active_correct"] == 4  # the set is the active model's own answers
    assert measured["eval_regressions"] >= 1
