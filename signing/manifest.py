"""The signed bundle manifest and its signature block (docs/bundle-format.md, sections 2 and 3).

Both halves use this module: the builder writes manifests, the appliance verifies them. Parsing
is strict and total: any input either yields a frozen :class:`BundleManifest` or raises
:class:`~signing.errors.FormatError` with one line naming the field.

Total means every field's JSON type is checked before the value is used in any way that
assumes a type: hashed (``in`` a frozenset, a dict key), compared with ``<``, measured with
``len`` or matched by a regex. JSON gives lists and objects where a string was meant, and
``True`` where an integer was meant; each of those must be a FormatError, never a TypeError
(tests/test_parsers_total.py mutates every field of a valid manifest to every JSON type).
Values from the input are quoted through :func:`signing.bounded.quote`, so a refusal stays one
short line whatever the input holds.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final

from packaging.version import Version

from signing.bounded import quote
from signing.canonical import (
    decode_canonical,
    encode_canonical,
    format_time,
    is_int,
    parse_time,
)
from signing.chunks import CHUNK_BYTES, chunk_count
from signing.errors import FormatError
from signing.metadata import Signature, parse_signatures, signatures_to_list
from signing.requirements import HostRequirements

FORMAT_VERSION: Final = 1
MANIFEST_TYPE: Final = "bundle"
ENTRY_KINDS: Final = frozenset({"model", "recipe", "package", "lock", "sbom", "file", "program"})
BACKENDS: Final = frozenset({"llama.cpp", "transformers"})

_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
# Entry paths become tar member names "payload/<path>"; ustar holds at most 255 bytes of name.
MAX_PATH_BYTES: Final = 240
MAX_ENTRIES: Final = 100_000
MAX_VERSION_LENGTH: Final = 64
DTYPES: Final = frozenset({"auto", "float32", "float16", "bfloat16"})
ENV_TYPES: Final = frozenset({"pip", "conda"})
_PLATFORM_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_PYTHON_RE: Final = re.compile(r"3\.[0-9]{1,2}")
_MODULE_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_REPO_ID_RE: Final = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?"
)
_COMMIT_RE: Final = re.compile(r"[0-9a-f]{40}")
_CONVERTER_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}==[0-9][A-Za-z0-9.+!_-]{0,31}")
_QUANT_RE: Final = re.compile(r"[A-Z][A-Z0-9_]{1,15}")
MAX_PIPELINE_INPUTS: Final = 10_000
MAX_ADAPTERS: Final = 64
# The runtime table's keys and their checks; the recipe's [runtime] section mirrors it.
_RUNTIME_INTS: Final = {"context_size": 16, "gpu_layers": -1, "threads": 1}


def check_runtime(runtime: Mapping[str, Any]) -> None:
    """The signed runtime settings: known keys only, each of the right type and range."""
    backend = runtime.get("backend")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise FormatError(f"manifest: runtime.backend must be one of {sorted(BACKENDS)}")
    for key, value in runtime.items():
        if key == "backend":
            continue
        if key in _RUNTIME_INTS:
            if not is_int(value) or value < _RUNTIME_INTS[key]:
                raise FormatError(
                    f"manifest: runtime.{key} must be an integer >= {_RUNTIME_INTS[key]}"
                )
        elif key == "dtype":
            if not isinstance(value, str) or value not in DTYPES:
                raise FormatError(f"manifest: runtime.dtype must be one of {sorted(DTYPES)}")
        else:
            raise FormatError(f"manifest: unknown runtime setting {quote(key)}")


def check_relative_path(path: object, *, what: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path, else raise FormatError.

    Safe means: non-empty components separated by single slashes, none of them ``.`` or
    ``..``, no leading slash, no backslash, no control characters, at most MAX_PATH_BYTES.
    The same rule guards tar member names and manifest entries (defence in depth: a signed
    manifest from a compromised signer still cannot write outside the slot).
    """
    if not isinstance(path, str) or not path:
        raise FormatError(f"{what}: path must be a non-empty string")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise FormatError(f"{what}: path longer than {MAX_PATH_BYTES} bytes")
    if path.startswith("/"):
        raise FormatError(f"{what}: absolute path {quote(path)}")
    if "\\" in path or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise FormatError(f"{what}: path {quote(path)} has a backslash or control character")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise FormatError(f"{what}: path {quote(path)} has an empty, '.' or '..' component")
    return path


@dataclass(frozen=True)
class Entry:
    """One payload file: where it goes in the slot, how big it is, what it hashes to.

    ``chunks`` lists the sha256 of each ``CHUNK_BYTES`` piece of a file larger than one chunk
    (signing.chunks): the host checks those, on every core; ``sha256`` names the whole file.
    Bundles made before chunk hashes have none, and are checked by ``sha256`` alone.
    """

    path: str
    size: int
    sha256: str
    kind: str
    chunks: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "kind": self.kind,
        }
        if self.chunks:
            fields["chunks"] = list(self.chunks)
        return fields

    @classmethod
    def from_dict(cls, value: object, *, what: str) -> Entry:
        obj = _exact_object(
            value, {"path", "size", "sha256", "kind"}, optional={"chunks"}, what=what
        )
        path = check_relative_path(obj["path"], what=what)
        size = obj["size"]
        if not is_int(size) or size < 0:
            raise FormatError(f"{what} {quote(path)}: size must be a non-negative integer")
        digest = obj["sha256"]
        if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
            raise FormatError(f"{what} {quote(path)}: sha256 must be 64 lowercase hex digits")
        kind = obj["kind"]
        if not isinstance(kind, str) or kind not in ENTRY_KINDS:
            raise FormatError(f"{what} {quote(path)}: unknown kind {quote(kind)}")
        chunks = obj.get("chunks", [])
        if not isinstance(chunks, list):
            raise FormatError(f"{what} {quote(path)}: chunks must be a list")
        return cls(path=path, size=size, sha256=digest, kind=kind, chunks=tuple(chunks))

    def __post_init__(self) -> None:
        # Checked here too, so that the builder cannot make what the host would refuse.
        if not isinstance(self.chunks, tuple):
            raise FormatError(f"manifest entry {quote(self.path)}: chunks must be a tuple")
        if not self.chunks:
            return
        expected = chunk_count(self.size) if is_int(self.size) else 0
        if len(self.chunks) != expected:
            raise FormatError(
                f"manifest entry {quote(self.path)}: {len(self.chunks)} chunk hashes for "
                f"{quote(self.size)} bytes, expected {expected} (one per {CHUNK_BYTES} bytes "
                f"above {CHUNK_BYTES})"
            )
        for digest in self.chunks:
            if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
                raise FormatError(
                    f"manifest entry {quote(self.path)}: a chunk hash is not 64 lowercase hex "
                    f"digits"
                )


@dataclass(frozen=True)
class EnvironmentSpec:
    """The signed description of a bundle's package environment (format section 2.3).

    ``install_list`` is the payload entry the host installs from: for ``pip`` a requirements
    file that pins every wheel in the bundle by name, version and sha256; for ``conda`` an
    explicit list of ``<subdir>/<file>#sha256:<hex>`` lines. ``packages`` is the payload
    directory that holds the wheels or the conda packages.
    """

    type: str
    platform: str
    python: str
    install_list: str
    packages: str
    smoke_imports: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        what = "manifest environment"
        # isinstance first: a list or object is unhashable, and ``in`` a frozenset raises
        # TypeError on it (a signed manifest with "type": [] once crashed the installer).
        if not isinstance(self.type, str) or self.type not in ENV_TYPES:
            raise FormatError(f"{what}: type must be one of {sorted(ENV_TYPES)}")
        if not isinstance(self.platform, str) or not _PLATFORM_RE.fullmatch(self.platform):
            raise FormatError(f"{what}: platform {quote(self.platform)} is not a platform tag")
        if not isinstance(self.python, str) or not _PYTHON_RE.fullmatch(self.python):
            raise FormatError(f"{what}: python must look like '3.11', got {quote(self.python)}")
        check_relative_path(self.install_list, what=f"{what} install_list")
        check_relative_path(self.packages, what=f"{what} packages")
        if not isinstance(self.smoke_imports, tuple):
            raise FormatError(f"{what}: smoke_imports must be a tuple of module names")
        for module in self.smoke_imports:
            if not isinstance(module, str) or not _MODULE_RE.fullmatch(module):
                raise FormatError(f"{what}: smoke import {quote(module)} is not a module name")

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "platform": self.platform,
            "python": self.python,
            "install_list": self.install_list,
            "packages": self.packages,
            "smoke_imports": list(self.smoke_imports),
        }

    @classmethod
    def from_dict(cls, value: object) -> EnvironmentSpec:
        obj = _exact_object(
            value,
            {"type", "platform", "python", "install_list", "packages", "smoke_imports"},
            what="manifest environment",
        )
        imports = obj["smoke_imports"]
        if not isinstance(imports, list):
            raise FormatError("manifest environment: smoke_imports must be a list")
        return cls(
            type=obj["type"],
            platform=obj["platform"],
            python=obj["python"],
            install_list=obj["install_list"],
            packages=obj["packages"],
            smoke_imports=tuple(imports),
        )


@dataclass(frozen=True)
class ModelSource:
    """Where the builder took the model from, when it came from a model hub: the repo and
    the commit the revision resolved to (a branch name is never recorded, only its sha)."""

    repo_id: str
    commit: str

    def __post_init__(self) -> None:
        if not isinstance(self.repo_id, str) or not _REPO_ID_RE.fullmatch(self.repo_id):
            raise FormatError(f"manifest model.source: bad repo_id {quote(self.repo_id)}")
        if not isinstance(self.commit, str) or not _COMMIT_RE.fullmatch(self.commit):
            raise FormatError("manifest model.source: commit must be 40 lowercase hex digits")

    def to_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "commit": self.commit}


@dataclass(frozen=True)
class ModelPipeline:
    """How the builder made the bundle's GGUF from a Hugging Face checkpoint (builder.convert):
    the converter (llama-cpp-python's sdist, by version and sha256), the quantisation type, the
    sha256 of every input file (the source revision of a local folder; a hub model's commit is
    :class:`ModelSource`) and of the output, and the quality: the mean KL-divergence of the
    quantised model's next-token distribution from the F16 conversion's, in nanonats (signed
    JSON has no floats), over ``kl_tokens`` positions; both None when nothing was quantised."""

    converter: str
    converter_sha256: str
    quantize: str
    inputs: tuple[tuple[str, str], ...]
    output_sha256: str
    kl_nanonats: int | None = None
    kl_tokens: int | None = None

    def __post_init__(self) -> None:
        what = "manifest model.pipeline"
        if not isinstance(self.converter, str) or not _CONVERTER_RE.fullmatch(self.converter):
            raise FormatError(f"{what}: converter {quote(self.converter)} is not name==version")
        for name in ("converter_sha256", "output_sha256"):
            digest = getattr(self, name)
            if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
                raise FormatError(f"{what}: {name} must be 64 lowercase hex digits")
        if not isinstance(self.quantize, str) or not _QUANT_RE.fullmatch(self.quantize):
            raise FormatError(f"{what}: quantize {quote(self.quantize)} is not a GGUF type name")
        if not isinstance(self.inputs, tuple) or not 0 < len(self.inputs) <= MAX_PIPELINE_INPUTS:
            raise FormatError(f"{what}: inputs must hold 1 to {MAX_PIPELINE_INPUTS} files")
        for item in self.inputs:
            if not isinstance(item, tuple) or len(item) != 2:
                raise FormatError(f"{what}: an input must be a (path, sha256) pair")
            check_relative_path(item[0], what=f"{what} input")
            if not isinstance(item[1], str) or not _SHA256_RE.fullmatch(item[1]):
                raise FormatError(f"{what}: input {quote(item[0])}: bad sha256")
        paths = [path for path, _ in self.inputs]
        if paths != sorted(set(paths)):
            raise FormatError(f"{what}: inputs must be sorted by path, without duplicates")
        if (self.kl_nanonats is None) != (self.kl_tokens is None):
            raise FormatError(f"{what}: kl_nanonats and kl_tokens go together")
        if self.kl_nanonats is not None and (not is_int(self.kl_nanonats) or self.kl_nanonats < 0):
            raise FormatError(f"{what}: kl_nanonats must be a non-negative integer")
        if self.kl_tokens is not None and (not is_int(self.kl_tokens) or self.kl_tokens < 1):
            raise FormatError(f"{what}: kl_tokens must be a positive integer")

    def summary(self) -> str:
        """One line for ``inspect`` and ``status``."""
        quality = (
            f"KL {self.kl_nanonats / 1e9:.3g} nats vs F16 over {self.kl_tokens} tokens"
            if self.kl_nanonats is not None
            else "not quantised"
        )
        return (
            f"{self.quantize} by {self.converter} (sdist {self.converter_sha256[:12]}), "
            f"{len(self.inputs)} input file(s), {quality}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "converter": self.converter,
            "converter_sha256": self.converter_sha256,
            "quantize": self.quantize,
            "inputs": [{"path": p, "sha256": d} for p, d in self.inputs],
            "output_sha256": self.output_sha256,
        } | (
            {"kl_nanonats": self.kl_nanonats, "kl_tokens": self.kl_tokens}
            if self.kl_nanonats is not None
            else {}
        )

    @classmethod
    def from_dict(cls, value: object) -> ModelPipeline:
        what = "manifest model.pipeline"
        obj = _exact_object(
            value,
            {"converter", "converter_sha256", "quantize", "inputs", "output_sha256"},
            optional={"kl_nanonats", "kl_tokens"},
            what=what,
        )
        raw = obj["inputs"]
        if not isinstance(raw, list) or len(raw) > MAX_PIPELINE_INPUTS:
            raise FormatError(f"{what}: inputs must be a list of at most {MAX_PIPELINE_INPUTS}")
        inputs = []
        for item in raw:
            entry = _exact_object(item, {"path", "sha256"}, what=f"{what} input")
            inputs.append((entry["path"], entry["sha256"]))
        if ("kl_nanonats" in obj) != ("kl_tokens" in obj):
            raise FormatError(f"{what}: kl_nanonats and kl_tokens go together")
        return cls(
            converter=obj["converter"],
            converter_sha256=obj["converter_sha256"],
            quantize=obj["quantize"],
            inputs=tuple(inputs),
            output_sha256=obj["output_sha256"],
            kl_nanonats=obj.get("kl_nanonats"),
            kl_tokens=obj.get("kl_tokens"),
        )


@dataclass(frozen=True)
class ModelAdapter:
    """A LoRA adapter (GGUF) applied to the model when it is served: an entry of the bundle,
    bound to the sha256 of the base weights it was trained on (format section 2.6)."""

    path: str
    base_sha256: str

    def __post_init__(self) -> None:
        check_relative_path(self.path, what="manifest model.adapters")
        if not isinstance(self.base_sha256, str) or not _SHA256_RE.fullmatch(self.base_sha256):
            raise FormatError(
                f"manifest model.adapters {quote(self.path)}: base_sha256 must be 64 lowercase "
                "hex digits"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "base_sha256": self.base_sha256}


@dataclass(frozen=True)
class DeltaPatch:
    """An entry the host rebuilds from a file of the base slot: ``patch`` (a carried entry,
    signing.patchformat) says which bytes of the base file to copy and which to take from
    ``literal`` (a carried entry); the result must hash to the target entry's digests."""

    path: str
    patch: str
    literal: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "patch": self.patch, "literal": self.literal}


@dataclass(frozen=True)
class DeltaSpec:
    """A delta bundle (format section 2.5): it carries only what its base lacks.

    The manifest's entries still describe the complete new slot. ``reuse`` lists entries that
    are not in the payload: the host takes each from the base slot by its sha256 and checks
    it. ``patches`` lists entries rebuilt from a base file and a carried patch. The base is
    named by its name, version and state sha256 (:meth:`BundleManifest.state_sha256`): only
    a slot with exactly that content will do, whether it came from a complete bundle or from
    a delta.
    """

    base_name: str
    base_version: str
    base_state_sha256: str
    reuse: tuple[str, ...] = ()
    patches: tuple[DeltaPatch, ...] = ()

    def __post_init__(self) -> None:
        what = "manifest delta"
        if not isinstance(self.base_name, str) or not _NAME_RE.fullmatch(self.base_name):
            raise FormatError(f"{what}: base name {quote(self.base_name)} is not a bundle name")
        BundleManifest.parse_version(self.base_version)
        digest = self.base_state_sha256
        if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
            raise FormatError(f"{what}: base state_sha256 must be 64 lowercase hex digits")
        if not isinstance(self.reuse, tuple) or not isinstance(self.patches, tuple):
            raise FormatError(f"{what}: reuse and patches must be lists")
        for path in self.reuse:
            check_relative_path(path, what=f"{what} reuse")
        if list(self.reuse) != sorted(set(self.reuse)):
            raise FormatError(f"{what}: reuse must be sorted, without duplicates")
        for patch in self.patches:
            if not isinstance(patch, DeltaPatch):
                raise FormatError(f"{what}: a patch must be a DeltaPatch")
            for name in (patch.path, patch.patch, patch.literal):
                check_relative_path(name, what=f"{what} patch")
        targets = [p.path for p in self.patches]
        if targets != sorted(set(targets)):
            raise FormatError(f"{what}: patches must be sorted by path, without duplicates")

    @property
    def not_carried(self) -> frozenset[str]:
        """The entries that are not in the payload: reused, or rebuilt from a patch."""
        return frozenset(self.reuse) | {p.path for p in self.patches}

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": {
                "name": self.base_name,
                "version": self.base_version,
                "state_sha256": self.base_state_sha256,
            },
            "reuse": list(self.reuse),
            "patches": [p.to_dict() for p in self.patches],
        }

    @classmethod
    def from_dict(cls, value: object) -> DeltaSpec:
        what = "manifest delta"
        obj = _exact_object(value, {"base", "reuse", "patches"}, what=what)
        base = _exact_object(obj["base"], {"name", "version", "state_sha256"}, what=what)
        if not isinstance(base["version"], str):
            raise FormatError(f"{what}: base version must be a string")
        reuse, patches = obj["reuse"], obj["patches"]
        if not isinstance(reuse, list) or not isinstance(patches, list):
            raise FormatError(f"{what}: reuse and patches must be lists")
        if len(reuse) + len(patches) > MAX_ENTRIES:
            raise FormatError(f"{what}: more than {MAX_ENTRIES} entries")
        parsed = []
        for item in patches:
            fields = _exact_object(item, {"path", "patch", "literal"}, what=f"{what} patch")
            parsed.append(DeltaPatch(fields["path"], fields["patch"], fields["literal"]))
        return cls(
            base_name=base["name"],
            base_version=base["version"],
            base_state_sha256=base["state_sha256"],
            reuse=tuple(reuse),
            patches=tuple(parsed),
        )


@dataclass(frozen=True)
class BundleManifest:
    """What a threshold of bundle keys vouches for: identity, validity and every payload byte."""

    name: str
    version: str
    created: datetime
    expires: datetime
    runtime: Mapping[str, Any]
    model_path: str
    entries: tuple[Entry, ...]
    environment: EnvironmentSpec | None = None
    model_source: ModelSource | None = None
    # What the host must offer (format section 2.4); None in bundles made before it existed.
    requires: HostRequirements | None = None
    # How the model was converted and quantised (builder.convert); None for a ready model.
    model_pipeline: ModelPipeline | None = None
    # A delta bundle's base and what it takes from it (format section 2.5); None: complete.
    delta: DeltaSpec | None = None
    # LoRA adapters applied to the model, each bound to its base weights (section 2.6).
    model_adapters: tuple[ModelAdapter, ...] = ()
    _parsed_version: Version = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Every field is type-checked before use, also when built directly (the builder does),
        # so that no wrong type can reach a regex, a comparison or a hash as a TypeError.
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise FormatError(f"manifest: name {quote(self.name)} must match {_NAME_RE.pattern}")
        object.__setattr__(self, "_parsed_version", self.parse_version(self.version))
        if not isinstance(self.runtime, Mapping):
            raise FormatError("manifest: runtime must be an object")
        object.__setattr__(self, "runtime", MappingProxyType(dict(self.runtime)))
        for when in (self.created, self.expires):
            if not isinstance(when, datetime) or when.utcoffset() is None:
                raise FormatError("manifest: created and expires must be aware datetimes")
        if self.expires <= self.created:
            raise FormatError("manifest: expires must be later than created")
        check_runtime(self.runtime)
        check_relative_path(self.model_path, what="manifest model.path")
        if not isinstance(self.entries, tuple) or not all(
            isinstance(e, Entry) for e in self.entries
        ):
            raise FormatError("manifest: entries must be a tuple of Entry")
        if self.environment is not None and not isinstance(self.environment, EnvironmentSpec):
            raise FormatError("manifest: environment must be an EnvironmentSpec")
        if self.model_source is not None and not isinstance(self.model_source, ModelSource):
            raise FormatError("manifest: model.source must be a ModelSource")
        if self.requires is not None and not isinstance(self.requires, HostRequirements):
            raise FormatError("manifest: requires must be a HostRequirements")
        if self.model_pipeline is not None and not isinstance(self.model_pipeline, ModelPipeline):
            raise FormatError("manifest: model.pipeline must be a ModelPipeline")
        if self.delta is not None and not isinstance(self.delta, DeltaSpec):
            raise FormatError("manifest: delta must be a DeltaSpec")
        _check_entries(self.entries)
        if sum(e.kind == "program" for e in self.entries) > 1:
            raise FormatError("manifest: more than one entry of kind 'program'")
        if self.delta is not None:
            _check_delta(self.delta, self.entries)
        _check_adapters(self.model_adapters, self.entries, self.model_path)
        if not any(
            e.path == self.model_path or e.path.startswith(self.model_path + "/")
            for e in self.entries
        ):
            raise FormatError(f"manifest: model.path {quote(self.model_path)} names no entry")
        if self.environment is not None:
            env = self.environment
            if not any(e.path == env.install_list for e in self.entries):
                raise FormatError(
                    f"manifest: environment install_list {quote(env.install_list)} names no entry"
                )
            needs = self.requires.python if self.requires is not None else None
            if needs is not None and needs != env.python:
                raise FormatError(
                    f"manifest: requires.python {quote(needs)} is not the environment's "
                    f"{quote(env.python)}"
                )

    @property
    def parsed_version(self) -> Version:
        return self._parsed_version

    @staticmethod
    def parse_version(text: str) -> Version:
        """Versions compare as PEP 440 versions ("1.10.0" is newer than "1.9.0")."""
        if not isinstance(text, str):
            raise FormatError("version must be a string")
        if len(text) > MAX_VERSION_LENGTH:
            raise FormatError(f"version is longer than {MAX_VERSION_LENGTH} characters")
        try:
            return Version(text)
        except ValueError:  # InvalidVersion, and int() of absurdly long digit runs
            raise FormatError(f"version {quote(text)} is not a valid version") from None

    @property
    def payload_size(self) -> int:
        """The bytes of the complete slot's payload."""
        return sum(e.size for e in self.entries)

    @property
    def carried_entries(self) -> tuple[Entry, ...]:
        """The entries whose bytes are in the bundle's payload, in order: all of them, but
        for a delta those taken from its base."""
        if self.delta is None:
            return self.entries
        skip = self.delta.not_carried
        return tuple(e for e in self.entries if e.path not in skip)

    @property
    def carried_size(self) -> int:
        return sum(e.size for e in self.carried_entries)

    def is_expired(self, now: datetime) -> bool:
        return now >= self.expires

    def to_dict(self) -> dict[str, Any]:
        return {
            "_type": MANIFEST_TYPE,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "created": format_time(self.created),
            "expires": format_time(self.expires),
            "runtime": dict(self.runtime),
            "model": self._model_dict(),
            "entries": [e.to_dict() for e in self.entries],
        } | (
            ({"environment": self.environment.to_dict()} if self.environment else {})
            | ({"requires": self.requires.to_dict()} if self.requires is not None else {})
            | ({"delta": self.delta.to_dict()} if self.delta is not None else {})
        )

    def _model_dict(self) -> dict[str, Any]:
        model: dict[str, Any] = {"path": self.model_path}
        if self.model_source is not None:
            model["source"] = self.model_source.to_dict()
        if self.model_pipeline is not None:
            model["pipeline"] = self.model_pipeline.to_dict()
        if self.model_adapters:
            model["adapters"] = [a.to_dict() for a in self.model_adapters]
        return model

    def to_bytes(self) -> bytes:
        """The exact bytes that are signed and stored as the bundle's manifest member."""
        return encode_canonical(self.to_dict())

    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def state_sha256(self) -> str:
        """The digest of the slot this manifest describes, however it was delivered: the
        manifest without its delta section and without the delta's patch files. A complete
        bundle and a delta of the same build have the same state, so either is a base."""
        state = self.to_dict()
        if self.delta is not None:
            del state["delta"]
            carried = {f for p in self.delta.patches for f in (p.patch, p.literal)}
            state["entries"] = [e for e in state["entries"] if e["path"] not in carried]
        return hashlib.sha256(encode_canonical(state)).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes) -> BundleManifest:
        obj = _exact_object(
            decode_canonical(data, what="manifest"),
            optional={"environment", "requires", "delta"},
            keys={
                "_type",
                "format_version",
                "name",
                "version",
                "created",
                "expires",
                "runtime",
                "model",
                "entries",
            },
            what="manifest",
        )
        if obj["_type"] != MANIFEST_TYPE:
            raise FormatError(
                f"manifest: _type must be {MANIFEST_TYPE!r}, got {quote(obj['_type'])}"
            )
        if not is_int(obj["format_version"]) or obj["format_version"] != FORMAT_VERSION:
            raise FormatError(
                f"manifest: format_version {quote(obj['format_version'])} is not supported "
                f"(this appliance reads {FORMAT_VERSION})"
            )
        for key in ("name", "version"):
            if not isinstance(obj[key], str):
                raise FormatError(f"manifest: {key} must be a string")
        runtime = obj["runtime"]
        if not isinstance(runtime, dict):
            raise FormatError("manifest: runtime must be an object")
        model = _exact_object(
            obj["model"],
            {"path"},
            optional={"source", "pipeline", "adapters"},
            what="manifest model",
        )
        raw_adapters = model.get("adapters", [])
        if not isinstance(raw_adapters, list) or len(raw_adapters) > MAX_ADAPTERS:
            raise FormatError(f"manifest model.adapters must be a list of at most {MAX_ADAPTERS}")
        adapters = []
        for item in raw_adapters:
            fields = _exact_object(item, {"path", "base_sha256"}, what="manifest model.adapters")
            adapters.append(ModelAdapter(path=fields["path"], base_sha256=fields["base_sha256"]))
        source = None
        if "source" in model:
            src = _exact_object(
                model["source"], {"repo_id", "commit"}, what="manifest model.source"
            )
            source = ModelSource(repo_id=src["repo_id"], commit=src["commit"])
        raw_entries = obj["entries"]
        if not isinstance(raw_entries, list):
            raise FormatError("manifest: entries must be a list")
        if len(raw_entries) > MAX_ENTRIES:
            raise FormatError(f"manifest: more than {MAX_ENTRIES} entries")
        entries = tuple(Entry.from_dict(e, what="manifest entry") for e in raw_entries)
        return cls(
            name=obj["name"],
            version=obj["version"],
            created=parse_time(obj["created"], what="manifest created"),
            expires=parse_time(obj["expires"], what="manifest expires"),
            runtime=runtime,
            model_path=model["path"],
            entries=entries,
            environment=(
                EnvironmentSpec.from_dict(obj["environment"]) if "environment" in obj else None
            ),
            model_source=source,
            requires=(HostRequirements.from_dict(obj["requires"]) if "requires" in obj else None),
            model_pipeline=(
                ModelPipeline.from_dict(model["pipeline"]) if "pipeline" in model else None
            ),
            delta=DeltaSpec.from_dict(obj["delta"]) if "delta" in obj else None,
            model_adapters=tuple(adapters),
        )


def encode_signature_block(signatures: Iterable[Signature], *, space: int) -> bytes:
    """Serialise signatures, padded with spaces to exactly ``space`` bytes (format section 3).

    The fixed size is what lets ``appliance-builder sign`` add a signature in place, in
    constant time, without moving a single payload byte.
    """
    body = encode_canonical({"signatures": signatures_to_list(signatures)})
    if len(body) > space:
        raise FormatError(
            f"signature block needs {len(body)} bytes but the bundle reserves {space}"
        )
    return body + b" " * (space - len(body))


def decode_signature_block(data: bytes) -> tuple[Signature, ...]:
    """Parse a signature block: canonical JSON followed only by space padding."""
    body = data.rstrip(b" ")
    obj = _exact_object(
        decode_canonical(body, what="signatures"), {"signatures"}, what="signatures"
    )
    return parse_signatures(obj["signatures"], what="signatures")


def _check_entries(entries: tuple[Entry, ...]) -> None:
    paths = [e.path for e in entries]
    if paths != sorted(paths):
        raise FormatError("manifest: entries are not sorted by path")
    for before, after in itertools.pairwise(paths):
        if before == after:
            raise FormatError(f"manifest: duplicate entry {quote(after)}")
    names = set(paths)
    for path in paths:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in names:
                raise FormatError(
                    f"manifest: entry {quote('/'.join(parts[:i]))} is also a directory"
                )


def _check_adapters(
    adapters: tuple[ModelAdapter, ...], entries: tuple[Entry, ...], model_path: str
) -> None:
    """Every adapter is an entry, and is bound to the weights this manifest's model holds."""
    if not isinstance(adapters, tuple) or not all(isinstance(a, ModelAdapter) for a in adapters):
        raise FormatError("manifest: model.adapters must be a tuple of ModelAdapter")
    if not adapters:
        return
    by_path = {e.path: e for e in entries}
    model = by_path.get(model_path)
    if model is None:
        raise FormatError("manifest: model.adapters need a model that is one file (a GGUF)")
    paths = [a.path for a in adapters]
    if paths != sorted(set(paths)):
        raise FormatError("manifest: model.adapters must be sorted by path, without duplicates")
    for adapter in adapters:
        if adapter.path not in by_path or adapter.path == model_path:
            raise FormatError(f"manifest: adapter {quote(adapter.path)} names no adapter entry")
        if adapter.base_sha256 != model.sha256:
            raise FormatError(
                f"manifest: adapter {quote(adapter.path)} is for base weights sha256 "
                f"{adapter.base_sha256[:16]}..., the model {quote(model_path)} is "
                f"{model.sha256[:16]}..."
            )


def _check_delta(delta: DeltaSpec, entries: tuple[Entry, ...]) -> None:
    """Every path a delta names is an entry; a patch and its literal are carried, and no
    entry is both reused and patched."""
    paths = {e.path for e in entries}
    for path in (*delta.reuse, *(p.path for p in delta.patches)):
        if path not in paths:
            raise FormatError(f"manifest delta: {quote(path)} names no entry")
    overlap = set(delta.reuse) & {p.path for p in delta.patches}
    if overlap:
        raise FormatError(f"manifest delta: {quote(min(overlap))} is both reused and patched")
    skipped = delta.not_carried
    for patch in delta.patches:
        for carried in (patch.patch, patch.literal):
            if carried not in paths or carried in skipped:
                raise FormatError(
                    f"manifest delta: patch file {quote(carried)} is not a carried entry"
                )


def _exact_object(
    value: object, keys: set[str], *, what: str, optional: frozenset[str] | set[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(f"{what}: must be a JSON object")
    missing = keys - value.keys()
    extra = value.keys() - keys - optional
    if missing:
        raise FormatError(f"{what}: missing field {sorted(missing)[0]!r}")
    if extra:
        raise FormatError(f"{what}: unknown field {quote(sorted(extra)[0])}")
    return value
