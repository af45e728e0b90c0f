"""Delta bundles: built with ``--base``, they carry only what the base lacks (issue 11, item 3).

The real CLI on both sides: ``appliance-builder build --base OLD.tar`` and ``appliance install``.
A delta installs into a new slot whose files are byte-identical to those of the complete
bundle; the reused files come from the base slot (linked or copied, then hashed); a host
without the exact base refuses it with one line naming the base it needs and what it has; a
reused file damaged in the base slot is refused, the active slot stays byte-identical, and
every refusal is audited.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers_cli import (
    World,
    appliance,
    assert_error,
    audit_records,
    build,
    builder,
    get_world,
    ok,
    random_bytes,
    tree_digest,
    write_recipe,
)

from signing.bundle import Limits, open_bundle, read_head
from signing.manifest import BundleManifest

MIB = 1 << 20
WEIGHTS = random_bytes(3 * MIB, seed=7)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return get_world(tmp_path_factory)


def model_dir(root: Path, *, config: str) -> Path:
    """A model folder: large weights that do not change, a small config that does."""
    model = root / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "weights.bin").write_bytes(WEIGHTS)
    (model / "config.json").write_text(config)
    return model


@pytest.fixture(scope="module")
def bundles(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """demo 1.0.0 (complete), 1.1.0 complete and as a delta on 1.0.0, and 1.2.0 as a delta on
    1.1.0's manifest alone."""
    d = tmp_path_factory.mktemp("delta")
    out: dict[str, Path] = {}
    for version, config in (("1.0.0", '{"t": 1}'), ("1.1.0", '{"t": 2}'), ("1.2.0", '{"t": 3}')):
        src = d / f"src-{version}"
        model_dir(src, config=config)
        recipe = write_recipe(src, version=version, model_path="model")
        out[version] = d / f"demo-{version}.tar"
        build(recipe, out[version], world.signers, epoch=world.epoch)
        if version == "1.1.0":
            out["1.1.0-delta"] = d / "demo-1.1.0-delta.tar"
            result = build(
                recipe, out["1.1.0-delta"], world.signers, epoch=world.epoch,
                extra=["--base", str(out["1.0.0"])],
            )  # fmt: skip
            out["1.1.0-delta-said"] = Path(result.out.splitlines()[-1])
        if version == "1.2.0":
            manifest = d / "manifest-1.1.0.json"
            manifest.write_bytes(head(out["1.1.0"]).to_bytes())
            out["1.2.0-delta"] = d / "demo-1.2.0-delta.tar"
            build(
                recipe, out["1.2.0-delta"], world.signers, epoch=world.epoch,
                extra=["--base", str(manifest)],
            )  # fmt: skip
    return out


def head(bundle: Path) -> BundleManifest:
    with bundle.open("rb") as fh:
        raw = read_head(open_bundle(fh, Limits()), Limits())
    return BundleManifest.from_bytes(raw.manifest_bytes)


def host_with(world: World, tmp_path: Path, *versions: Path) -> Path:
    root = tmp_path / "host"
    ok(appliance(root, "trust", "init", world.root_json, "--fingerprint", world.fingerprint))
    for bundle in versions:
        ok(appliance(root, "install", bundle, "--skip-health-check"))
    return root


def slot_payload(root: Path) -> dict[str, str]:
    current = (root / "current").resolve()
    return tree_digest(current / "payload")


def test_a_delta_carries_only_what_changed(bundles: dict[str, Path]) -> None:
    full, delta = head(bundles["1.1.0"]), head(bundles["1.1.0-delta"])
    base = head(bundles["1.0.0"])
    # The delta's manifest describes the complete new slot, as the full bundle's does.
    assert [(e.path, e.sha256) for e in delta.entries] == [(e.path, e.sha256) for e in full.entries]
    assert delta.delta is not None
    assert delta.delta.base_state_sha256 == base.sha256() == base.state_sha256()
    # Either 1.1.0 is a base for 1.2.0: the complete bundle and the delta hold the same slot.
    assert delta.state_sha256() == full.state_sha256() == full.sha256() != delta.sha256()
    assert "model/weights.bin" in delta.delta.reuse
    assert "model/config.json" not in delta.delta.reuse
    # It is small: the weights stay behind.
    assert bundles["1.1.0-delta"].stat().st_size < bundles["1.1.0"].stat().st_size - 2 * MIB
    assert delta.carried_size < 0.01 * len(WEIGHTS)
    said = str(bundles["1.1.0-delta-said"])
    assert said.startswith("delta on demo 1.0.0 (state ") and "1 patched" not in said


def test_inspect_shows_the_base_and_the_bytes_carried(bundles: dict[str, Path]) -> None:
    out = ok(builder("inspect", bundles["1.1.0-delta"])).out
    assert "delta    on demo 1.0.0 (state " in out
    assert "model/weights.bin  (from base)" in out


def test_a_delta_installs_the_same_slot_as_the_complete_bundle(
    world: World, bundles: dict[str, Path], tmp_path: Path
) -> None:
    by_delta = host_with(world, tmp_path / "a", bundles["1.0.0"], bundles["1.1.0-delta"])
    by_full = host_with(world, tmp_path / "b", bundles["1.0.0"], bundles["1.1.0"])
    assert slot_payload(by_delta) == slot_payload(by_full)
    record = audit_records(by_delta)[-1]
    assert record["outcome"] == "ok" and record["activated"] is True
    summary = record["delta"]
    assert summary["base"] == "000001-demo-1.0.0"
    assert summary["reused_bytes"] >= len(WEIGHTS)
    assert sum(summary["linked"].values()) == summary["reused"]
    # The delta of a delta: 1.2.0 on 1.1.0's manifest alone.
    ok(appliance(by_delta, "install", bundles["1.2.0-delta"], "--skip-health-check"))
    assert json.loads((by_delta / "current" / "payload" / "model" / "config.json").read_text()) == {
        "t": 3
    }
    # The base can go: the new slot's reused files do not depend on it.
    ok(appliance(by_delta, "rollback", "--to", "1.1.0"))


def test_a_delta_without_its_base_is_refused_naming_the_base(
    world: World, bundles: dict[str, Path], tmp_path: Path
) -> None:
    empty = host_with(world, tmp_path / "empty")
    base = head(bundles["1.0.0"])
    result = appliance(empty, "install", bundles["1.1.0-delta"], "--skip-health-check")
    line = assert_error(
        result,
        4,
        "delta bundle demo 1.1.0 needs its base demo 1.0.0 "
        f"(state {base.state_sha256()[:16]}...) installed; this host has no slot; "
        "install the complete bundle instead",
    )
    assert audit_records(empty)[-1]["outcome"] == "refused"
    assert "needs its base" in audit_records(empty)[-1]["error"]
    # A stale base: 1.2.0's delta wants 1.1.0, the host has only 1.0.0.
    stale = host_with(world, tmp_path / "stale", bundles["1.0.0"])
    before = tree_digest(stale / "slots")
    result = appliance(stale, "install", bundles["1.2.0-delta"], "--skip-health-check")
    line = assert_error(result, 4, "needs its base demo 1.1.0", "this host has demo 1.0.0 (state ")
    assert tree_digest(stale / "slots") == before
    assert line


def test_a_damaged_reused_file_in_the_base_slot_is_refused(
    world: World, bundles: dict[str, Path], tmp_path: Path
) -> None:
    root = host_with(world, tmp_path / "h", bundles["1.0.0"])
    weights = (root / "current").resolve() / "payload" / "model" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0xFF
    weights.write_bytes(bytes(data))
    before = tree_digest(root / "slots")
    result = appliance(root, "install", bundles["1.1.0-delta"], "--skip-health-check")
    assert_error(
        result,
        6,
        "delta: a file taken from base slot 000001-demo-1.0.0 does not match the signed "
        "manifest: bundle: member 'payload/model/weights.bin' sha256 mismatch",
        "the base slot is damaged: install the complete bundle",
    )
    assert tree_digest(root / "slots") == before
    assert list((root / "staging").iterdir()) == []
    # Damaged local state, not bad input: audited as "failed" (exit 6), with the line.
    record = audit_records(root)[-1]
    assert record["outcome"] == "failed"
    assert "the base slot is damaged" in record["error"]


def test_a_delta_on_another_bundle_name_is_refused_at_build(
    world: World, bundles: dict[str, Path], tmp_path: Path
) -> None:
    src = tmp_path / "other"
    model_dir(src, config="{}")
    recipe = write_recipe(src, version="1.0.0", model_path="model", name="other")
    keys = [a for k in world.signers for a in ("--key", str(k))]
    result = builder("build", recipe, *keys, "-o", tmp_path / "o.tar", "--base", bundles["1.0.0"])
    assert_error(result, 2, "base bundle is 'demo', this recipe builds 'other'")
    shutil.rmtree(src)


# -- GGUF-aware deltas: a chat-template edit travels as a per-tensor patch ---------------------


@pytest.fixture(scope="module")
def gguf_bundles(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """demo 1.0.0 and 1.1.0 of one GGUF model whose chat template changed (every tensor's
    offset moves with the header); 1.1.0 also as a delta on 1.0.0."""
    from builder.tinymodel import CHAT_TEMPLATE, write_tiny_llama

    d = tmp_path_factory.mktemp("gguf-delta")
    out: dict[str, Path] = {}
    templates = {"1.0.0": CHAT_TEMPLATE, "1.1.0": CHAT_TEMPLATE + "{# a longer template #}"}
    for version, template in templates.items():
        src = d / f"src-{version}"
        write_tiny_llama(src / "tiny.gguf", n_embd=128, n_ff=512, chat_template=template)
        recipe = write_recipe(src, version=version, model_path="tiny.gguf")
        out[version] = d / f"demo-{version}.tar"
        build(recipe, out[version], world.signers, epoch=world.epoch)
        out[f"model-{version}"] = src / "tiny.gguf"
        if version == "1.1.0":
            out["delta"] = d / "demo-1.1.0-delta.tar"
            build(
                recipe, out["delta"], world.signers, epoch=world.epoch,
                extra=["--base", str(out["1.0.0"])],
            )  # fmt: skip
    return out


def test_a_template_edit_carries_a_patch_not_the_weights(
    world: World, gguf_bundles: dict[str, Path], tmp_path: Path
) -> None:
    manifest = head(gguf_bundles["delta"])
    assert manifest.delta is not None
    (patch,) = manifest.delta.patches
    assert patch.path == "model/tiny.gguf"
    model_size = gguf_bundles["model-1.1.0"].stat().st_size
    carried = {e.path: e.size for e in manifest.carried_entries}
    assert carried[patch.literal] < 0.01 * model_size
    assert "model/tiny.gguf" not in carried
    root = host_with(world, tmp_path, gguf_bundles["1.0.0"], gguf_bundles["delta"])
    rebuilt = (root / "current").resolve() / "payload" / "model" / "tiny.gguf"
    assert rebuilt.read_bytes() == gguf_bundles["model-1.1.0"].read_bytes()
    summary = audit_records(root)[-1]["delta"]
    assert (summary["patched"], summary["patched_bytes"]) == (1, model_size)


def test_a_patch_on_a_damaged_base_is_refused(
    world: World, gguf_bundles: dict[str, Path], tmp_path: Path
) -> None:
    root = host_with(world, tmp_path, gguf_bundles["1.0.0"])
    model = (root / "current").resolve() / "payload" / "model" / "tiny.gguf"
    data = bytearray(model.read_bytes())
    data[-100] ^= 0xFF  # a weight byte: the patch copies it
    model.write_bytes(bytes(data))
    before = tree_digest(root / "slots")
    result = appliance(root, "install", gguf_bundles["delta"], "--skip-health-check")
    assert_error(
        result,
        6,
        "delta: 'model/tiny.gguf' cannot be rebuilt from base slot 000001-demo-1.0.0: the base "
        "file does not match: sha256 ",
        "; the base slot is damaged: install the complete bundle",
    )
    assert tree_digest(root / "slots") == before
    assert list((root / "staging").iterdir()) == []
