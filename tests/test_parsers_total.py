"""Parsers are total: every signed or untrusted JSON document, mutated at the JSON-value level,
either parses or raises ``signing.errors.AirgapError``; never TypeError, KeyError, ... .

Why structure-aware: byte-level fuzzing (tests/test_tar_properties.py) almost never produces
canonical JSON of another shape, so it never reached ``"environment": {"type": []}``, which
escaped the manifest parser as a TypeError ("internal error" from ``appliance install``, no
audit record). Here every test starts from a valid document made by the project's own code,
changes JSON values (at any path, to any JSON type), deletes keys and adds keys, and re-encodes
canonically, so that the change gets past the byte-level canonical check to the field checks.

Documents: the bundle manifest (``BundleManifest.from_bytes``, then signed and run through
``verify_head`` as install, verify and inspect read it), the signature block
(``decode_signature_block``, ``verify_threshold`` through ``verify_head``), root metadata
(``SignedRoot.from_bytes``/``Root.from_signed_dict``, ``verify_root``, ``verify_rotation``, as a
first root and as a rotation) and the payload's CycloneDX SBOM (``summarize_sbom``, which must
not raise at all).

Two layers: an exhaustive one (every path of the document, every kind of replacement, every
deletion, every added field name; deterministic, a few thousand parses) that alone catches any
field used before its type is checked; and hypothesis, derandomized, for several mutations at
once. Every refusal must also be short (signing.bounded): its message at most MAX_LINE.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import assert_error, builder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simulator import BundleSimulator, Host, make_keys

from appliance.verifier import verify_head
from builder.artifacts import Artifact
from builder.sbom import FileRecord, make_sbom
from signing.bounded import MAX_LINE
from signing.bundle import BundleHead
from signing.canonical import MAX_INT, MIN_INT, encode_canonical
from signing.errors import AirgapError, FormatError
from signing.manifest import (
    BundleManifest,
    EnvironmentSpec,
    ModelPipeline,
    ModelSource,
    decode_signature_block,
)
from signing.metadata import Root, SignedRoot, verify_root, verify_rotation
from signing.provenance import summarize_sbom
from signing.requirements import (
    CpuRequirement,
    GpuRequirement,
    HostRequirements,
    MemoryEstimate,
)

JSONPath = tuple[str | int, ...]
"""Where a value sits in a JSON document: object keys and list indexes from the top."""

# -- the valid documents ----------------------------------------------------------------------

SIM = BundleSimulator(bundle_keys=3, threshold=2, signature_space=4096)
ENV_FILES = {
    "env/requirements.txt": b"demo==1.0 --hash=sha256:" + b"0" * 64 + b"\n",
    "env/wheels/demo-1.0-py3-none-any.whl": b"PK\x03\x04wheel",
    "model/tiny.gguf": b"GGUF" + bytes(64),
    "recipe.toml": b'name = "demo"\n',
}
ENVIRONMENT = EnvironmentSpec(
    type="pip",
    platform="linux-x86_64",
    python="3.11",
    install_list="env/requirements.txt",
    packages="env/wheels",
    smoke_imports=("demo", "demo.sub"),
)
_manifest, PAYLOAD = SIM.manifest(
    files=ENV_FILES,
    runtime={
        "backend": "llama.cpp",
        "context_size": 256,
        "gpu_layers": -1,
        "threads": 2,
        "dtype": "auto",
    },
    environment=ENVIRONMENT,
)
# Every field of ``requires`` present, lists of two, so that the walk reaches each of them.
REQUIRES = HostRequirements(
    memory_bytes=1 << 30,
    disk_bytes=2 << 30,
    cpu=CpuRequirement(arch="x86_64", level="x86-64-v3", flags=("aes", "avx512f"), dispatch=True),
    gpu=GpuRequirement(
        cuda_architectures=("86", "90a"), cuda_version="12.4", memory_bytes=1 << 30,
        cpu_fallback=True,
    ),
    glibc="2.28",
    python="3.11",
    memory_estimate=MemoryEstimate(
        context_size=256, parallel=4, kv_type="f16", weights_bytes=1 << 20,
        kv_cache_bytes=2 << 20, compute_bytes=3 << 20, overhead_bytes=512 << 20,
        total_bytes=518 << 20,
    ),
)  # fmt: skip
PIPELINE = ModelPipeline(
    converter="llama-cpp-python==0.3.36",
    converter_sha256="c" * 64,
    quantize="Q8_0",
    inputs=(("config.json", "d" * 64), ("model.safetensors", "e" * 64)),
    output_sha256="f" * 64,
    kl_nanonats=1497,
    kl_tokens=126,
)
MANIFEST = replace(
    _manifest,
    model_source=ModelSource(repo_id="org/tiny", commit="a" * 40),
    requires=REQUIRES,
    model_pipeline=PIPELINE,
)
MANIFEST_BYTES = MANIFEST.to_bytes()
# Two valid signatures and one by a key the root does not know: lists of several objects.
SIGNATURE_BLOCK = SIM.signature_block(MANIFEST_BYTES, [*SIM.bundle_keys[:2], *make_keys(1)])

ROOT_SIM = BundleSimulator(bundle_keys=2, threshold=2, root_keys=2, root_threshold=2)
ROOT_V1 = ROOT_SIM.signed_root
ROOT_V1_BYTES = ROOT_SIM.root_bytes()
ROOT_V2_BYTES = ROOT_SIM.rotate(root_keys=2)  # signed by the old and the new root keys
ROOT_V2 = ROOT_SIM.signed_root

SBOM_BYTES = make_sbom(
    name="demo",
    version="1.0.0",
    created=SIM.now,
    model_path="model",
    model_files=[FileRecord("model/tiny.gguf", 68, "b" * 64)],
    model_source=ModelSource(repo_id="org/tiny", commit="a" * 40),
    model_pipeline=PIPELINE,
    environment=("pip", "linux-x86_64", "3.11"),
    artifacts=[
        Artifact("demo", "1.0", "demo-1.0-py3-none-any.whl", "https://x.invalid/d", "c" * 64),
        Artifact(
            "built",
            "2.0",
            "built-2.0-py3-none-any.whl",
            "https://x.invalid/built-2.0.tar.gz",
            "d" * 64,
            origin="built",
            source_sha256="e" * 64,
        ),
    ],
    locks=[FileRecord("env/requirements.txt", 10, "f" * 64)],
)


def _json(data: bytes) -> Any:
    return json.loads(data.rstrip(b" "))


# -- running the consumers of each document ---------------------------------------------------


def refusal(run: Callable[[], object]) -> AirgapError | None:
    """None when ``run`` succeeds, its AirgapError when it refuses: a short one-line one.

    Any other exception propagates and fails the test: that is the bug this module hunts.
    """
    try:
        run()
    except AirgapError as exc:
        assert len(str(exc)) <= MAX_LINE, f"unbounded message of {len(str(exc))} characters"
        assert "\n" not in exc.diagnostics()
        return exc
    return None


def check_manifest(data: bytes) -> None:
    """The parser alone (``appliance-builder inspect``), then signed by a threshold through
    the verifier (``appliance verify`` and ``install``): a signature proves nothing about
    types."""
    error = refusal(lambda: BundleManifest.from_bytes(data))
    if error is None:  # what parses is exactly what was signed, and parses the same again
        manifest = BundleManifest.from_bytes(data)
        assert manifest.to_bytes() == data
        assert BundleManifest.from_bytes(manifest.to_bytes()) == manifest
    head = BundleHead(
        manifest_bytes=data, signature_block=SIM.signature_block(data), signature_offset=0
    )
    verified = refusal(lambda: verify_head(head, root=SIM.root, now=SIM.now))
    if error is not None:  # what the parser refuses, the verifier refuses, signed or not
        assert verified is not None


def check_signature_block(data: bytes) -> None:
    """Space-padded like the bundle's member; then counted against the bundle role (V4)."""
    block = data + b" " * max(0, SIM.signature_space - len(data))
    refusal(lambda: decode_signature_block(block))
    head = BundleHead(manifest_bytes=MANIFEST_BYTES, signature_block=block, signature_offset=0)
    refusal(lambda: verify_head(head, root=SIM.root, now=SIM.now))


def check_root(data: bytes) -> None:
    """As a first root (``trust init``: verify_root), as the trusted root a rotation starts
    from, and as a rotation of root v1 (``trust update``: verify_rotation)."""
    value = json.loads(data)  # every mutated document is JSON, if not canonical
    if isinstance(value, dict) and "signed" in value:
        refusal(lambda: Root.from_signed_dict(value["signed"]))
    signed: list[SignedRoot] = []
    refusal(lambda: signed.append(SignedRoot.from_bytes(data)))
    if not signed:
        return
    new = signed[0]
    refusal(lambda: verify_root(new))
    refusal(lambda: verify_rotation(ROOT_V1.root, new))
    refusal(lambda: verify_rotation(new.root, ROOT_V2))
    refusal(lambda: new.root.is_expired(ROOT_SIM.now))


def check_sbom(data: bytes) -> None:
    """Never raises, not even an AirgapError: ``status`` shows provenance as best it can."""
    summary = summarize_sbom(data)
    assert isinstance(summary, dict)
    # What it returns can be printed and put into JSON: no lone surrogates, short texts.
    text = json.dumps(summary, ensure_ascii=False).encode("utf-8")
    assert len(text) < 64 * 1024


@dataclass(frozen=True)
class Document:
    name: str
    data: bytes
    check: Callable[[bytes], None]


DOCUMENTS = [
    Document("manifest", MANIFEST_BYTES, check_manifest),
    Document("signature-block", SIGNATURE_BLOCK.rstrip(b" "), check_signature_block),
    Document("root", ROOT_V1_BYTES, check_root),
    Document("rotation", ROOT_V2_BYTES, check_root),
    Document("sbom", SBOM_BYTES, check_sbom),
]


def test_the_documents_are_valid() -> None:
    """The starting points parse and verify: each mutation below changes a valid document."""
    manifest = BundleManifest.from_bytes(MANIFEST_BYTES)
    assert manifest.environment == ENVIRONMENT and manifest.model_source is not None
    assert manifest.requires == REQUIRES
    assert manifest.model_pipeline == PIPELINE
    head = BundleHead(MANIFEST_BYTES, SIGNATURE_BLOCK, 0)
    assert len(verify_head(head, root=SIM.root, now=SIM.now).signers) == 2
    assert verify_root(SignedRoot.from_bytes(ROOT_V1_BYTES))
    assert verify_rotation(ROOT_V1.root, SignedRoot.from_bytes(ROOT_V2_BYTES)) == ROOT_V2.root
    summary = summarize_sbom(SBOM_BYTES)
    assert summary["model"]["name"] == "org/tiny"
    assert [p["built"] for p in summary["packages"]] == [True, False]


# -- mutations --------------------------------------------------------------------------------


def paths(value: Any, here: JSONPath = ()) -> Iterator[JSONPath]:
    """Every path in ``value``, the top included, parents before children."""
    yield here
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*here, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, (*here, index))


def get(doc: Any, path: JSONPath) -> Any:
    for step in path:
        doc = doc[step]
    return doc


def replaced(doc: Any, path: JSONPath, value: Any) -> Any:
    if not path:
        return copy.deepcopy(value)
    out = copy.deepcopy(doc)
    get(out, path[:-1])[path[-1]] = copy.deepcopy(value)
    return out


def deleted(doc: Any, path: JSONPath) -> Any:
    out = copy.deepcopy(doc)
    del get(out, path[:-1])[path[-1]]
    return out


def added(doc: Any, path: JSONPath, key: str, value: Any) -> Any:
    """A new field ``key`` in the object at ``path`` (a new last item, for a list)."""
    out = copy.deepcopy(doc)
    target = get(out, path)
    if isinstance(target, dict):
        target[key] = copy.deepcopy(value)
    else:
        target.append(copy.deepcopy(value))
    return out


def encode(doc: Any) -> bytes:
    """Canonical bytes, to get past the byte-level check; a value with a lone surrogate has
    no canonical form, so its escaped spelling (which the decoder must refuse) stands in."""
    try:
        return encode_canonical(doc)
    except FormatError:
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("ascii")


LONG = "a" * 5000
# One of each JSON type (no floats: canonical JSON has none), the edges of each, and values
# that look right to a careless check: a list holding the right string, a bool for an int.
HOSTILE: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    MAX_INT,
    MIN_INT,
    "",
    "x",
    LONG,
    "../../etc/passwd",
    "\u00fc\u202e\U0001f600\x00\x7f",
    "\ud800",
    [],
    [None],
    ["pip"],
    [[]],
    {},
    {"": None},
    {"type": "pip", "keyid": "0" * 64},
]


def variants(original: Any) -> list[Any]:
    """What to put where ``original`` was: every hostile value, and ``original`` wrapped in
    a list and in an object (the same data, the wrong type)."""
    return [*HOSTILE, [original], {"value": original}, [original, original]]


def field_names(*docs: Any) -> list[str]:
    """Every object key of the documents: a field added where it does not belong."""
    names = {str(step) for doc in docs for path in paths(doc) for step in path}
    return [*sorted(names - {str(i) for i in range(100)}), LONG]


NAMES = field_names(*(_json(d.data) for d in DOCUMENTS))


def exhaustive(doc: Any) -> Iterator[tuple[str, Any]]:
    """(label, mutated document) for one change of each kind at each path."""
    for path in paths(doc):
        original = get(doc, path)
        for index, value in enumerate(variants(original)):
            yield f"replace {list(path)} by variant {index}", replaced(doc, path, value)
        if path:
            yield f"delete {list(path)}", deleted(doc, path)
        if isinstance(original, dict | list):
            for name in NAMES:
                for value in (None, ["x"], original):
                    yield f"add {name[:20]!r} at {list(path)}", added(doc, path, name, value)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: d.name)
def test_every_field_of_every_type(document: Document) -> None:
    doc = _json(document.data)
    count = 0
    for label, mutated in exhaustive(doc):
        try:
            document.check(encode(mutated))
        except Exception as exc:
            raise AssertionError(f"{document.name}: {label}: {type(exc).__name__}: {exc}") from exc
        count += 1
    assert count > 200  # the walk reached the document's fields


# -- several mutations at once (hypothesis) ---------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(MIN_INT, MAX_INT)
    | st.sampled_from([0, 1, -1, 16, MAX_INT, MIN_INT])
    | st.text(max_size=12)
    | st.sampled_from([LONG, "\ud800", "pip", "conda", "llama.cpp", "3.11", "0" * 64, "a" * 128])
    | st.sampled_from(NAMES)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def mutated(draw: st.DrawFn, doc: Any) -> Any:
    """``doc`` after one to three changes: replace, delete or add, at any path."""
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths(doc))))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        target = get(doc, path)
        if action == "delete" and path:
            doc = deleted(doc, path)
        elif action == "add" and isinstance(target, dict | list):
            key = draw(st.sampled_from(NAMES) | st.text(max_size=6))
            doc = added(doc, path, key, draw(json_values))
        else:
            doc = replaced(doc, path, draw(json_values))
    return doc


FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: d.name)
@FUZZ
@given(data=st.data())
def test_several_mutations(document: Document, data: st.DataObject) -> None:
    document.check(encode(data.draw(mutated(_json(document.data)))))


# -- the reproduction of issue 8, item 7, at every layer ---------------------------------------


def _environment_type_list() -> bytes:
    doc = _json(MANIFEST_BYTES)
    doc["environment"]["type"] = ["pip"]
    return encode_canonical(doc)


ENV_TYPE_MESSAGE = "manifest environment: type must be one of ['conda', 'pip']"


def test_environment_type_list_is_a_format_error() -> None:
    with pytest.raises(FormatError) as caught:
        BundleManifest.from_bytes(_environment_type_list())
    assert str(caught.value) == ENV_TYPE_MESSAGE


def test_environment_type_list_signed_is_refused_and_audited(installed_host: Host) -> None:
    """Signed by a threshold, it reaches the installer: a refusal with an audit record."""
    sim = installed_host.sim
    doc = _json(MANIFEST_BYTES)
    doc["environment"]["type"] = {"pip": True}
    manifest, payload = sim.manifest(version="2.0.0")
    data = sim.bundle_bytes(manifest, payload, manifest_bytes=encode_canonical(doc))
    before = installed_host.snapshot()
    with pytest.raises(FormatError, match="type must be one of"):
        installed_host.install(data)
    assert installed_host.snapshot() == before
    record = installed_host.last_audit()
    assert record["outcome"] == "refused"
    assert ENV_TYPE_MESSAGE in record["error"]


def test_environment_type_list_unsigned_inspect(tmp_path: Path) -> None:
    """``appliance-builder inspect`` parses an unsigned manifest: one error line, exit 3."""
    bundle = tmp_path / "bundle.tar"
    bundle.write_bytes(
        SIM.bundle_bytes(MANIFEST, PAYLOAD, signers=[], manifest_bytes=_environment_type_list())
    )
    assert_error(builder("inspect", bundle), 3, ENV_TYPE_MESSAGE)
