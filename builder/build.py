"""From a recipe to a signed, deterministic bundle.tar.

The creation time comes from ``SOURCE_DATE_EPOCH`` when it is set (the reproducible-builds
convention), so that the same recipe, inputs and time give byte-identical bundles; see
docs/adr/0003-deterministic-bundles.md.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from appliance.console import Progress
from builder.adapters import adapter_files, bind_adapters
from builder.delta import plan_delta, read_base
from builder.environment import prepare_environment, resolve_model
from builder.evalset import evaluation_payload
from builder.hostreqs import host_requirements
from builder.memtable import model_memory
from builder.pack import (
    DEFAULT_SIGNATURE_SPACE,
    PayloadFile,
    hash_file,
    sign_manifest,
    write_bundle,
)
from builder.recipe import load_recipe
from builder.sbom import FileRecord, make_sbom
from signing.chunks import CHUNK_BYTES
from signing.errors import InputError
from signing.keys import SigningKey
from signing.manifest import BundleManifest, Entry, check_relative_path
from signing.provenance import SBOM_ENTRY

RECIPE_ENTRY = "recipe.toml"
MODEL_DIR = "model"


class ByteBar(Progress, Protocol):
    """The shared progress protocol (appliance.console.Progress) as a display that is opened
    and closed around the write (appliance.console.ByteProgress)."""

    def __enter__(self) -> ByteBar: ...
    def __exit__(self, *_: object) -> None: ...


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass


def build_time() -> datetime:
    """SOURCE_DATE_EPOCH if set, else now; always whole seconds, UTC."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        return datetime.now(UTC).replace(microsecond=0)
    try:
        return datetime.fromtimestamp(int(epoch), UTC)
    except (ValueError, OverflowError):
        raise InputError(f"SOURCE_DATE_EPOCH={epoch!r} is not a Unix time") from None


def collect_payload(
    recipe_path: Path, model_src: Path, digests: Mapping[str, str] | None = None
) -> tuple[list[PayloadFile], str]:
    """The recipe and model files a recipe puts in the bundle, and where the model lives.

    ``digests`` are the sha256 of model files (relative to a model directory) known already.
    """
    known = digests or {}
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
                files.append(PayloadFile(f"{MODEL_DIR}/{rel}", path, "model", known.get(rel)))
            elif not path.is_dir():
                raise InputError(f"model directory holds a special file: {path}")
    else:
        raise InputError(f"model path {model_src} does not exist")
    files.sort(key=lambda f: f.entry_path)
    return files, model_path


def build_bundle(
    recipe_path: Path,
    out: Path,
    keys: Sequence[SigningKey],
    *,
    signature_space: int = DEFAULT_SIGNATURE_SPACE,
    progress_factory: Callable[[], ByteBar] | None = None,
    lock: bool = False,
    jobs: int = 8,
    eval_python: Path | None = None,
    base: Path | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> BundleManifest:
    """Build RECIPE into ``out``; with ``base`` (a bundle or its manifest), a delta bundle
    that carries only what the base does not have (builder.delta)."""
    recipe, _ = load_recipe(recipe_path)
    base_bundle = read_base(base) if base is not None else None
    created = build_time()
    with tempfile.TemporaryDirectory(prefix="appliance-build-") as tmp:
        work = Path(tmp)
        model = resolve_model(recipe, work=work, eval_python=eval_python, say=say)
        files, model_path = collect_payload(recipe_path, model.source_path, model.digests)
        lora = adapter_files(recipe, model_path)  # adapters/ (builder.adapters)
        files += lora
        if recipe.program is not None:  # appliance self update (appliance.selfupdate)
            program = Path(recipe.program.path)
            if not program.is_file():
                raise InputError(f"[program] {program} is not a file (appliance-builder freeze)")
            files.append(PayloadFile(f"program/{program.name}", program, "program"))
        files += evaluation_payload(recipe.evaluation, work=work)  # eval/ (builder.evalset)
        env = prepare_environment(recipe_path, recipe, work=work, lock=lock, jobs=jobs, say=say)
        if env is not None:
            files += env.files
        records = {f.entry_path: _record(f) for f in files}
        adapters = bind_adapters(recipe, lora, records, model_path)
        sbom = work / SBOM_ENTRY
        sbom.write_bytes(
            make_sbom(
                name=recipe.bundle.name,
                version=recipe.bundle.version,
                created=created,
                model_path=model_path,
                model_files=[r for f, r in records.items() if _under(f, model_path)],
                model_source=model.source,
                model_pipeline=model.pipeline,
                environment=(env.spec.type, env.spec.platform, env.spec.python) if env else None,
                artifacts=env.artifacts if env else [],
                locks=[records[f.entry_path] for f in files if f.kind == "lock"],
            )
        )
        sbom_file = PayloadFile(SBOM_ENTRY, sbom, "sbom")
        files.append(sbom_file)
        records[SBOM_ENTRY] = _record(sbom_file)
        delta = None
        if base_bundle is not None:
            delta, patch_files = plan_delta(
                base_bundle,
                name=recipe.bundle.name,
                model_path=model_path,
                files=files,
                entries={f.entry_path: _entry(f, records[f.entry_path]) for f in files},
                work=work,
                say=say,
            )
            files += patch_files
            records |= {f.entry_path: _record(f) for f in patch_files}
        files.sort(key=lambda f: f.entry_path)
        for f in files:
            check_relative_path(f.entry_path, what="payload file")
        requires = host_requirements(
            recipe,
            model_bytes=sum(r.size for p, r in records.items() if _under(p, model_path)),
            payload_bytes=sum(r.size for r in records.values()),
            packages=[f for f in files if f.kind == "package"],
            artifacts=env.artifacts if env else [],
            memory_estimate=model_memory(recipe, model.source_path, say=say),
        )
        manifest = BundleManifest(
            name=recipe.bundle.name,
            version=recipe.bundle.version,
            created=created,
            expires=created + timedelta(days=recipe.bundle.valid_days),
            runtime=recipe.runtime_settings(),
            model_path=model_path,
            entries=tuple(_entry(f, records[f.entry_path]) for f in files),
            environment=env.spec if env else None,
            model_source=model.source,
            requires=requires,
            model_pipeline=model.pipeline,
            delta=delta,
            model_adapters=adapters,
        )
        signatures = sign_manifest(manifest.to_bytes(), keys)
        with progress_factory() if progress_factory else _NoBar() as bar:
            bar.start(manifest.carried_size, "writing bundle")
            write_bundle(
                out,
                manifest,
                {f.entry_path: f.source for f in files},
                signatures,
                signature_space=signature_space,
                progress=bar.advance,
            )
    return manifest


def _entry(f: PayloadFile, r: FileRecord) -> Entry:
    return Entry(path=f.entry_path, size=r.size, sha256=r.sha256, kind=f.kind, chunks=r.chunks)


def _record(f: PayloadFile) -> FileRecord:
    """Size, sha256 and chunk hashes of a payload file: read and hashed, unless its hash is
    known already and it is no larger than one chunk (signing.chunks)."""
    try:
        size = f.source.stat().st_size
    except OSError as exc:
        raise InputError(f"cannot read {f.source}: {exc.strerror}") from None
    if f.sha256 is not None and size <= CHUNK_BYTES:
        return FileRecord(f.entry_path, size, f.sha256)
    size, sha256, chunks = hash_file(f.source)
    if f.sha256 is not None and sha256 != f.sha256:
        raise InputError(f"{f.source} changed after it was checked (sha256 {sha256[:16]}...)")
    return FileRecord(f.entry_path, size, sha256, chunks)


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory + "/")
