"""From a recipe to a signed, deterministic bundle.tar.

The creation time comes from ``SOURCE_DATE_EPOCH`` when it is set (the reproducible-builds
convention), so that the same recipe, inputs and time give byte-identical bundles; see
docs/adr/0003-deterministic-bundles.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from builder.pack import DEFAULT_SIGNATURE_SPACE, hash_file, sign_manifest, write_bundle
from builder.recipe import Recipe, load_recipe
from signing.errors import InputError
from signing.keys import SigningKey
from signing.manifest import BundleManifest, Entry, check_relative_path

RECIPE_ENTRY = "recipe.toml"
MODEL_DIR = "model"


@dataclass(frozen=True)
class PayloadFile:
    entry_path: str
    source: Path
    kind: str


def build_time() -> datetime:
    """SOURCE_DATE_EPOCH if set, else now; always whole seconds, UTC."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        return datetime.now(UTC).replace(microsecond=0)
    try:
        return datetime.fromtimestamp(int(epoch), UTC)
    except (ValueError, OverflowError):
        raise InputError(f"SOURCE_DATE_EPOCH={epoch!r} is not a Unix time") from None


def collect_payload(recipe_path: Path, recipe: Recipe) -> tuple[list[PayloadFile], str]:
    """The files a recipe puts in the bundle, and where the model lives inside it."""
    base = recipe_path.parent
    if recipe.model.path is None:
        raise InputError("hub models are fetched by builder.environment, not collect_payload")
    model_src = base / recipe.model.path
    files = [PayloadFile(RECIPE_ENTRY, recipe_path, "recipe")]
    if model_src.is_symlink():
        raise InputError(f"model path {model_src} is a symbolic link; give the real path")
    if model_src.is_file():
        model_path = f"{MODEL_DIR}/{model_src.name}"
        files.append(PayloadFile(model_path, model_src, "model"))
    elif model_src.is_dir():
        model_path = MODEL_DIR
        for path in sorted(model_src.rglob("*")):
            rel = path.relative_to(model_src).as_posix()
            if path.is_symlink():
                raise InputError(f"model directory holds a symbolic link: {path}")
            if path.is_file():
                files.append(PayloadFile(f"{MODEL_DIR}/{rel}", path, "model"))
            elif not path.is_dir():
                raise InputError(f"model directory holds a special file: {path}")
    else:
        raise InputError(f"model path {model_src} does not exist")
    for f in files:
        check_relative_path(f.entry_path, what="payload file")
    files.sort(key=lambda f: f.entry_path)
    return files, model_path


def build_bundle(
    recipe_path: Path,
    out: Path,
    keys: Sequence[SigningKey],
    *,
    signature_space: int = DEFAULT_SIGNATURE_SPACE,
    progress: Callable[[int], None] | None = None,
) -> BundleManifest:
    recipe, _ = load_recipe(recipe_path)
    files, model_path = collect_payload(recipe_path, recipe)
    entries = []
    for f in files:
        size, digest = hash_file(f.source)
        entries.append(Entry(path=f.entry_path, size=size, sha256=digest, kind=f.kind))
    created = build_time()
    manifest = BundleManifest(
        name=recipe.bundle.name,
        version=recipe.bundle.version,
        created=created,
        expires=created + timedelta(days=recipe.bundle.valid_days),
        runtime=recipe.runtime_settings(),
        model_path=model_path,
        entries=tuple(entries),
    )
    signatures = sign_manifest(manifest.to_bytes(), keys)
    write_bundle(
        out,
        manifest,
        {f.entry_path: f.source for f in files},
        signatures,
        signature_space=signature_space,
        progress=progress,
    )
    return manifest
