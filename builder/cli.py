"""``appliance-builder``: the online half's command line (docs/cli.md)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NoReturn

import click

from appliance.console import ByteProgress, emit_json, parse_cli_time, run_cli
from builder.keyfiles import load_public_key, load_signing_key, write_key_pair
from builder.pack import DEFAULT_SIGNATURE_SPACE, cosign_in_place
from builder.tinymodel import write_tiny_llama
from signing.bundle import Limits, open_bundle, read_head
from signing.canonical import format_time
from signing.errors import FormatError, InputError
from signing.keys import PublicKey, SigningKey
from signing.manifest import BundleManifest, decode_signature_block
from signing.metadata import (
    BUNDLE_ROLE,
    ROOT_ROLE,
    Role,
    Root,
    SignedRoot,
    sign_root,
    verify_root,
    verify_rotation,
    verify_threshold,
)

_PASSPHRASE_ENV = "APPLIANCE_KEY_PASSPHRASE"  # noqa: S105 - a variable name
_passphrase_option = click.option(
    "--passphrase",
    envvar=_PASSPHRASE_ENV,
    show_envvar=True,
    help="Passphrase of the private key(s). Never prompted for.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Build and sign bundles for isolated hosts."""


@cli.command()
@click.argument("keyfile", type=click.Path(path_type=Path))
@_passphrase_option
def keygen(keyfile: Path, passphrase: str | None) -> None:
    """Write a new Ed25519 key to KEYFILE (mode 0600) and KEYFILE.pub."""
    key = SigningKey.generate()
    # An empty passphrase given on purpose is refused by write_key_pair, never taken as "none".
    write_key_pair(keyfile, key, passphrase.encode("utf-8") if passphrase is not None else None)
    click.echo(f"wrote {keyfile} and {keyfile}.pub; keyid {key.keyid}")


@cli.group()
def root() -> None:
    """Create, co-sign and check root metadata (keys, roles, thresholds)."""


@root.command("create")
@click.option(
    "--root-key",
    "root_keys",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Root key: a private key signs now, a .pub is listed to sign later.",
)
@click.option(
    "--bundle-key",
    "bundle_keys",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Public key allowed to sign bundles.",
)
@click.option(
    "--threshold",
    type=click.IntRange(min=1),
    required=True,
    help="Bundle signatures required (M of N).",
)
@click.option(
    "--root-threshold",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Root signatures required to trust the root or a rotation.",
)
@click.option("--expires", help="Expiry, YYYY-MM-DDTHH:MM:SSZ (default: one year from now).")
@click.option(
    "--previous",
    type=click.Path(path_type=Path),
    help="The root this one rotates from: version becomes its version + 1.",
)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@_passphrase_option
def root_create(
    root_keys: tuple[Path, ...],
    bundle_keys: tuple[Path, ...],
    threshold: int,
    root_threshold: int,
    expires: str | None,
    previous: Path | None,
    output: Path,
    passphrase: str | None,
) -> None:
    """Create root metadata, signed by every private root key given."""
    publics: dict[str, PublicKey] = {}
    signers: list[SigningKey] = []
    root_ids = []
    for path in root_keys:
        public, private = _load_any_key(path, passphrase)
        publics[public.keyid] = public
        root_ids.append(public.keyid)
        if private is not None:
            signers.append(private)
    bundle_ids = []
    for path in bundle_keys:
        public = load_public_key(path)
        publics[public.keyid] = public
        bundle_ids.append(public.keyid)
    version = 1
    if previous is not None:
        version = SignedRoot.from_bytes(_read(previous)).root.version + 1
    expiry = parse_cli_time(expires) or _one_year_from_now()
    if expiry <= datetime.now(UTC):
        raise InputError(f"--expires {format_time(expiry)} is in the past")
    try:
        new_root = Root(
            version=version,
            expires=expiry,
            keys=publics,
            roles={
                ROOT_ROLE: Role(keyids=tuple(sorted(set(root_ids))), threshold=root_threshold),
                BUNDLE_ROLE: Role(keyids=tuple(sorted(set(bundle_ids))), threshold=threshold),
            },
        )
    except FormatError as exc:  # e.g. a threshold above the number of keys: bad arguments
        raise InputError(exc.diagnostics()) from None
    signed = sign_root(new_root, signers)
    output.write_bytes(signed.to_bytes())
    click.echo(f"wrote root version {version} to {output}; fingerprint {signed.fingerprint}")
    click.echo(f"signed by {len(signers)} of {root_threshold} required root keys", err=True)


@root.command("sign")
@click.argument("root_json", type=click.Path(path_type=Path))
@click.option("--key", "keys", multiple=True, required=True, type=click.Path(path_type=Path))
@_passphrase_option
def root_sign(root_json: Path, keys: tuple[Path, ...], passphrase: str | None) -> None:
    """Add signatures to ROOT_JSON in place (e.g. the old root keys of a rotation)."""
    signed = SignedRoot.from_bytes(_read(root_json))
    for path in keys:
        signed = signed.with_signature(load_signing_key(path, _encode(passphrase)))
    root_json.write_bytes(signed.to_bytes())
    click.echo(f"{root_json}: {len(signed.signatures)} signature(s)")


@root.command("verify")
@click.argument("root_json", type=click.Path(path_type=Path))
@click.option(
    "--previous",
    type=click.Path(path_type=Path),
    help="Check ROOT_JSON as a rotation from this trusted root.",
)
def root_verify(root_json: Path, previous: Path | None) -> None:
    """Check that ROOT_JSON is self-signed (and a valid rotation of --previous)."""
    signed = SignedRoot.from_bytes(_read(root_json))
    if previous is not None:
        verify_rotation(SignedRoot.from_bytes(_read(previous)).root, signed)
    verify_root(signed)
    click.echo(f"OK root version {signed.root.version}, fingerprint {signed.fingerprint}")


@root.command("fingerprint")
@click.argument("root_json", type=click.Path(path_type=Path))
def root_fingerprint(root_json: Path) -> None:
    """Print ROOT_JSON's fingerprint, to give to host operators out of band."""
    click.echo(SignedRoot.from_bytes(_read(root_json)).fingerprint)


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option(
    "--key",
    "keys",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Private bundle key to sign with (repeat for M-of-N).",
)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option(
    "--signature-space",
    type=click.IntRange(min=512),
    default=DEFAULT_SIGNATURE_SPACE,
    show_default=True,
    help="Bytes reserved for signatures, so co-signing never moves the payload.",
)
@click.option(
    "--lock",
    "lock_first",
    is_flag=True,
    help="Lock the environment first if it has no lock yet (else an unlocked one is refused).",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1, max=64),
    default=8,
    show_default=True,
    help="Parallel downloads.",
)
@click.option(
    "--eval-python",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="AIRGAP_APPLIANCE_EVAL_PYTHON",
    show_envvar=True,
    help="Interpreter whose llama-cpp-python measures a quantised model's KL-divergence "
    "(default: this one).",
)
@click.option(
    "--base",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Build a delta: carry only what this earlier bundle (or its manifest.json) lacks.",
)
@_passphrase_option
def build(
    recipe: Path,
    keys: tuple[Path, ...],
    output: Path,
    signature_space: int,
    lock_first: bool,
    jobs: int,
    eval_python: Path | None,
    base: Path | None,
    passphrase: str | None,
) -> None:
    """Build a deterministic bundle from RECIPE: lock, fetch by hash, sign, write one tar."""
    # Imported here: the lockers, fetcher and hub client cost 0.4 s that keygen, sign and
    # inspect should not pay.
    from builder.build import build_bundle  # noqa: PLC0415

    signing_keys = [load_signing_key(k, _encode(passphrase)) for k in keys]
    manifest = build_bundle(
        recipe,
        output,
        signing_keys,
        signature_space=signature_space,
        lock=lock_first,
        jobs=jobs,
        eval_python=eval_python,
        base=base,
        say=_say,
        progress_factory=ByteProgress,
    )
    click.echo(
        f"wrote {output}: {manifest.name} {manifest.version}, {len(manifest.entries)} "
        f"files, {manifest.payload_size} bytes, {len(signing_keys)} signature(s)"
    )
    if manifest.delta is not None:
        from builder.delta import describe  # noqa: PLC0415 - as build_bundle

        click.echo(describe(manifest))


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
def lock(recipe: Path) -> None:
    """Resolve RECIPE's [environment] for its target platform and Python into a hashed lock.

    pip: uv pip compile, written as pylock.toml; conda: conda-lock when conda, mamba or
    micromamba is on PATH, else py-rattler, written as conda-lock.yml. Commit the lock.
    """
    from builder.environment import lock_environment  # noqa: PLC0415 - as in build
    from builder.recipe import load_recipe  # noqa: PLC0415

    parsed, _ = load_recipe(recipe)
    path = lock_environment(recipe, parsed)
    click.echo(f"wrote {os.path.normpath(path)}")


def _say(message: str) -> None:
    click.echo(message, err=True)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", "keys", multiple=True, required=True, type=click.Path(path_type=Path))
@_passphrase_option
def sign(bundle: Path, keys: tuple[Path, ...], passphrase: str | None) -> None:
    """Co-sign BUNDLE in place; the payload is not rewritten."""
    signing_keys = [load_signing_key(k, _encode(passphrase)) for k in keys]
    manifest, signers = cosign_in_place(bundle, signing_keys)
    click.echo(
        f"{bundle}: {manifest.name} {manifest.version} (manifest sha256 "
        f"{manifest.sha256()[:16]}) now signed by {len(signers)} key(s)"
    )


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--root",
    "root_json",
    type=click.Path(path_type=Path),
    help="Also check the signatures against this root's bundle role.",
)
@click.option("--json", "as_json", is_flag=True)
def inspect(bundle: Path, root_json: Path | None, as_json: bool) -> None:
    """Show a bundle's manifest and signers (reads only the head, not the payload)."""
    limits = Limits()
    try:
        fh = bundle.open("rb")
    except OSError as exc:
        raise InputError(f"cannot open {bundle}: {exc.strerror}") from None
    with fh:
        head = read_head(open_bundle(fh, limits), limits)
    manifest = BundleManifest.from_bytes(head.manifest_bytes)
    signatures = decode_signature_block(head.signature_block)
    info = manifest.to_dict() | {"signatures": sorted(s.keyid for s in signatures)}
    if root_json is not None:
        trusted = SignedRoot.from_bytes(_read(root_json)).root
        info["verified_signers"] = sorted(
            verify_threshold(
                head.manifest_bytes,
                signatures,
                keys=trusted.keys,
                role=trusted.roles[BUNDLE_ROLE],
                role_name=BUNDLE_ROLE,
                what="bundle manifest",
            )
        )
    if as_json:
        emit_json(info)
        return
    click.echo(f"bundle   {manifest.name} {manifest.version}")
    click.echo(f"created  {format_time(manifest.created)}  expires {format_time(manifest.expires)}")
    click.echo(f"runtime  {dict(manifest.runtime)}")
    click.echo(f"model    {manifest.model_path}")
    if manifest.model_source is not None:
        src = manifest.model_source
        click.echo(f"  from   {src.repo_id} at commit {src.commit}")
    if manifest.model_pipeline is not None:
        click.echo(f"  made   {manifest.model_pipeline.summary()}")
    if manifest.requires is not None and manifest.requires.memory_estimate is not None:
        click.echo(f"memory   {manifest.requires.memory_estimate.summary()}")
    env = manifest.environment
    if env is not None:
        packages = [e for e in manifest.entries if e.kind == "package"]
        click.echo(
            f"env      {env.type} for {env.platform}, Python {env.python}: {len(packages)} "
            f"package(s) in {env.packages}, installed from {env.install_list}"
        )
        if env.smoke_imports:
            click.echo(f"  smoke  import {', '.join(env.smoke_imports)}")
    for e in manifest.entries:
        if e.kind in ("lock", "sbom"):
            click.echo(f"{e.kind:<8} {e.path}  sha256 {e.sha256[:16]}")
    if manifest.delta is not None:
        from builder.delta import describe  # noqa: PLC0415 - only for deltas

        click.echo(f"delta    {describe(manifest).removeprefix('delta ')}")
    click.echo(f"signed   {len(signatures)}: {', '.join(s.keyid[:12] for s in signatures)}")
    if "verified_signers" in info:
        click.echo(f"verified {len(info['verified_signers'])} signature(s) against {root_json}")
    skipped = manifest.delta.not_carried if manifest.delta is not None else frozenset()
    for e in manifest.entries:
        where = "  (from base)" if e.path in skipped else ""
        click.echo(f"  {e.sha256[:12]}  {e.size:>12}  {e.kind:<7} {e.path}{where}")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--size",
    "size_text",
    default="4095M",
    show_default=True,
    help="Part size, binary units (4095M fits FAT32; 4G does not: FAT32 stops 1 byte short).",
)
@click.option(
    "--parity",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Parity parts (zfec): any this many lost or corrupt parts can be rebuilt.",
)
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False), required=True)
def split(bundle: Path, size_text: str, parity: int, output: Path) -> None:
    """Split BUNDLE into parts for FAT32 sticks, DVDs or a data diode, with a part index.

    Split after the last co-signature: signing changes the first part. The host installs
    straight from the parts ('appliance install DIR'), never joining them on disk.
    """
    from builder.split import FAT32_LIMIT, parse_size, split_bundle  # noqa: PLC0415

    part_size = parse_size(size_text)
    with ByteProgress() as progress:
        progress.start(bundle.stat().st_size if bundle.is_file() else 0, f"splitting {bundle.name}")
        index = split_bundle(
            bundle, output, part_size=part_size, parity=parity, progress=progress.advance
        )
    if index.parts[0].size > FAT32_LIMIT:
        _say("note: parts of 4 GiB or more do not fit on FAT32; use --size 4095M for FAT32 media")
    click.echo(
        f"wrote {len(index.parts)} part(s) of at most {index.part_size} bytes"
        + (f" and {index.parity_count} parity part(s)" if index.parity_count else "")
        + f" and {index.index_file} to {output}: {index.name} {index.version}"
    )


@cli.command("convert-lora")
@click.argument("adapter", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--base",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The base model's Hugging Face folder (only its config.json is read).",
)
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option(
    "--outtype",
    type=click.Choice(["f32", "f16", "bf16", "q8_0"]),
    default="f16",
    show_default=True,
)
def convert_lora(adapter: Path, base: Path, output: Path, outtype: str) -> None:
    """Convert the PEFT LoRA folder ADAPTER (adapter_config.json, adapter_model.safetensors)
    to a GGUF LoRA adapter with llama.cpp's convert_lora_to_gguf.py, for a recipe's
    [[adapters]]. Offline: the hub is never asked."""
    from builder.lora import convert_lora as convert  # noqa: PLC0415 - the converter venv

    done = convert(adapter, base=base, out=output, outtype=outtype, say=_say)
    click.echo(
        f"wrote {done.path}: GGUF LoRA adapter, {done.tensors} tensors, alpha {done.lora_alpha:g}"
        f"\nsha256 {done.sha256}\n"
        f"for a recipe: [[adapters]] path = {json.dumps(str(done.path))}"
    )


@cli.command("tiny-model")
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--embedding", type=click.IntRange(min=8), default=64, show_default=True)
@click.option("--layers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--heads", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--feed-forward", type=click.IntRange(min=8), default=128, show_default=True)
@click.option("--context", type=click.IntRange(min=16), default=256, show_default=True)
def tiny_model(
    output: Path,
    seed: int,
    embedding: int,
    layers: int,
    heads: int,
    feed_forward: int,
    context: int,
) -> None:
    """Generate a llama GGUF with random weights (default: the tiny embedded demo model).

    Larger shapes make benchmark models: --embedding 768 --layers 12 --feed-forward 2048 is
    about 85M parameters.
    """
    if embedding % heads:
        raise InputError("--embedding must be a multiple of --heads")
    write_tiny_llama(
        output,
        n_embd=embedding,
        n_layer=layers,
        n_head=heads,
        n_ff=feed_forward,
        context=context,
        seed=seed,
    )
    click.echo(f"wrote {output} ({output.stat().st_size} bytes)")


@cli.command()
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("dist"),
    show_default=True,
)
@click.option("--onefile", is_flag=True, help="One executable instead of one folder (see docs).")
def freeze(output: Path, onefile: bool) -> None:
    """Build the standalone `appliance` program (PyInstaller; docs/adr/0018)."""
    from builder.freeze import freeze as freeze_program  # noqa: PLC0415
    from builder.freeze import handover_text  # noqa: PLC0415

    click.echo(handover_text(freeze_program(output, onefile=onefile)))


@cli.group()
def export() -> None:
    """Hand a recipe's pinned packages to another installer."""


@export.command("constructor")
@click.argument("recipe", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False), required=True)
def export_constructor(recipe: Path, output: Path) -> None:
    """Write construct.yaml and an @EXPLICIT lock with sha256 for RECIPE's conda environment."""
    from builder.constructor import export_constructor as export_files  # noqa: PLC0415

    for path in export_files(recipe, output):
        click.echo(f"wrote {path}")


def _load_any_key(path: Path, passphrase: str | None) -> tuple[PublicKey, SigningKey | None]:
    if b"PRIVATE KEY" in _read(path):
        private = load_signing_key(path, _encode(passphrase))
        return private.public_key, private
    return load_public_key(path), None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None


def _encode(passphrase: str | None) -> bytes | None:
    return passphrase.encode("utf-8") if passphrase else None


def _one_year_from_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0) + timedelta(days=365)


def main() -> NoReturn:
    run_cli(cli, "appliance-builder")
