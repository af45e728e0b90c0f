"""The evaluation gate at install (step I7b, docs/adr/0020-evaluation-gate.md), with real models.

Two kinds of generated GGUF of known behaviour answer a multiple-choice set through the real
llama-server: an *echo* model (identity embeddings and output, blocks zeroed: it repeats the
last byte of its prompt, so it answers every item right) and a *constant* model (it always
says "A": right on a quarter of the items). Installing the constant model over the echo model
must be refused, the active slot unchanged byte for byte and the numbers audited; an equal
model activates; the operator's override activates and is audited; a "canary" policy installs
without activating; a bad set never leaves the builder. The statistics are checked against
values worked out by hand.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.evalgate import EvaluationGateError, judge
from appliance.evalset import EvalItem, EvalPolicy, is_correct, parse_eval_set, parse_policy
from appliance.evalstats import (
    approximate_items,
    binomial_upper_tail_half,
    exact_items,
    exact_power,
    mcnemar_exact,
    percentile,
)
from appliance.installer import Appliance, InstallOptions
from appliance.limits import HOST_LIMITS
from builder.build import build_bundle
from signing.errors import RecipeError
from signing.keys import SigningKey
from signing.metadata import BUNDLE_ROLE, ROOT_ROLE, Role, Root, sign_root
from tests.evalmodels import CHATS, CHOICES, choice_set, write_model
from tests.simulator import snapshot_host

ITEMS = CHOICES + CHATS


# -- the statistics, against values worked out by hand ---------------------------------------


def test_the_binomial_tail_is_exact() -> None:
    assert binomial_upper_tail_half(12, 10) == 79 / 4096  # C(12,10)+C(12,11)+C(12,12) = 79
    assert binomial_upper_tail_half(20, 15) == 21700 / 2**20  # 15504+4845+1140+190+20+1
    assert binomial_upper_tail_half(5, 0) == 1.0
    assert binomial_upper_tail_half(5, 6) == 0.0
    assert binomial_upper_tail_half(0, 0) == 1.0


def test_the_exact_mcnemar_test_matches_known_values() -> None:
    # 10 items the new model lost, 2 it gained: binom.test(2, 12) in R gives p = 0.03857.
    test = mcnemar_exact(improved=2, regressed=10)
    assert test.p_worse == pytest.approx(0.019287109375, abs=1e-15)
    assert test.p_two_sided == pytest.approx(0.03857421875, abs=1e-15)
    assert mcnemar_exact(improved=0, regressed=5).p_worse == 1 / 32
    assert mcnemar_exact(improved=0, regressed=5).p_two_sided == 1 / 16
    # No discordant pairs: no evidence either way. More gains than losses: not worse.
    assert mcnemar_exact(improved=0, regressed=0).p_worse == 1.0
    assert mcnemar_exact(improved=0, regressed=0).p_two_sided == 1.0
    assert mcnemar_exact(improved=10, regressed=2).p_worse == pytest.approx(
        1 - 13 / 4096
    )  # 1 - P(X <= 1)
    # Symmetric in the two-sided form; the one-sided tails of b and m-b+1 add up to 1.
    assert mcnemar_exact(improved=7, regressed=3).p_two_sided == pytest.approx(
        mcnemar_exact(improved=3, regressed=7).p_two_sided
    )
    m, b = 30, 19
    assert binomial_upper_tail_half(m, b) + binomial_upper_tail_half(m, m - b + 1) == 1.0
    # Large m: close to the normal approximation with continuity correction.
    z = (230 - 0.5 - 200) / 10
    assert mcnemar_exact(improved=170, regressed=230).p_worse == pytest.approx(
        0.5 * math.erfc(z / math.sqrt(2)), rel=0.05
    )


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 95) == 95.0
    assert percentile(values, 50) == 50.0
    assert percentile([7.0], 95) == 7.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_items_needed_for_a_five_point_drop() -> None:
    # Connor's approximation for d = 0.10: (1.645*0.3162 + 0.8416*0.3122)^2 / 0.0025 = 245.7.
    assert approximate_items(drop=0.05, discordance=0.10, alpha=0.05, power=0.8) == 246
    n = exact_items(drop=0.05, discordance=0.10, alpha=0.05, power=0.8)
    assert 246 <= n <= 300  # the exact test is conservative: a few more items than the approx.
    assert exact_power(n, drop=0.05, discordance=0.10, alpha=0.05) >= 0.8
    assert exact_power(n // 2, drop=0.05, discordance=0.10, alpha=0.05) < 0.8


def test_each_check_scores_as_documented() -> None:
    def item(check: str, expected: str) -> EvalItem:
        return EvalItem(id="x", expected=expected, check=check, prompt="p")  # type: ignore[arg-type]

    assert is_correct(item("exact", "Paris"), "  Paris\n")
    assert not is_correct(item("exact", "Paris"), "Paris.")
    assert is_correct(item("contains", "Paris"), "It is Paris.")
    assert not is_correct(item("contains", "Paris"), "paris")
    assert is_correct(item("regex", r"\b4\b"), "2+2 = 4")
    assert not is_correct(item("regex", r"^4$"), "44")
    for answer in ("B", " (b) four", "B. four", "b)"):
        assert is_correct(item("choice", "B"), answer), answer
    for answer in ("BB", "A", "", "(C)"):
        assert not is_correct(item("choice", "B"), answer), answer


def test_the_rule_with_and_without_significance() -> None:
    from appliance.evalgate import Answer

    items = [EvalItem(id=f"q{i}", expected="A", check="choice", prompt="p") for i in range(20)]
    old = [Answer(f"q{i}", True, 10.0) for i in range(20)]
    new = [Answer(f"q{i}", i >= 2, 10.0) for i in range(20)]  # 2 of 20 lost: a 10-point drop
    summary, line, failed = judge(items, new, old, EvalPolicy())
    assert failed and summary["failed"] == ["accuracy"]
    assert summary["regressed"] == 2 and summary["improved"] == 0
    assert summary["p_worse"] == 0.25  # two losses out of two discordant pairs: 1/4
    assert "drop 10.0 points (allowed 5)" in line and "not significant" in line
    assert "worst items: q0, q1" in line
    # With require_significance the same drop on 20 items is not enough evidence.
    _, _, failed = judge(items, new, old, EvalPolicy(require_significance=True))
    assert not failed
    # A latency budget fails on its own.
    _, line, failed = judge(items, old, old, EvalPolicy(latency_p95_ms=5))
    assert failed and "budget 5 ms" in line


# -- the set and the policy, on the builder ----------------------------------------------------


def test_a_malformed_set_is_refused_at_build_line_by_line(world: World) -> None:
    good = json.dumps({"id": "ok", "prompt": "x", "expected": "A", "check": "choice"})
    lines = [
        good,
        "{not json",
        json.dumps({"id": "q2", "prompt": "x", "expected": "A", "check": "fuzzy"}),
        json.dumps({"id": "ok", "prompt": "x", "expected": "A"}),
        json.dumps({"id": "q4", "prompt": "x", "messages": [], "expected": "A"}),
        json.dumps({"id": "q5", "prompt": "x", "expected": "(", "check": "regex"}),
        json.dumps({"id": "q6", "prompt": "x", "expected": "A", "score": 1}),
        "",
        json.dumps({"id": "q8", "messages": [{"role": "robot", "content": "x"}], "expected": "A"}),
    ]
    with pytest.raises(RecipeError) as caught:
        world.bundle("1.0.0", world.echo, eval_lines=lines, name="bad-set")
    message = caught.value.diagnostics()
    assert "7 bad line(s)" in message
    for expected in (
        "line 2: not JSON",
        "line 3: 'check' must be one of exact, contains, regex, choice",
        "line 4: id 'ok' is used twice",
        "line 5: give exactly one of 'prompt' or 'messages'",
        "line 6: 'expected' is not a regular expression",
        "line 7: unknown key 'score'",
        "line 9: messages[0] must be",
    ):
        assert expected in message
    # Too few items for the recipe's own minimum.
    with pytest.raises(RecipeError, match="has 1 items; min_items is 20"):
        world.bundle("1.0.0", world.echo, eval_lines=[good], name="small-set")


def test_the_set_and_policy_travel_as_signed_payload_files(world: World) -> None:
    from signing.bundle import open_bundle, read_head
    from signing.manifest import BundleManifest

    limits = HOST_LIMITS.bundle
    with world.bundles["1.0.0-echo"].open("rb") as stream:
        head = read_head(open_bundle(stream, limits), limits)
    manifest = BundleManifest.from_bytes(head.manifest_bytes)
    entries = {e.path: e for e in manifest.entries}
    assert entries["eval/set.jsonl"].kind == "file"
    assert entries["eval/policy.json"].kind == "file"


def test_parsers_bound_and_refuse() -> None:
    assert parse_eval_set(b"\n\n") == ([], ["the set has no items"])
    items, problems = parse_eval_set(b'{"prompt": "x", "expected": "y"}\n')
    assert problems == [] and items[0].id == "line-1" and items[0].check == "exact"
    _, problems = parse_eval_set(b"x" * (70 << 10))
    assert problems[0].startswith("line 1: 71680 bytes")
    policy = EvalPolicy(max_drop_points=2.5, on_fail="canary", latency_p95_ms=100.0)
    assert parse_policy(json.dumps(policy.to_json()).encode()) == policy
    with pytest.raises(ValueError, match="unknown keys"):
        parse_policy(b'{"version": 1, "max_drop": 5}')
    with pytest.raises(ValueError, match="wrong type"):
        parse_policy(b'{"version": 1, "min_items": true}')


# -- the gate at install, with real models ---------------------------------------------------


RECIPE = """[bundle]
name = "{name}"
version = "{version}"
[model]
path = "{model}"
[runtime]
backend = "llama.cpp"
context_size = 128
threads = 1
{evaluation}"""


class World:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.key = SigningKey.generate()
        root = Root(
            version=1,
            expires=datetime.now(UTC).replace(microsecond=0) + timedelta(days=365),
            keys={self.key.keyid: self.key.public_key},
            roles={
                ROOT_ROLE: Role(keyids=(self.key.keyid,), threshold=1),
                BUNDLE_ROLE: Role(keyids=(self.key.keyid,), threshold=1),
            },
        )
        self.root_bytes = sign_root(root, [self.key]).to_bytes()
        self.echo = base / "echo.gguf"
        write_model(self.echo, answer=None)
        self.echo2 = base / "echo2.gguf"  # the same behaviour, other bytes
        write_model(self.echo2, answer=None, scale=9.0)
        self.constant = base / "constant.gguf"
        write_model(self.constant, answer="A")
        self.bundles: dict[str, Path] = {}
        self.built = 0

    def bundle(
        self,
        version: str,
        model: Path,
        *,
        eval_lines: list[str] | None = None,
        policy: str = "",
        name: str = "demo",
    ) -> Path:
        self.built += 1
        directory = self.base / f"recipe-{name}-{version}-{model.stem}-{self.built}"
        directory.mkdir()
        shutil.copy(model, directory / model.name)
        lines = choice_set() if eval_lines is None else eval_lines
        (directory / "set.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        evaluation = f'[evaluation]\nset = "set.jsonl"\nmax_tokens = 1\n{policy}'
        recipe = directory / "recipe.toml"
        recipe.write_text(
            RECIPE.format(name=name, version=version, model=model.name, evaluation=evaluation)
        )
        out = self.base / f"{directory.name}.tar"
        build_bundle(recipe, out, [self.key])
        return out

    def host(self, path: Path) -> Appliance:
        app = Appliance(path)
        app.trust_init(self.root_bytes, fingerprint=None)
        return app


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    pytest.importorskip("gguf", reason="generating the models needs the 'model' extra")
    w = World(tmp_path_factory.mktemp("evalgate"))
    w.bundles["1.0.0-echo"] = w.bundle("1.0.0", w.echo)
    return w


@pytest.fixture(scope="module")
def installed(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A host with the echo model active (its first install: scored alone)."""
    pytest.importorskip("llama_cpp", reason="the gate runs models with llama.cpp")
    root = tmp_path_factory.mktemp("host") / "root"
    app = world.host(root)
    app.install(str(world.bundles["1.0.0-echo"]), InstallOptions(grace_period_s=0))
    return root


def _host(installed: Path, tmp_path: Path, world: World) -> Appliance:
    root = tmp_path / "root"
    shutil.copytree(installed, root, symlinks=True)
    return Appliance(root)


def _last(app: Appliance) -> dict[str, Any]:
    return list(app.audit.records())[-1]


def test_a_first_install_is_scored_alone(world: World, installed: Path, tmp_path: Path) -> None:
    app = _host(installed, tmp_path, world)
    record = _last(app)
    assert (record["event"], record["outcome"], record["activated"]) == ("install", "ok", True)
    evaluation = record["evaluation"]
    assert evaluation["verdict"] == "pass"
    assert evaluation["new"]["correct"] == ITEMS
    assert "active" not in evaluation


def test_a_worse_model_is_refused_and_the_active_slot_is_unchanged(
    world: World, installed: Path, tmp_path: Path
) -> None:
    app = _host(installed, tmp_path, world)
    before = snapshot_host(app.paths.root)
    worse = world.bundle("2.0.0", world.constant)
    with pytest.raises(EvaluationGateError) as caught:
        app.install(str(worse), InstallOptions(grace_period_s=0))
    line = caught.value.diagnostics()
    assert caught.value.exit_code == 4
    assert "new 31.8% (14/44) vs active 100.0% (44/44)" in line
    assert "drop 68.2 points (allowed 5)" in line
    assert "(30 worse, 0 better)" in line and "significant at 0.05" in line
    assert "worst items: q01, q02, q03, q05, q06 (+25 more)" in line
    assert snapshot_host(app.paths.root) == before
    assert not any(app.paths.staging.iterdir())
    record = _last(app)
    assert (record["outcome"], record["activated"]) == ("refused", False)
    evaluation = record["evaluation"]
    assert evaluation["verdict"] == "refused"
    assert (evaluation["new"]["correct"], evaluation["active"]["correct"]) == (14, ITEMS)
    assert (evaluation["regressed"], evaluation["improved"]) == (30, 0)
    assert float(evaluation["p_worse"]) == pytest.approx(2.0**-30)
    assert evaluation["worst_items"] == ["q01", "q02", "q03", "q05", "q06"]
    assert app.audit.check() == len(list(app.audit.records()))


def test_an_equal_model_activates_and_status_shows_the_scores(
    world: World, installed: Path, tmp_path: Path
) -> None:
    app = _host(installed, tmp_path, world)
    slot = app.install(str(world.bundle("2.0.0", world.echo2)), InstallOptions(grace_period_s=0))
    assert app.slots.current() == slot
    evaluation = _last(app)["evaluation"]
    assert evaluation["verdict"] == "pass"
    assert (evaluation["drop_points"], evaluation["regressed"]) == ("0", 0)
    status = _cli(app.paths.root, "status", "--json")
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)["evaluation"]
    assert (shown["verdict"], shown["new"]["correct"], shown["active"]["correct"]) == (
        "pass",
        ITEMS,
        ITEMS,
    )
    text = _cli(app.paths.root, "status").stdout
    assert "evaluation: pass: new 100.0% (44/44) vs active 100.0% (44/44)" in text


def test_the_operator_override_activates_and_is_audited(
    world: World, installed: Path, tmp_path: Path
) -> None:
    app = _host(installed, tmp_path, world)
    worse = world.bundle("2.0.0", world.constant)
    done = _cli(app.paths.root, "install", str(worse), "--accept-eval-drop", "--grace-period", "0")
    assert done.returncode == 0, done.stderr
    assert "now active" in done.stdout
    assert "evaluation: accepted-by-operator" in done.stderr
    record = _last(app)
    assert (record["outcome"], record["activated"], record["accept_eval_drop"]) == (
        "ok",
        True,
        True,
    )
    assert record["evaluation"]["verdict"] == "accepted-by-operator"
    assert record["evaluation"]["failed"] == ["accuracy"]
    current = app.slots.current()
    assert current is not None and current.version == "2.0.0"


def test_skipping_the_gate_is_audited(world: World, installed: Path, tmp_path: Path) -> None:
    app = _host(installed, tmp_path, world)
    worse = world.bundle("2.0.0", world.constant)
    app.install(str(worse), InstallOptions(grace_period_s=0, skip_eval=True))
    record = _last(app)
    assert record["skip_eval"] is True
    assert record["evaluation"] == {"items": ITEMS, "verdict": "skipped"}


def test_a_canary_policy_installs_without_activating(
    world: World, installed: Path, tmp_path: Path
) -> None:
    app = _host(installed, tmp_path, world)
    active = app.slots.current()
    worse = world.bundle("2.0.0", world.constant, policy='on_fail = "canary"\n')
    done = _cli(app.paths.root, "install", str(worse), "--grace-period", "0")
    assert done.returncode == 0, done.stderr
    assert "NOT activated" in done.stdout and "appliance canary start 2.0.0" in done.stdout
    assert app.slots.current() == active
    record = _last(app)
    assert (record["outcome"], record["activated"], record["canary_only"]) == ("ok", False, True)
    assert record["evaluation"]["verdict"] == "canary-only"
    assert [s.version for s in app.slots.list()] == ["1.0.0", "2.0.0"]
    state = json.loads(app.paths.state.read_bytes())
    assert state["highest"]["demo"] == "2.0.0"


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    return subprocess.run(
        [sys.executable, "-m", "appliance", "--root", str(root), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
