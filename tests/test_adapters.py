"""LoRA adapter bundles (issue 11, item 4): a GGUF adapter bound to the sha256 of its base
weights, served through llama-server's LoRA support, and shipped alone as a delta.

Real files throughout: a generated llama GGUF and a LoRA GGUF for it (builder.tinymodel), the
real builder and appliance CLIs, the install health check loading the model with its adapter,
and the slot's runtime settings loaded as ``serve`` loads them: with the adapter the greedy
answer changes. An adapter pinned to other weights is refused at build; a signed manifest that
binds an adapter to other weights is refused at install; an adapter-only delta installs on
the slot that holds its base and is refused, naming the weights, where none does.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
from helpers_cli import (
    World,
    appliance,
    assert_error,
    audit_records,
    build,
    builder,
    clean_env,
    get_world,
    ok,
    write_recipe,
)

from appliance.runtime.base import SamplingParams
from appliance.runtime.loader import load_backend, slot_runtime_settings
from builder.tinymodel import write_tiny_llama, write_tiny_lora
from signing.bundle import Limits, open_bundle, read_head
from signing.canonical import encode_canonical
from signing.errors import FormatError
from signing.manifest import BundleManifest, ModelAdapter


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return get_world(tmp_path_factory)


@pytest.fixture(scope="module")
def made(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """demo 1.0.0: the model alone; 1.1.0: the model and its adapter, complete and as a delta
    on 1.0.0 (only the adapter travels)."""
    d = tmp_path_factory.mktemp("lora")
    out: dict[str, Path] = {}
    for version, lora in (("1.0.0", False), ("1.1.0", True)):
        src = d / f"src-{version}"
        write_tiny_llama(src / "tiny.gguf")
        extra = ""
        if lora:
            write_tiny_lora(src / "style.gguf")
            extra = '\n[[adapters]]\npath = "style.gguf"\n'
        recipe = write_recipe(src, version=version, model_path="tiny.gguf", extra=extra)
        out[version] = d / f"demo-{version}.tar"
        build(recipe, out[version], world.signers, epoch=world.epoch)
        if lora:
            out["recipe"] = recipe
            out["1.1.0-delta"] = d / "demo-1.1.0-delta.tar"
            build(
                recipe, out["1.1.0-delta"], world.signers, epoch=world.epoch,
                extra=["--base", str(out["1.0.0"])],
            )  # fmt: skip
    out["weights"] = d / "src-1.0.0" / "tiny.gguf"
    return out


def head(bundle: Path) -> BundleManifest:
    with bundle.open("rb") as fh:
        raw = read_head(open_bundle(fh, Limits()), Limits())
    return BundleManifest.from_bytes(raw.manifest_bytes)


def new_host(world: World, path: Path) -> Path:
    ok(appliance(path, "trust", "init", world.root_json, "--fingerprint", world.fingerprint))
    return path


def greedy(slot: Path) -> str:
    """The slot's model, loaded as ``serve`` loads it, answers greedily."""
    backend = load_backend(replace(slot_runtime_settings(slot, parallel=1), threads=1))
    try:
        generation = backend.generate("hello", SamplingParams(max_tokens=12, temperature=0.0))
        return "".join(chunk.text for chunk in generation.chunks)
    finally:
        backend.close()


def test_the_manifest_binds_the_adapter_to_the_weights(made: dict[str, Path]) -> None:
    manifest = head(made["1.1.0"])
    weights = hashlib.sha256(made["weights"].read_bytes()).hexdigest()
    assert manifest.model_adapters == (ModelAdapter("adapters/style.gguf", weights),)
    # A signed manifest that binds it to other weights is refused as it is parsed.
    raw = manifest.to_dict()
    raw["model"]["adapters"][0]["base_sha256"] = "0" * 64
    with pytest.raises(FormatError) as info:
        BundleManifest.from_bytes(encode_canonical(raw))
    assert str(info.value) == (
        "manifest: adapter 'adapters/style.gguf' is for base weights sha256 "
        f"0000000000000000..., the model 'model/tiny.gguf' is {weights[:16]}..."
    )


def test_an_adapter_for_other_weights_is_refused_at_build(
    world: World, made: dict[str, Path], tmp_path: Path
) -> None:
    recipe = made["recipe"]
    pinned = recipe.read_text().replace(
        'path = "style.gguf"\n', 'path = "style.gguf"\nbase_sha256 = "' + "a" * 64 + '"\n'
    )
    other = recipe.with_name("pinned.toml")
    other.write_text(pinned)
    keys = [a for k in world.signers for a in ("--key", str(k))]
    result = builder("build", other, *keys, "-o", tmp_path / "x.tar")
    weights = hashlib.sha256(made["weights"].read_bytes()).hexdigest()
    assert_error(
        result,
        2,
        "adapter style.gguf is for base weights sha256 aaaaaaaaaaaaaaaa..., the recipe's "
        f"model model/tiny.gguf is {weights[:16]}...",
    )
    assert not (tmp_path / "x.tar").exists()


def test_an_adapter_only_delta_installs_on_its_base_and_changes_the_answers(
    world: World, made: dict[str, Path], tmp_path: Path
) -> None:
    delta = head(made["1.1.0-delta"])
    assert delta.delta is not None and "model/tiny.gguf" in delta.delta.reuse
    assert "adapters/style.gguf" not in delta.delta.not_carried
    assert made["1.1.0-delta"].stat().st_size < made["1.0.0"].stat().st_size / 2
    root = new_host(world, tmp_path / "host")
    # With the health check: the model is loaded with its adapter before the switch.
    checked = clean_env()
    del checked["APPLIANCE_SKIP_HEALTH_CHECK"]
    ok(appliance(root, "install", made["1.0.0"], env=checked))
    base_answer = greedy((root / "current").resolve())
    ok(appliance(root, "install", made["1.1.0-delta"], env=checked))
    record = audit_records(root)[-1]
    assert record["health_check"] == "ok" and record["delta"]["reused"] >= 1
    tuned = (root / "current").resolve()
    assert tuned.name.endswith("demo-1.1.0")
    assert greedy(tuned) != base_answer


def test_an_adapter_only_delta_without_its_base_names_the_weights(
    world: World, made: dict[str, Path], tmp_path: Path
) -> None:
    root = new_host(world, tmp_path / "host")
    weights = hashlib.sha256(made["weights"].read_bytes()).hexdigest()
    result = appliance(root, "install", made["1.1.0-delta"], "--skip-health-check")
    assert_error(
        result,
        4,
        "needs its base demo 1.0.0",
        f"its adapters need the base weights model/tiny.gguf (sha256 {weights[:16]}...)",
    )
