"""GGUF-aware deltas (issue 11, item 3; docs/adr/0019-gguf-aware-deltas.md): the builder's
per-region diff (builder/ggufdiff.py), the strict patch format (signing/patchformat.py) and
the host's streaming rebuild (appliance/patching.py), on real GGUF files written by the gguf
package's GGUFWriter (builder/tinymodel.py, 201 tensors) and on the real Qwen2.5-Coder Q4_K_M.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from realmodel import chat_gguf

from appliance.patching import apply_patch, rebuild_file
from builder.cache import sha256_file
from builder.ggufdiff import diff_files, make_delta
from builder.gguflayout import NotGGUFError, read_layout, rewrite_string_metadata, string_pair
from builder.tinymodel import CHAT_TEMPLATE, write_tiny_llama
from signing.canonical import encode_canonical
from signing.errors import AirgapError, FormatError, IntegrityError, PayloadError, StateError
from signing.patchformat import MAX_OPS, MAX_PATCH_BYTES, FileRef, Op, Patch

gguf = pytest.importorskip("gguf")

LAYERS = 22  # 9 tensors a layer and 3 more: 201 tensors
NEW_TEMPLATE = CHAT_TEMPLATE + "{# a longer template: every tensor's offset moves #}" * 40
CHANGED = "blk.10.ffn_up.weight"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base model, the same weights with another chat template, and the base with one
    tensor of 201 changed (its bytes flipped in place: still a valid GGUF)."""
    root = tmp_path_factory.mktemp("gguf")
    base, template = root / "base.gguf", root / "template.gguf"
    write_tiny_llama(base, n_layer=LAYERS, seed=7)
    write_tiny_llama(template, n_layer=LAYERS, seed=7, chat_template=NEW_TEMPLATE)
    region = read_layout(base).region(_tensor_ident(base, CHANGED))
    data = bytearray(base.read_bytes())
    for i in range(region.offset, region.offset + 4096 * 4, 4):
        data[i] ^= 0x5A
    tensor = root / "tensor.gguf"
    tensor.write_bytes(bytes(data))
    return {"base": base, "template": template, "tensor": tensor}


def _tensor_ident(path: Path, name: str) -> tuple[object, ...]:
    info = next(t for t in read_layout(path).tensors if t.name == name)
    return ("tensor", info.name, info.shape, info.ggml_type)


def _weights(path: Path) -> int:
    layout = read_layout(path)
    return layout.size - layout.data_offset


def _delta(tmp_path: Path, base: Path, new: Path, **kwargs: Any) -> tuple[Patch, Path]:
    literal = tmp_path / "literal.bin"
    delta = make_delta(base, new, literal_out=literal, **kwargs)
    # What the host gets is the bytes: the patch goes through its strict parser.
    return Patch.from_bytes(delta.patch.to_bytes()), literal


# -- the diff and the rebuild ----------------------------------------------------------------


def test_the_fixtures_are_real_gguf_with_about_200_tensors(models: dict[str, Path]) -> None:
    for path in models.values():
        reader = gguf.GGUFReader(str(path))
        assert len(reader.tensors) == 201
    base, template = read_layout(models["base"]), read_layout(models["template"])
    assert template.data_offset > base.data_offset  # every tensor's absolute offset moved
    tensor = gguf.GGUFReader(str(models["tensor"]))
    changed = next(t for t in tensor.tensors if t.name == CHANGED)
    original = next(t for t in gguf.GGUFReader(str(models["base"])).tensors if t.name == CHANGED)
    assert bytes(changed.data.tobytes()) != bytes(original.data.tobytes())


def test_a_chat_template_edit_carries_the_template_only(
    models: dict[str, Path], tmp_path: Path
) -> None:
    patch, literal = _delta(tmp_path, models["base"], models["template"])
    assert patch.method == "gguf"
    assert patch.literal.size < 4096  # kilobytes: the one metadata pair, and padding
    assert patch.literal.size < _weights(models["template"]) / 100
    assert len(NEW_TEMPLATE) < patch.literal.size
    assert patch.base == FileRef(sha256(models["base"]), models["base"].stat().st_size)
    target = tmp_path / "rebuilt.gguf"
    applied = rebuild_file(patch, base=models["base"], literal=literal, target=target)
    assert target.read_bytes() == models["template"].read_bytes()
    assert applied.sha256 == patch.target.sha256 == sha256(models["template"])
    assert applied.literal_bytes == patch.literal.size


def test_a_block_diff_carries_nearly_everything_after_a_template_edit(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """The case RAUC's block deltas fail: the edit shifts every block after it."""
    patch, literal = _delta(
        tmp_path, models["base"], models["template"], gguf_aware=False, block_bytes=4096
    )
    assert patch.method in {"blocks", "literal"}
    assert patch.literal.size > 0.95 * models["template"].stat().st_size
    target = tmp_path / "rebuilt.gguf"
    rebuild_file(patch, base=models["base"], literal=literal, target=target)
    assert target.read_bytes() == models["template"].read_bytes()


def test_one_changed_tensor_of_201_carries_that_tensor(
    models: dict[str, Path], tmp_path: Path
) -> None:
    patch, literal = _delta(tmp_path, models["base"], models["tensor"])
    region = read_layout(models["tensor"]).region(_tensor_ident(models["tensor"], CHANGED))
    assert patch.literal.size == region.length  # the header is unchanged: copied
    assert [op.kind for op in patch.ops] == ["copy", "data", "copy"]
    target = tmp_path / "rebuilt.gguf"
    rebuild_file(patch, base=models["base"], literal=literal, target=target)
    assert target.read_bytes() == models["tensor"].read_bytes()


def test_a_file_that_is_not_gguf_falls_back_to_blocks(tmp_path: Path) -> None:
    base, new = tmp_path / "base.bin", tmp_path / "new.bin"
    base.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    changed = bytearray(base.read_bytes())
    changed[70_000] ^= 1
    new.write_bytes(bytes(changed) + b"tail")
    delta = make_delta(base, new, literal_out=tmp_path / "literal.bin", block_bytes=64 << 10)
    assert delta.patch.method == "blocks"
    assert "not GGUF" in delta.reason and "no GGUF magic" in delta.reason
    assert delta.patch.literal.size == (64 << 10) + 4
    target = tmp_path / "out.bin"
    rebuild_file(delta.patch, base=base, literal=tmp_path / "literal.bin", target=target)
    assert target.read_bytes() == new.read_bytes()


def test_nothing_in_common_is_a_literal_patch(tmp_path: Path) -> None:
    base, new = tmp_path / "base.bin", tmp_path / "new.bin"
    base.write_bytes(b"a" * 10_000)
    new.write_bytes(b"b" * 5_000)
    delta = make_delta(base, new, literal_out=tmp_path / "literal.bin", block_bytes=4096)
    assert delta.patch.method == "literal"
    assert delta.patch.ops == (Op("data", 0, 5_000),)


def test_a_truncated_gguf_is_not_read_as_gguf(models: dict[str, Path], tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(models["base"].read_bytes()[: read_layout(models["base"]).data_offset - 100])
    with pytest.raises(NotGGUFError, match="ends inside its header"):
        read_layout(cut)


def test_a_damaged_header_is_read_or_refused_never_a_crash(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """300 headers with bytes overwritten at random: each is read (the damage hit a value) or
    refused with NotGGUFError, which makes the diff fall back to blocks; never another error."""
    import random

    original = models["base"].read_bytes()
    header = read_layout(models["base"]).data_offset
    rng = random.Random(11)
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(original)
    refused = 0
    with damaged.open("r+b") as out:
        for _ in range(300):
            spots = [rng.randrange(header) for _ in range(rng.randint(1, 4))]
            for position in spots:
                out.seek(position)
                out.write(
                    rng.choice(
                        [
                            b"\xff" * 8,
                            b"\x00" * 8,
                            rng.randbytes(8),
                            (1 << 40).to_bytes(8, "little"),
                        ]
                    )
                )
            out.flush()
            try:
                layout = read_layout(damaged)
            except NotGGUFError:
                refused += 1
            else:
                assert sum(r.length for r in layout.regions) == damaged.stat().st_size
            for position in spots:  # undo, for the next round
                out.seek(position)
                out.write(original[position : position + 8])
            out.truncate(len(original))
            out.flush()
    assert 0 < refused < 300


def test_rewrite_string_metadata_sets_the_template(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "edited.gguf"
    rewrite_string_metadata(models["base"], out, "tokenizer.chat_template", NEW_TEMPLATE)
    assert out.read_bytes() == models["template"].read_bytes()  # what GGUFWriter writes


# -- refusals of the rebuild ------------------------------------------------------------------


@pytest.fixture
def template_delta(models: dict[str, Path], tmp_path: Path) -> tuple[Patch, Path, Path]:
    patch, literal = _delta(tmp_path, models["base"], models["template"])
    base = tmp_path / "slot" / "base.gguf"
    base.parent.mkdir()
    base.write_bytes(models["base"].read_bytes())
    return patch, literal, base


def _refusal(
    patch: Patch, *, base: Path, literal: Path, error: type[Exception], first: bool = False
) -> str:
    """Rebuild into a new target, expecting ``error``: its one line; no target is left."""
    target = base.parent / "target.gguf"
    with pytest.raises(error) as refused:
        rebuild_file(patch, base=base, literal=literal, target=target, verify_base_first=first)
    assert not target.exists()
    assert isinstance(refused.value, AirgapError)
    return refused.value.diagnostics()


def _flip(path: Path, offset: int) -> str:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("first", [False, True], ids=["on-mismatch", "verify-first"])
def test_a_corrupt_base_is_refused_by_name(
    template_delta: tuple[Patch, Path, Path], tmp_path: Path, first: bool
) -> None:
    patch, literal, base = template_delta
    tensor = read_layout(base).region(_tensor_ident(base, "blk.3.attn_q.weight"))
    got = _flip(base, tensor.offset + 100)
    line = _refusal(patch, base=base, literal=literal, error=IntegrityError, first=first)
    assert line == f"base {base} does not match: sha256 {got} expected {patch.base.sha256}"


def test_a_base_of_another_size_is_refused_before_reading(
    template_delta: tuple[Patch, Path, Path], tmp_path: Path
) -> None:
    patch, literal, base = template_delta
    base.write_bytes(base.read_bytes()[:-1])
    assert _refusal(patch, base=base, literal=literal, error=IntegrityError) == (
        f"base {base} does not match: {patch.base.size - 1} bytes expected {patch.base.size}"
    )


def test_bytes_the_patch_does_not_copy_need_not_match(
    template_delta: tuple[Patch, Path, Path], tmp_path: Path
) -> None:
    """The base's old template is not copied: its damage cannot reach the target, whose
    sha256 proves every byte; only verify_base_first refuses it."""
    patch, literal, base = template_delta
    template = read_layout(base).region(("kv", "tokenizer.chat_template"))
    got = _flip(base, template.offset + template.length - 1)
    target = tmp_path / "target.gguf"
    assert rebuild_file(patch, base=base, literal=literal, target=target).sha256 == (
        patch.target.sha256
    )
    target.unlink()
    with pytest.raises(IntegrityError, match=f"sha256 {got} expected"):
        rebuild_file(patch, base=base, literal=literal, target=target, verify_base_first=True)


def test_a_corrupt_literal_file_is_refused_by_name(
    template_delta: tuple[Patch, Path, Path], tmp_path: Path
) -> None:
    patch, literal, base = template_delta
    got = _flip(literal, 10)
    assert _refusal(patch, base=base, literal=literal, error=PayloadError) == (
        f"literal file {literal} does not match: sha256 {got} expected {patch.literal.sha256}"
    )


def test_a_patch_whose_target_hash_lies_is_refused(
    template_delta: tuple[Patch, Path, Path], tmp_path: Path
) -> None:
    patch, literal, base = template_delta
    lying = Patch(
        method=patch.method,
        base=patch.base,
        target=FileRef("0" * 64, patch.target.size),
        literal=patch.literal,
        ops=patch.ops,
    )
    assert _refusal(lying, base=base, literal=literal, error=PayloadError) == (
        f"patched target.gguf does not match: sha256 {patch.target.sha256} expected {'0' * 64}"
    )


def test_an_existing_target_is_never_overwritten(
    template_delta: tuple[Patch, Path, Path], tmp_path: Path
) -> None:
    patch, literal, base = template_delta
    target = tmp_path / "target.gguf"
    target.write_bytes(b"keep")
    with pytest.raises(StateError, match="cannot write"):
        rebuild_file(patch, base=base, literal=literal, target=target)
    assert target.read_bytes() == b"keep"


# -- the patch format: strict, and total ------------------------------------------------------

SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64


def _doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "_type": "file-patch",
        "format_version": 1,
        "method": "gguf",
        "base": {"sha256": SHA_A, "size": 100},
        "target": {"sha256": SHA_B, "size": 30},
        "literal": {"sha256": SHA_C, "size": 10},
        "ops": [{"copy": [0, 10]}, {"data": [0, 10]}, {"copy": [50, 10]}],
    }
    doc.update(changes)
    return doc


def _raw(doc: object) -> bytes:
    return encode_canonical(doc) + b"\n"


def test_a_valid_patch_round_trips() -> None:
    patch = Patch.from_bytes(_raw(_doc()))
    assert patch.to_bytes() == _raw(_doc())
    assert patch.copied_bytes == 20


def test_every_truncation_is_a_format_error() -> None:
    raw = _raw(_doc())
    for cut in range(len(raw)):
        with pytest.raises(FormatError):
            Patch.from_bytes(raw[:cut])
    with pytest.raises(FormatError):
        Patch.from_bytes(raw[:-1] + b" \n")
    with pytest.raises(FormatError, match="not canonical"):
        Patch.from_bytes(json.dumps(_doc()).encode() + b"\n")


WRONG_VALUES: list[object] = [None, True, "7", -1, [], [1, 2], {}, {"copy": [0, 1]}]


def _paths(value: object, path: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Every place in the document, containers included."""
    found = [path] if path else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*path, index))
    return found


def _replaced(doc: Any, path: tuple[object, ...], value: object) -> Any:
    doc = json.loads(json.dumps(doc))
    holder = doc
    for step in path[:-1]:
        holder = holder[step]
    holder[path[-1]] = value
    return doc


@pytest.mark.parametrize("path", _paths(_doc()), ids=lambda p: ".".join(map(str, p)))
def test_every_field_of_a_wrong_type_is_a_format_error(path: tuple[object, ...]) -> None:
    original = _doc()
    for value in WRONG_VALUES:
        mutated = _replaced(original, path, value)
        if mutated == original:
            continue
        raw = _raw(mutated)
        try:
            Patch.from_bytes(raw)
        except FormatError:
            continue
        pytest.fail(f"{path} = {value!r} was accepted")


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        ([{"copy": [0, 10]}, {"data": [0, 10]}], "make 20 bytes; the target is 30"),
        ([{"copy": [95, 10]}, {"data": [0, 10]}, {"copy": [0, 10]}], "of a base of 100"),
        ([{"copy": [0, 10]}, {"data": [3, 10]}, {"copy": [50, 10]}], "must be 0"),
        ([{"copy": [0, 0]}, {"copy": [0, 20]}, {"data": [0, 10]}], "length 0"),
        ([{"copy": [0, 10]}, {"copy": [10, 10]}, {"data": [0, 10]}], "merge them"),
        ([{"data": [0, 5]}, {"data": [5, 5]}, {"copy": [0, 20]}], "merge them"),
        ([{"copy": [0, 20]}, {"move": [0, 10]}], "unknown operation 'move'"),
        ([{"copy": [0, 20], "data": [0, 10]}], "one key"),
        ([{"copy": [0, 10, 3]}, {"data": [0, 10]}, {"copy": [50, 10]}], r"\[offset, length\]"),
        ([{"copy": [0, 20]}, {"data": [0, 5]}, {"copy": [0, 5]}], "read 5 literal bytes"),
    ],
)
def test_ops_that_break_a_rule_are_refused(ops: list[Any], message: str) -> None:
    with pytest.raises(FormatError, match=message):
        Patch.from_bytes(_raw(_doc(ops=ops)))


def test_fields_missing_or_unknown_and_limits_are_refused() -> None:
    doc = _doc()
    del doc["literal"]
    with pytest.raises(FormatError, match="missing \\['literal'\\]"):
        Patch.from_bytes(_raw(doc))
    with pytest.raises(FormatError, match="unknown \\['extra'\\]"):
        Patch.from_bytes(_raw(_doc(extra=1)))
    with pytest.raises(FormatError, match="method 'zstd'"):
        Patch.from_bytes(_raw(_doc(method="zstd")))
    with pytest.raises(FormatError, match="format_version"):
        Patch.from_bytes(_raw(_doc(format_version=2)))
    with pytest.raises(FormatError, match="expected bytes"):
        Patch.from_bytes("text")  # type: ignore[arg-type]
    with pytest.raises(FormatError, match=f"{MAX_PATCH_BYTES + 1} bytes, limit"):
        Patch.from_bytes(b" " * (MAX_PATCH_BYTES + 1))
    one = Op("data", 0, 1)
    with pytest.raises(FormatError, match=f"{MAX_OPS + 1} operations, limit {MAX_OPS}"):
        Patch(
            method="literal",
            base=FileRef(SHA_A, 0),
            target=FileRef(SHA_B, MAX_OPS + 1),
            literal=FileRef(SHA_C, MAX_OPS + 1),
            ops=(one,) * (MAX_OPS + 1),
        )


# -- the real quantised model -----------------------------------------------------------------


@pytest.mark.slow
def test_a_template_edit_of_the_real_qwen_q4_k_m(tmp_path: Path) -> None:
    model = chat_gguf()
    edited = tmp_path / "edited.gguf"
    rewrite_string_metadata(model, edited, "tokenizer.chat_template", NEW_TEMPLATE)
    region = read_layout(edited).region(("kv", "tokenizer.chat_template"))
    with edited.open("rb") as stream:
        stream.seek(region.offset)
        assert stream.read(region.length) == string_pair("tokenizer.chat_template", NEW_TEMPLATE)
    patch, literal = _delta(tmp_path, model, edited)
    # The header alone is about 6 MB (a 151,936-token vocabulary and its merges): a diff
    # that carried the header would carry that; this one carries the template pair.
    assert patch.literal.size < len(NEW_TEMPLATE.encode()) + 200
    assert patch.target.size > 400_000_000
    target = tmp_path / "rebuilt.gguf"
    applied = rebuild_file(patch, base=model, literal=literal, target=target)
    assert applied.sha256 == sha256_file(edited) == sha256_file(target)


# -- the file-level calls the build and the install use ---------------------------------------


def test_patch_files_applied_against_a_slot_by_sha256(
    models: dict[str, Path], tmp_path: Path
) -> None:
    patch, literal = tmp_path / "model.gguf.patch.json", tmp_path / "model.gguf.literal"
    delta = diff_files(models["base"], models["template"], patch=patch, literal=literal)
    assert patch.read_bytes() == delta.patch.to_bytes()
    assert "gguf: GGUF regions:" in delta.reason
    slot = {sha256(p): p for p in (models["tensor"], models["base"])}
    output = tmp_path / "payload" / "model.gguf"
    output.parent.mkdir()
    applied = apply_patch(patch=patch, literal=literal, base_files=slot, output=output)
    assert output.read_bytes() == models["template"].read_bytes()
    assert applied.copied_bytes + applied.literal_bytes == output.stat().st_size
    output.unlink()
    del slot[delta.patch.base.sha256]
    with pytest.raises(IntegrityError) as refused:
        apply_patch(patch=patch, literal=literal, base_files=slot, output=output)
    assert refused.value.diagnostics() == (
        f"patch model.gguf.patch.json needs a base file with sha256 {delta.patch.base.sha256} "
        f"({delta.patch.base.size} bytes); the base slot holds none"
    )
    patch.write_bytes(patch.read_bytes()[:-2])
    with pytest.raises(FormatError):
        apply_patch(patch=patch, literal=literal, base_files=slot, output=output)
    assert not output.exists()
