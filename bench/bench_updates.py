"""Updates: what a delta bundle carries, and how long it takes to install (issue 11, item 3).

Bundles are built with the real CLI from recipes with a real pip environment (the embedded
default's: llama-cpp-python built for any x86-64 host, and its dependencies, from the committed
lock) and a weights-dominated model folder of random bytes:

- `A` 1.0.0, the base;
- `B` 1.1.0: a new version, model and environment unchanged (a new recipe and SBOM only);
- `C` 1.2.0: `B` with one more package in the environment (a new lock: the environment
  changed, the weights did not).

`B` and `C` are built complete and as deltas on `A`. Every install runs on a copy of one host
that has `A` installed (copied untimed before each side), `--skip-health-check` (random
weights), so the sides differ only in what they install. Sides run in a new random order each
round; ratios are taken round by round. GGUF template and tensor edits: bench_delta.py.

    .venv/bin/python bench/bench_updates.py --size 1G --repeat 5 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_bundle import (
    Fixture,
    Sample,
    machine,
    parse_size,
    shuffled,
    tools,
    warm,
    write_random,
)
from benchdoc import write_section

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "lockfiles" / "pylock.llamacpp-cpu.toml"
DEFAULT_WORKDIR = Path("/tmp/bench-updates")


def recipe(src: Path, version: str, *, lock: Path, extra: tuple[str, ...] = ()) -> Path:
    requirements = ", ".join(f'"{r}"' for r in ("llama-cpp-python==0.3.36", *extra))
    path = src / "recipe.toml"
    path.write_text(
        f'[bundle]\nname = "bench"\nversion = "{version}"\n\n[model]\npath = "model"\n\n'
        '[runtime]\nbackend = "llama.cpp"\ncontext_size = 256\n\n'
        '[environment]\ntype = "pip"\nplatform = "manylinux_2_28_x86_64"\npython = "3.11"\n'
        f'requirements = [{requirements}]\nlock = "{lock}"\n'
        'build_from_source = ["llama-cpp-python"]\nbuild_isolation = true\n'
        'smoke_imports = ["llama_cpp"]\n'
    )
    return path


def build_all(fx: Fixture, size: int, work: Path) -> dict[str, Path]:
    model = work / "model-src"
    model.mkdir(parents=True)
    write_random(model / "weights.bin", size)
    (model / "config.json").write_text("{}\n")
    out: dict[str, Path] = {}
    locks = {"1.0.0": LOCK, "1.1.0": LOCK, "1.2.0": work / "pylock.changed.toml"}
    extras = {"1.2.0": ("six==1.17.0",)}
    for name, version in (("A", "1.0.0"), ("B", "1.1.0"), ("C", "1.2.0")):
        src = work / f"src-{name}"
        src.mkdir()
        shutil.copytree(model, src / "model", copy_function=_link)
        path = recipe(src, version, lock=locks[version], extra=extras.get(version, ()))
        out[name] = work / f"{name}.tar"
        key = ["--key", str(fx.key_a)]
        lock_first = ["--lock"] if version == "1.2.0" else []
        fx.cli(fx.builder, "build", str(path), *key, *lock_first, "-o", str(out[name]))
        if name != "A":
            out[f"{name}-delta"] = work / f"{name}-delta.tar"
            fx.cli(fx.builder, "build", str(path), *key, "--base", str(out["A"]),
                   "-o", str(out[f"{name}-delta"]))  # fmt: skip
    return out


def _link(src: str, dst: str) -> None:
    Path(dst).hardlink_to(src)


def carried(fx: Fixture, bundle: Path) -> tuple[int, int]:
    info = json.loads(
        subprocess.run(
            [fx.builder, "inspect", str(bundle), "--json"], check=True, capture_output=True
        ).stdout
    )
    skip = set()
    if "delta" in info:
        skip = set(info["delta"]["reuse"]) | {p["path"] for p in info["delta"]["patches"]}
    full = sum(e["size"] for e in info["entries"])
    return sum(e["size"] for e in info["entries"] if e["path"] not in skip), full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="weights bytes (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (default %(default)s)")
    parser.add_argument("--out", type=Path, help="docs/benchmarks.md: write the section")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args = parser.parse_args()
    size = parse_size(args.size)
    appliance, builder = tools()
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    began = time.perf_counter()
    fx = Fixture(work=work, appliance=appliance, builder=builder, log=work / "log.txt")
    bundles = build_all(fx, size, work)
    base_host = work / "host-base"
    fx.fresh_host(base_host)
    fx.host(base_host, "install", str(bundles["A"]), *fx.install_args())
    sides = {
        "B full": bundles["B"], "B delta": bundles["B-delta"],
        "C full": bundles["C"], "C delta": bundles["C-delta"],
    }  # fmt: skip
    samples: dict[str, list[Sample]] = {name: [] for name in sides}
    verify: dict[str, list[Sample]] = {name: [] for name in sides}
    host = work / "host"
    for rep in range(args.repeat):
        order = shuffled(list(sides), rep)
        for name in order:
            shutil.rmtree(host, ignore_errors=True)
            subprocess.run(["cp", "-a", str(base_host), str(host)], check=True)
            subprocess.run(["sync"], check=True)
            warm(sides[name])
            samples[name].append(fx.host(host, "install", str(sides[name]), *fx.install_args()))
            verify[name].append(fx.host(host, "verify", str(sides[name])))
    sizes = {name: carried(fx, path) for name, path in sides.items()}
    records = _delta_records(host)
    section = markdown(args, size, sides, sizes, samples, verify, records, work, began)
    print(section)
    if args.out is not None:
        write_section(
            args.out,
            section,
            begin="<!-- bench_updates:begin -->",
            end="<!-- bench_updates:end -->",
            notes="<!-- bench_updates:notes -->",
            heading="## Updates: delta bundles (`bench/bench_updates.py`)",
        )
    shutil.rmtree(work, ignore_errors=True)


def _delta_records(host: Path) -> list[dict[str, Any]]:
    lines = (host / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"delta"' in line]


def markdown(  # noqa: PLR0917 - one call, every figure of the run
    args: argparse.Namespace,
    size: int,
    sides: dict[str, Path],
    sizes: dict[str, tuple[int, int]],
    samples: dict[str, list[Sample]],
    verify: dict[str, list[Sample]],
    records: list[dict[str, Any]],
    work: Path,
    began: float,
) -> str:
    info = machine(work)
    med = {n: statistics.median(s.wall_s for s in v) for n, v in samples.items()}
    vmed = {n: statistics.median(s.wall_s for s in v) for n, v in verify.items()}
    lines = [
        "## Updates: delta bundles (`bench/bench_updates.py`)",
        "",
        "<!-- bench_updates:begin -->",
        f"Run {time.strftime('%Y-%m-%dT%H:%M:%S%z')}, took {(time.perf_counter() - began) / 60:.1f}"
        f" min, {args.repeat} rounds. Machine: {info['summary']}; code at {info['git_head']}.",
        "",
        f"Weights: {size:,} random bytes in a model folder; the environment: the embedded "
        "default's (llama-cpp-python 0.3.36 built for any x86-64 host, and its dependencies). "
        "Every install on a copy of a host that has A 1.0.0 installed, `--skip-health-check`.",
        "",
        "| update | bundle | carried bytes | full payload | carried / full | install s (median) "
        "| verify s (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    what = {"B": "new version, model and environment unchanged", "C": "environment changed "
            "(one more package, a new lock)"}  # fmt: skip
    for name in sides:
        c, full = sizes[name]
        lines.append(
            f"| {what[name[0]]} | {name} | {c:,} | {full:,} | {c / full:.4%} | "
            f"{med[name]:.2f} | {vmed[name]:.2f} |"
        )
    lines += ["", "Delta / complete bundle of the same update, round by round (median):", ""]
    for letter in "BC":
        ratios = [
            d.wall_s / f.wall_s
            for d, f in zip(samples[f"{letter} delta"], samples[f"{letter} full"], strict=True)
        ]
        lines.append(f"- {letter}: install {statistics.median(ratios):.2f}x")
    if records:
        last = records[-1]["delta"]
        lines += ["", f"Last delta install's audit record: `{json.dumps(last, sort_keys=True)}`"]
    lines += ["", "<!-- bench_updates:notes -->", "<!-- bench_updates:end -->"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
