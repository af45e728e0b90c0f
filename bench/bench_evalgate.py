"""What the evaluation gate (step I7b, docs/adr/0020-evaluation-gate.md) adds to an install.

The same bundle is installed over the same active slot, with the gate (``InstallOptions()``)
and without it (``skip_eval=True``), interleaved, ``--repeat`` times each, on a fresh copy of
the host every time (the slots hard-linked: the active slot is only read). The difference of
the medians is the gate: two model loads in child processes and every item answered by both
slots, one after the other. Two cases:

- ``tiny``: the generated echo models of tests/evalmodels.py (44 items, 1 token each);
- ``qwen``: Qwen2.5-Coder 0.5B Instruct Q4_K_M (tests/realmodel.py, when it is in the
  builder's cache), 20 chat items of 8 tokens at most, 2 threads.

    .venv/bin/python bench/bench_evalgate.py --repeat 3 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchdoc import write_section  # noqa: E402

from appliance.installer import Appliance, InstallOptions  # noqa: E402
from builder.build import build_bundle  # noqa: E402
from builder.cache import default_cache_root  # noqa: E402
from signing.keys import SigningKey  # noqa: E402
from signing.metadata import BUNDLE_ROLE, ROOT_ROLE, Role, Root, sign_root  # noqa: E402
from tests.evalmodels import choice_set, write_model  # noqa: E402

BEGIN = "<!-- bench_evalgate:begin -->"
END = "<!-- bench_evalgate:end -->"
NOTES = "<!-- bench_evalgate:notes -->"
HEADING = "## Evaluation gate: added install time"
QWEN = "1d9614638d18-qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"

QWEN_ITEMS = [
    ("add", "What is 2+3? Reply with the number only.", "5"),
    ("mul", "What is 6*7? Reply with the number only.", "42"),
    ("sub", "What is 10-4? Reply with the number only.", "6"),
    ("capital-fr", "What is the capital of France? One word.", "Paris"),
    ("capital-it", "What is the capital of Italy? One word.", "Rome"),
    ("capital-jp", "What is the capital of Japan? One word.", "Tokyo"),
    ("color-sky", "What colour is a clear daytime sky? One word.", "blue"),
    ("legs-dog", "How many legs does a dog have? Reply with the number only.", "4"),
    ("days-week", "How many days are in a week? Reply with the number only.", "7"),
    ("py-len", "Which Python built-in returns the length of a list? Name only.", "len"),
    ("py-print", "Which Python built-in writes text to stdout? Name only.", "print"),
    ("hex-ff", "What is 0xff in decimal? Reply with the number only.", "255"),
    ("sq-9", "What is the square root of 81? Reply with the number only.", "9"),
    ("opp-hot", "What is the opposite of hot? One word.", "cold"),
    ("ice", "What does water become when frozen? One word.", "ice"),
    ("sql-select", "Which SQL keyword reads rows from a table? One word.", "SELECT"),
    ("git-commit", "Which git command records staged changes? One word: git ...", "commit"),
    ("http-ok", "Which HTTP status code means OK? Reply with the number only.", "200"),
    ("months", "How many months are in a year? Reply with the number only.", "12"),
    ("planet", "Which planet do we live on? One word.", "Earth"),
]


def _root(key: SigningKey) -> bytes:
    root = Root(
        version=1,
        expires=datetime.now(UTC).replace(microsecond=0) + timedelta(days=30),
        keys={key.keyid: key.public_key},
        roles={
            ROOT_ROLE: Role(keyids=(key.keyid,), threshold=1),
            BUNDLE_ROLE: Role(keyids=(key.keyid,), threshold=1),
        },
    )
    return sign_root(root, [key]).to_bytes()


def _bundle(
    work: Path, key: SigningKey, version: str, model: Path, *, lines: list[str], threads: int
) -> Path:
    directory = work / f"recipe-{version}"
    directory.mkdir()
    os.link(model, directory / model.name)  # no copy of a 491 MB model
    (directory / "set.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (directory / "recipe.toml").write_text(
        f'[bundle]\nname = "bench"\nversion = "{version}"\n[model]\npath = "{model.name}"\n'
        f'[runtime]\nbackend = "llama.cpp"\ncontext_size = 512\nthreads = {threads}\n'
        '[evaluation]\nset = "set.jsonl"\n'
        # the chat set answers in a few words; the choice set in one letter
        + ("max_tokens = 8\n" if threads == 2 else "max_tokens = 1\n")
    )
    out = work / f"bundle-{version}.tar"
    build_bundle(directory / "recipe.toml", out, [key])
    return out


def _copy_host(base: Path, to: Path) -> Path:
    def link_slots(src: str, dst: str) -> None:
        if f"{os.sep}slots{os.sep}" in src:
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(base, to, symlinks=True, copy_function=link_slots)
    return to


def measure(case: str, work: Path, model_old: Path, model_new: Path, repeat: int) -> dict[str, Any]:
    key = SigningKey.generate()
    if case == "qwen":
        lines = [
            json.dumps(
                {
                    "id": i,
                    "messages": [{"role": "user", "content": q}],
                    "expected": a,
                    "check": "contains",
                }
            )
            for i, q, a in QWEN_ITEMS
        ]
        threads = 2
    else:
        lines, threads = choice_set(), 1
    first = _bundle(work, key, "1.0.0", model_old, lines=lines, threads=threads)
    second = _bundle(work, key, "2.0.0", model_new, lines=lines, threads=threads)
    base = work / "base"
    app = Appliance(base)
    app.trust_init(_root(key), fingerprint=None)
    app.install(str(first), InstallOptions(grace_period_s=0, skip_eval=True))
    times: dict[str, list[float]] = {"gate": [], "skip": []}
    last: dict[str, Any] = {}
    for i in range(repeat):
        for arm in ("gate", "skip"):
            host = _copy_host(base, work / f"host-{arm}-{i}")
            target = Appliance(host)
            start = time.perf_counter()
            target.install(str(second), InstallOptions(grace_period_s=0, skip_eval=arm == "skip"))
            times[arm].append(time.perf_counter() - start)
            if arm == "gate":
                last = list(target.audit.records())[-1]["evaluation"]
            shutil.rmtree(host)
    gate, skip = statistics.median(times["gate"]), statistics.median(times["skip"])
    items = int(last["items"])
    return {
        "case": case,
        "items": items,
        "gate_s": gate,
        "skip_s": skip,
        "added_s": gate - skip,
        "per_item_ms": 1000 * (gate - skip) / items,
        "new_p95_ms": last["new"]["p95_ms"],
        "active_p95_ms": last["active"]["p95_ms"],
        "new_accuracy": last["new"]["accuracy"],
        "active_accuracy": last["active"]["accuracy"],
        "verdict": last["verdict"],
        "times": times,
    }


def section(rows: list[dict[str, Any]], repeat: int) -> str:
    lines = [
        BEGIN,
        HEADING,
        "",
        f"`bench/bench_evalgate.py --repeat {repeat}` ({os.cpu_count()} cores; medians). The same "
        "bundle installed over the same active slot with the gate and with `--skip-eval`: the "
        "difference is the gate (two model loads in child processes, every item answered by "
        "both slots in turn, greedy, one sequence at a time).",
        "",
        "| case | items | install with gate | with --skip-eval | gate adds | per item | "
        "p95/item new, active | accuracy new, active |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['items']} | {r['gate_s']:.2f} s | {r['skip_s']:.2f} s | "
            f"{r['added_s']:.2f} s | {r['per_item_ms']:.0f} ms | "
            f"{float(r['new_p95_ms']):.0f} ms, {float(r['active_p95_ms']):.0f} ms | "
            f"{r['new_accuracy']}%, {r['active_accuracy']}% |"
        )
    lines += ["", NOTES, END]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cases", default="tiny,qwen")
    parser.add_argument("--out", type=Path, action="append", default=[])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-evalgate-") as tmp:
        work = Path(tmp)
        for case in args.cases.split(","):
            case_dir = work / case
            case_dir.mkdir()
            if case == "tiny":
                old, new = case_dir / "echo.gguf", case_dir / "echo2.gguf"
                write_model(old, answer=None)
                write_model(new, answer=None, scale=9.0)
            else:
                qwen = default_cache_root() / "models" / QWEN
                if not qwen.is_file():
                    print(f"skipping qwen: {qwen} is not in the cache", file=sys.stderr)
                    continue
                old = new = qwen
            row = measure(case, case_dir, old, new, args.repeat)
            print(json.dumps(row), flush=True)
            rows.append(row)
    text = section(rows, args.repeat)
    print(text)
    for out in args.out:
        if out.suffix == ".md":
            write_section(out, text, begin=BEGIN, end=END, notes=NOTES, heading=HEADING)
        else:
            out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
