"""GGUF-aware deltas: bytes carried against the full size, and the host's rebuild against a
plain copy (issue 11, "Measurements"; docs/adr/0019-gguf-aware-deltas.md).

Cases, each diffed per GGUF region (ours) and in fixed 1 MiB blocks (what a block delta such
as RAUC's carries when the bytes move):

- the chat template changed, on the real Gemma 3 270M Q4_K_M (253 MB; a template added: its
  GGUF has none) and Qwen2.5-Coder 0.5B Q4_K_M (491 MB; its template replaced), where they are
  in the builder's cache (tests/realmodel.py puts them there); else on a generated 256 MiB
  GGUF of 200 F32 tensors;
- one tensor of 200 changed, on the generated GGUF (its bytes flipped in place).

Then, in rounds in a new random order each, on the same files: the host's rebuild
(appliance.patching.rebuild_file: kernel copy, read-back sha256, fsync) against a plain copy
(``shutil.copyfile`` + fsync) and a copy that is hashed as an install hashes it (copy, sha256
read back, fsync). The page cache is warm for all sides.

    .venv/bin/python bench/bench_delta.py --repeat 3                  # prints the section
    .venv/bin/python bench/bench_delta.py --out docs/benchmarks.md    # the reference run

:func:`measure` is the same, callable (the lead's bench harness can import it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchdoc import write_section

from appliance.patching import rebuild_file
from builder.cache import default_cache_root
from builder.ggufdiff import make_delta
from builder.gguflayout import read_layout, rewrite_string_metadata
from signing.patchformat import Patch

REPO = Path(__file__).resolve().parent.parent
HEADING = "## Deltas: GGUF-aware patches, bytes carried and rebuild time (`bench/bench_delta.py`)"
BEGIN, END, NOTES = (
    "<!-- bench_delta:begin -->",
    "<!-- bench_delta:end -->",
    "<!-- bench_delta:notes -->",
)
DEFAULT_WORKDIR = REPO / "bench" / "out" / "delta"
TEMPLATE_KEY = "tokenizer.chat_template"
NEW_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA = "a5fd3b62230a-gemma-3-270m-q4_k_m.gguf"
QWEN = "1d9614638d18-qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
TENSORS = 200
GENERATED_BYTES = 256 << 20
BLOCK_BYTES = 1 << 20
MIB = 1 << 20


@dataclass
class Case:
    name: str
    base: Path
    new: Path
    change: str
    results: dict[str, Any] = field(default_factory=dict)


def generated_gguf(path: Path, *, size: int = GENERATED_BYTES, seed: int = 0) -> None:
    """A GGUF of :data:`TENSORS` F32 tensors, ``size`` bytes of weights in all, with a chat
    template: the shape of a model without being one."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    columns = 1024
    rows = max(1, size // TENSORS // (4 * columns))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("bench_delta generated")
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for index in range(TENSORS):
        writer.add_tensor(
            f"blk.{index}.weight", rng.standard_normal((rows, columns), dtype=np.float32)
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def one_tensor_changed(base: Path, new: Path, index: int = TENSORS // 2) -> str:
    """``base`` with one tensor's bytes flipped (every 64th byte): still a valid GGUF."""
    shutil.copyfile(base, new)
    info = sorted(read_layout(base).tensors, key=lambda t: t.offset)[index]
    region = read_layout(base).region(("tensor", info.name, info.shape, info.ggml_type))
    with new.open("r+b") as out:
        out.seek(region.offset)
        data = bytearray(out.read(region.length))
        for i in range(0, len(data), 64):
            data[i] ^= 0xFF
        out.seek(region.offset)
        out.write(data)
    return f"{info.name} ({region.length:,} bytes) of {TENSORS}"


def cases(work: Path) -> list[Case]:
    models = default_cache_root() / "models"
    found: list[Case] = []
    for name, label in ((GEMMA, "Gemma 3 270M Q4_K_M"), (QWEN, "Qwen2.5-Coder 0.5B Q4_K_M")):
        model = models / name
        if not model.is_file():
            continue
        new = work / f"template-{name}"
        had = TEMPLATE_KEY in read_layout(model).keys
        rewrite_string_metadata(model, new, TEMPLATE_KEY, NEW_TEMPLATE)
        change = f"chat template {'replaced' if had else 'added'} ({len(NEW_TEMPLATE)} chars)"
        found.append(Case(f"template, {label}", model, new, change))
    generated = work / "generated.gguf"
    generated_gguf(generated)
    if not found:
        new = work / "generated-template.gguf"
        rewrite_string_metadata(generated, new, TEMPLATE_KEY, NEW_TEMPLATE)
        found.append(Case("template, generated 256 MiB", generated, new, "chat template replaced"))
    changed = work / "generated-one-tensor.gguf"
    what = one_tensor_changed(generated, changed)
    found.append(Case("one tensor of 200, generated 256 MiB", generated, changed, what))
    return found


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain_copy(source: Path, dest: Path) -> None:
    shutil.copyfile(source, dest)
    _fsync(dest)


def _hashed_copy(source: Path, dest: Path) -> None:
    shutil.copyfile(source, dest)
    digest = hashlib.sha256()
    with dest.open("rb", buffering=0) as back:
        while chunk := back.read(MIB):
            digest.update(chunk)
    _fsync(dest)


def measure(work: Path, *, repeat: int = 3, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every case's sizes and the rebuild's timings (module docstring); removes ``work``."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    began = time.perf_counter()
    try:
        found = cases(work)
        for case in found:
            say(f"== {case.name}: {case.change}")
            started = time.perf_counter()
            ours = make_delta(case.base, case.new, literal_out=work / "literal.bin")
            diff_s = time.perf_counter() - started
            blocks = make_delta(
                case.base,
                case.new,
                literal_out=work / "blocks.bin",
                gguf_aware=False,
                block_bytes=BLOCK_BYTES,
            )
            (work / "blocks.bin").unlink()
            patch = Patch.from_bytes(ours.patch.to_bytes())
            case.results = {
                "full_bytes": patch.target.size,
                "weights_bytes": patch.target.size - read_layout(case.new).data_offset,
                "literal_bytes": patch.literal.size,
                "patch_json_bytes": len(ours.patch.to_bytes()),
                "ops": len(patch.ops),
                "blocks_literal_bytes": blocks.patch.literal.size,
                "diff_s": diff_s,
                "reason": ours.reason,
            }
            sides: dict[str, Callable[[Path], object]] = {
                "rebuild (patch)": lambda dest, patch=patch, case=case: rebuild_file(
                    patch, base=case.base, literal=work / "literal.bin", target=dest
                ),
                "plain copy + fsync": lambda dest, case=case: _plain_copy(case.new, dest),
                "copy + sha256 + fsync": lambda dest, case=case: _hashed_copy(case.new, dest),
            }
            times: dict[str, list[float]] = {name: [] for name in sides}
            for _ in range(repeat):
                order = list(sides)
                random.shuffle(order)
                for name in order:
                    dest = work / "out.gguf"
                    started = time.perf_counter()
                    sides[name](dest)
                    times[name].append(time.perf_counter() - started)
                    dest.unlink()
            case.results["times"] = times
            (work / "literal.bin").unlink()
            say(f"   {ours.reason}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "took_s": time.perf_counter() - began,
        "repeat": repeat,
        "nproc": os.cpu_count(),
        "cases": [{"name": c.name, "change": c.change, **c.results} for c in found],
    }


def markdown(res: dict[str, Any]) -> str:
    lines = [
        BEGIN,
        HEADING,
        "",
        f"Run {res['started']}, took {res['took_s'] / 60:.1f} min, {res['nproc']} cores, "
        f"{res['repeat']} rounds (median, min..max). Literal bytes are what the delta bundle "
        "carries for the file besides the patch's JSON; the block column is a fixed 1 MiB "
        "block diff of the same two files (a block matches any block of the base).",
        "",
        "| case | change | full size | carried (ours) | / full | / weights | patch JSON | ops "
        "| carried (1 MiB blocks) | diff time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in res["cases"]:
        full, carried = case["full_bytes"], case["literal_bytes"]
        lines.append(
            f"| {case['name']} | {case['change']} | {full / MIB:,.1f} MiB | {carried:,} B "
            f"| {carried / full:.4%} | {carried / case['weights_bytes']:.4%} "
            f"| {case['patch_json_bytes']:,} B | {case['ops']} "
            f"| {case['blocks_literal_bytes'] / MIB:,.1f} MiB "
            f"({case['blocks_literal_bytes'] / full:.1%}) | {case['diff_s']:.1f} s |"
        )
    lines += [
        "",
        "Rebuild on the host (warm page cache) against copying the complete file:",
        "",
        "| case | rebuild (patch) | plain copy + fsync | copy + sha256 + fsync "
        "| rebuild / hashed copy |",
        "|---|---|---|---|---|",
    ]
    for case in res["cases"]:
        times = case["times"]

        def spread(values: list[float]) -> str:
            return f"{statistics.median(values):.2f} s ({min(values):.2f}..{max(values):.2f})"

        ratio = statistics.median(
            a / b
            for a, b in zip(times["rebuild (patch)"], times["copy + sha256 + fsync"], strict=True)
        )
        lines.append(
            f"| {case['name']} | {spread(times['rebuild (patch)'])} "
            f"| {spread(times['plain copy + fsync'])} | {spread(times['copy + sha256 + fsync'])} "
            f"| {ratio:.2f}x |"
        )
    lines += [
        "",
        "Reproduce: `.venv/bin/python bench/bench_delta.py "
        f"--repeat {res['repeat']} --out docs/benchmarks.md`.",
        "",
        NOTES,
        END,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="rounds (default %(default)s)")
    parser.add_argument("--out", type=Path, action="append", default=[], help="markdown file")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args = parser.parse_args()
    res = measure(args.workdir.resolve(), repeat=args.repeat)
    section = markdown(res)
    print("\n" + section)
    for path in args.out:
        write_section(path, section, begin=BEGIN, end=END, notes=NOTES, heading=HEADING)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
