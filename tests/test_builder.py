"""appliance-builder as a subprocess: keys, roots, deterministic bundles, co-signing, inspect."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import tarfile
from functools import partial
from pathlib import Path

import pytest
from helpers_cli import (
    Result,
    World,
    assert_error,
    build,
    builder,
    clean_env,
    get_world,
    ok,
    random_bytes,
    run_all,
    write_recipe,
)

from builder.keyfiles import load_public_key
from signing.bundle import Limits, open_bundle, read_head


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return get_world(tmp_path_factory)


PHRASE_OPTION = "correct horse"
PHRASE_ENV = {"APPLIANCE_KEY_PASSPHRASE": "battery staple"}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- keygen -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Result]]:
    """keygen three times at once: plain, passphrase by option, passphrase by environment."""
    d = tmp_path_factory.mktemp("keygen")
    runs = {
        "plain": (d / "plain.pem", ()),
        "option": (d / "opt.pem", ("--passphrase", PHRASE_OPTION)),
        "env": (d / "env.pem", ()),
    }
    results = run_all(
        *(
            partial(builder, "keygen", path, *extra,
                    env=clean_env(**PHRASE_ENV) if name == "env" else clean_env())
            for name, (path, extra) in runs.items()
        )
    )  # fmt: skip
    return {name: (runs[name][0], ok(r)) for name, r in zip(runs, results, strict=True)}


def test_keygen_writes_private_0600_and_public(keys: dict[str, tuple[Path, Result]]) -> None:
    key, result = keys["plain"]
    pub = key.with_name(key.name + ".pub")
    assert _mode(key) == 0o600
    assert _mode(pub) == 0o644
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert result.out.strip().endswith(f"keyid {load_public_key(pub).keyid}")


def test_keygen_refuses_to_overwrite(tmp_path: Path, keys: dict[str, tuple[Path, Result]]) -> None:
    key = keys["plain"][0]
    pub = key.with_name(key.name + ".pub")
    before = (key.read_bytes(), pub.read_bytes())
    # Only a private key there (no .pub): still refused, and no public key appears beside it.
    lone = tmp_path / "lone.pem"
    lone.write_bytes(b"not mine")
    both, alone = run_all(partial(builder, "keygen", key), partial(builder, "keygen", lone))
    assert_error(both, 2, "already exists", "refusing to overwrite")
    assert (key.read_bytes(), pub.read_bytes()) == before
    assert_error(alone, 2, "lone.pem already exists")
    assert lone.read_bytes() == b"not mine"
    assert not (tmp_path / "lone.pem.pub").exists()


def _signature_keyids(bundle: Path) -> set[str]:
    limits = Limits()
    with bundle.open("rb") as fh:
        block = read_head(open_bundle(fh, limits), limits).signature_block
    return {s["keyid"] for s in json.loads(block)["signatures"]}


def test_encrypted_keys_passphrase_option_and_environment(
    tmp_path: Path, world: World, keys: dict[str, tuple[Path, Result]]
) -> None:
    by_option, by_env = keys["option"][0], keys["env"][0]
    for key in (by_option, by_env):
        assert key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        assert _mode(key) == 0o600
    # Each key is usable with its passphrase: from the option, and from the environment.
    bundle = tmp_path / "b.tar"
    shutil.copyfile(world.bundles["1.0.0"], bundle)
    ok(builder("sign", bundle, "--key", by_option, "--passphrase", PHRASE_OPTION))
    ok(builder("sign", bundle, "--key", by_env, env=clean_env(**PHRASE_ENV)))
    added = {load_public_key(Path(f"{k}.pub")).keyid for k in (by_option, by_env)}
    assert _signature_keyids(bundle) == added | _signature_keyids(world.bundles["1.0.0"])


def test_encrypted_key_without_or_with_wrong_passphrase(
    tmp_path: Path, world: World, keys: dict[str, tuple[Path, Result]]
) -> None:
    key = keys["option"][0]
    bundle = tmp_path / "b.tar"
    shutil.copyfile(world.bundles["1.0.0"], bundle)
    before = bundle.read_bytes()
    wrong = clean_env(**{**PHRASE_ENV, "APPLIANCE_KEY_PASSPHRASE": "nope"})
    missing, bad = run_all(
        partial(builder, "sign", bundle, "--key", key),
        partial(builder, "sign", bundle, "--key", key, env=wrong),
    )
    assert_error(missing, 2, "encrypted", "APPLIANCE_KEY_PASSPHRASE")
    assert_error(bad, 2, "wrong passphrase")
    assert bundle.read_bytes() == before


def test_keygen_refuses_an_empty_passphrase(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    assert_error(builder("keygen", key, "--passphrase", ""), 2, "empty passphrase")
    assert not key.exists()


# -- root metadata ----------------------------------------------------------------------------


def test_root_create_and_fingerprint(world: World) -> None:
    doc = json.loads(world.root_json.read_bytes())
    signed = doc["signed"]
    assert signed["version"] == 1
    assert signed["roles"]["bundle"]["threshold"] == 2
    root_id = load_public_key(Path(f"{world.keys['root']}.pub")).keyid
    assert signed["roles"]["root"]["keyids"] == [root_id]
    assert [s["keyid"] for s in doc["signatures"]] == [root_id]
    fp = ok(builder("root", "fingerprint", world.root_json)).out.strip()
    assert fp == world.fingerprint
    assert len(fp) == 64


def test_root_listed_pub_key_signs_later(tmp_path: Path, world: World) -> None:
    """A .pub root key is listed only: the root verifies once `root sign` adds its signature."""
    root = tmp_path / "root.json"
    created = ok(
        builder(
            "root",
            "create",
            "--root-key",
            f"{world.keys['root']}.pub",
            "--bundle-key",
            f"{world.keys['a']}.pub",
            "--threshold",
            "1",
            "-o",
            root,
        )
    )
    fp = created.out.split("fingerprint ")[1].strip()
    assert json.loads(root.read_bytes())["signatures"] == []
    assert_error(builder("root", "verify", root), 3, "root")
    ok(builder("root", "sign", root, "--key", world.keys["root"]))
    # Signatures are not part of the fingerprint: it stays what the operators compared.
    assert ok(builder("root", "verify", root)).out.strip() == f"OK root version 1, fingerprint {fp}"


def test_root_rotation_needs_old_key(world: World) -> None:
    rot = world.rotation()  # root create --previous, then root sign --key OLD on a copy
    only_new, v2 = rot["unsigned_by_old"], rot["v2"]
    assert json.loads(only_new.read_bytes())["signed"]["version"] == 2
    assert len(json.loads(only_new.read_bytes())["signatures"]) == 1
    assert_error(
        builder("root", "verify", only_new, "--previous", world.root_json),
        3,
        "not signed by a threshold of the trusted root (version 1)",
    )
    ok(builder("root", "verify", v2, "--previous", world.root_json))
    assert len(json.loads(v2.read_bytes())["signatures"]) == 2


# -- build determinism and co-signing ----------------------------------------------------------


@pytest.fixture(scope="module")
def cosigned(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """v1 rebuilt with A+B, with A alone (then co-signed by B), and one second later."""
    d = tmp_path_factory.mktemp("cosign")
    recipe, keys = world.recipes["1.0.0"], world.keys
    both, only_a, later = d / "ab.tar", d / "a.tar", d / "later.tar"
    run_all(
        partial(build, recipe, both, [keys["a"], keys["b"]], epoch=world.epoch),
        partial(build, recipe, only_a, [keys["a"]], epoch=world.epoch),
        partial(build, recipe, later, [keys["a"], keys["b"]], epoch=world.epoch + 1),
    )
    signed_later = d / "a-then-b.tar"
    shutil.copyfile(only_a, signed_later)
    ok(builder("sign", signed_later, "--key", keys["b"]))
    return {"ab": both, "a": only_a, "a_then_b": signed_later, "later": later}


def test_build_is_deterministic(world: World, cosigned: dict[str, Path]) -> None:
    assert cosigned["ab"].read_bytes() == world.bundles["1.0.0"].read_bytes()


def test_build_depends_on_source_date_epoch(world: World, cosigned: dict[str, Path]) -> None:
    out = cosigned["later"]
    assert out.read_bytes() != world.bundles["1.0.0"].read_bytes()
    assert out.stat().st_size == world.bundles["1.0.0"].stat().st_size


def test_sign_later_equals_signing_at_build(cosigned: dict[str, Path]) -> None:
    assert cosigned["a_then_b"].read_bytes() == cosigned["ab"].read_bytes()
    assert cosigned["a"].read_bytes() != cosigned["ab"].read_bytes()


def _head(path: Path) -> tuple[int, int]:
    limits = Limits()
    with path.open("rb") as fh:
        head = read_head(open_bundle(fh, limits), limits)
    return head.signature_offset, len(head.signature_block)


def test_sign_rewrites_only_the_signature_block(
    world: World, cosigned: dict[str, Path], tmp_path: Path
) -> None:
    bundle = tmp_path / "b.tar"
    shutil.copyfile(cosigned["a"], bundle)
    offset, length = _head(bundle)
    before = bundle.read_bytes()
    ok(builder("sign", bundle, "--key", world.keys["b"]))
    after = bundle.read_bytes()
    assert len(after) == len(before)
    assert after[:offset] == before[:offset]
    assert after[offset + length :] == before[offset + length :]
    assert after[offset : offset + length] != before[offset : offset + length]
    assert _head(bundle) == (offset, length)
    # Signing again with a key already present changes nothing at all.
    ok(builder("sign", bundle, "--key", world.keys["b"]))
    assert bundle.read_bytes() == after


def test_bundle_is_a_standard_tar(world: World, tmp_path: Path) -> None:
    bundle = world.bundles["1.0.0"]
    listing = subprocess.run(
        ["tar", "--numeric-owner", "-tvf", bundle], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    names = [line.split()[-1] for line in listing]
    assert names == [
        "format",
        "manifest.json",
        "signatures.json",
        "payload/model/model.bin",
        "payload/recipe.toml",
        "payload/sbom.cdx.json",
    ]
    for line in listing:
        perms, owner = line.split()[:2]
        assert perms == "-rw-r--r--", line
        assert owner == "0/0", line
        assert "1970-01-01 00:00" in line, line
    with tarfile.open(bundle) as tar:
        for member in tar.getmembers():
            assert member.isreg()
            assert (member.mtime, member.uid, member.gid, member.mode) == (0, 0, 0, 0o644)
            assert (member.uname, member.gname) == ("", "")
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["tar", "-xf", bundle, "-C", dest], check=True)
    assert (dest / "format").read_bytes() == b"airgap-appliance-bundle 1\n"
    for entry in ("model/model.bin", "recipe.toml"):
        source = world.source_file("1.0.0", entry)
        assert (dest / "payload" / entry).read_bytes() == source.read_bytes()


def test_tiny_model_bundle(tmp_path: Path, world: World) -> None:
    """The embedded default model (a generated GGUF) goes into a bundle like any file."""
    pytest.importorskip("gguf")
    model = tmp_path / "models" / "tiny.gguf"
    model.parent.mkdir()
    ok(builder("tiny-model", model, "--seed", "3"))
    assert model.read_bytes()[:4] == b"GGUF"
    recipe = write_recipe(tmp_path, version="0.1.0", model_path="models/tiny.gguf")
    out = tmp_path / "tiny.tar"
    build(recipe, out, world.signers, epoch=world.epoch)
    limits = Limits()
    with out.open("rb") as fh:
        manifest = json.loads(read_head(open_bundle(fh, limits), limits).manifest_bytes)
    assert manifest["model"] == {"path": "model/tiny.gguf"}
    assert manifest["entries"][0]["size"] == model.stat().st_size
    # The memory table of the GGUF, for the recipe's context and the runtime's parallel.
    table = manifest["requires"]["memory_estimate"]
    assert (table["context_size"], table["parallel"], table["kv_type"]) == (256, 4, "f16")
    assert manifest["requires"]["memory_bytes"] == table["total_bytes"]
    assert "memory   " in ok(builder("inspect", out)).out


# -- inspect ----------------------------------------------------------------------------------


def test_inspect_text_and_json(world: World) -> None:
    bundle = world.bundles["2.0.0"]
    limits = Limits()
    with bundle.open("rb") as fh:
        manifest = json.loads(read_head(open_bundle(fh, limits), limits).manifest_bytes)
    as_json, as_text = run_all(
        partial(builder, "inspect", bundle, "--json", "--root", world.root_json),
        partial(builder, "inspect", bundle, "--root", world.root_json),
    )
    info = ok(as_json).json()
    signer_ids = sorted(load_public_key(Path(f"{k}.pub")).keyid for k in world.signers)
    assert info.pop("signatures") == signer_ids
    assert info.pop("verified_signers") == signer_ids
    assert info == manifest
    text = ok(as_text).out
    assert "bundle   demo 2.0.0" in text
    assert "verified 2 signature(s)" in text
    assert "model/model.bin" in text
    assert "recipe.toml" in text


def test_inspect_against_root_below_threshold(world: World, cosigned: dict[str, Path]) -> None:
    assert_error(
        builder("inspect", cosigned["a"], "--root", world.root_json), 3,
        "1 of 2 required signatures",
    )  # fmt: skip


# -- recipe errors ----------------------------------------------------------------------------


def _build_fails(world: World, recipe: Path, out: Path) -> Result:
    env = clean_env(SOURCE_DATE_EPOCH=str(world.epoch))
    return builder("build", recipe, "--key", world.keys["a"], "-o", out, env=env)


def test_recipe_errors_are_one_line_exit_2(tmp_path: Path, world: World) -> None:
    cases: dict[str, tuple[Path, tuple[str, ...]]] = {}

    recipe = write_recipe(
        tmp_path / "unknown", version="1.0.0", model=b"m", extra="gpu_layer = 1\n"
    )
    cases["unknown"] = (recipe, ("unknown key 'runtime.gpu_layer'", str(recipe)))
    recipe = write_recipe(tmp_path / "missing", version="1.0.0", model=b"m")
    recipe.write_text(recipe.read_text().replace('version = "1.0.0"\n', ""))
    cases["missing"] = (recipe, ("missing key 'bundle.version'", str(recipe)))
    recipe = write_recipe(tmp_path / "no-model", version="1.0.0", model_path="models/absent.gguf")
    cases["no-model"] = (recipe, ("absent.gguf", "does not exist"))
    recipe = tmp_path / "broken.toml"
    recipe.write_text("[bundle\nname = 1\n")
    cases["not-toml"] = (recipe, ("not valid TOML", str(recipe)))
    cases["unreadable"] = (tmp_path / "absent.toml", ("cannot read recipe",))
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "real.bin").write_bytes(random_bytes(1000, seed=5))
    (tmp_path / "link" / "model.bin").symlink_to(tmp_path / "link" / "real.bin")
    cases["symlink"] = (write_recipe(tmp_path / "link", version="1.0.0"), ("symbolic link",))
    cases["bad-name"] = (
        write_recipe(tmp_path / "name", version="1.0.0", model=b"m", name="Demo!"),
        ("bundle.name",),
    )

    results = run_all(
        *(partial(_build_fails, world, r, tmp_path / f"{n}.tar") for n, (r, _) in cases.items())
    )
    for (name, (_, fragments)), result in zip(cases.items(), results, strict=True):
        try:
            assert_error(result, 2, *fragments)
        except AssertionError as exc:
            raise AssertionError(f"recipe case {name!r}: {exc}") from None
    assert list(tmp_path.rglob("*.tar")) == []
    assert list(tmp_path.rglob(".*partial")) == []


def test_recipe_bad_version(tmp_path: Path, world: World) -> None:
    recipe = write_recipe(tmp_path, version="not a version", model=b"m")
    result = _build_fails(world, recipe, tmp_path / "out.tar")
    assert_error(result, 2, str(recipe), "bundle.version", "not a valid version")
