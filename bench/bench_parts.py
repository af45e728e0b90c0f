"""Install and verify straight from split parts, and parity, against one bundle file and the
standard tools, ratios in one run (issue 11, "Measurements"; docs/adr/0015-split-bundles.md).

One GGUF-shaped bundle (a single ``model.gguf`` of random bytes, ``--size``), built and signed
with the real CLI, is split with ``appliance-builder split`` into 8 parts, and into 8 parts
plus one parity part. Every side is a child process (``appliance``, ``appliance-builder``,
``tar``, ``openssl``, ``split``), run one at a time. In each round every group runs its sides
in a new random order, and each ratio is taken within the round (ours / baseline), so that
what the shared machine does meanwhile hits both sides of a ratio alike; a ratio is reported
as the median of its rounds with their min..max.

    .venv/bin/python bench/bench_parts.py --size 64M --repeat 1            # a smoke run
    .venv/bin/python bench/bench_parts.py --out docs/benchmarks.md         # the reference run

See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench_bundle import Sample, machine, parse_size, run_child, tools
from benchdoc import write_section

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = REPO / "bench" / "out" / "parts"
HEADING = "## Split bundles: install and verify from parts, parity (`bench/bench_parts.py`)"
BEGIN, END, NOTES = (
    "<!-- bench_parts:begin -->",
    "<!-- bench_parts:end -->",
    "<!-- bench_parts:notes -->",
)
PARTS = 8
MISSING = 5  # the data part the rebuild sides lose: one in the middle, not the head's part 1
STRIPE = 64 << 10  # split's stripe and minimum part size: part sizes are multiples of it
MIB = 1 << 20
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
GNU_TIME = "/usr/bin/time"
TAR, OPENSSL, SPLIT = "tar -xf + sync", "openssl dgst -sha256", "split -b + sync (coreutils)"
LOST = f"8 + 1 parity, part {MISSING} missing"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")

# Issue 11, "Measurements": ours / baseline, the median of the rounds' ratios.
PARTS_TARGET = 1.05
INSTALL_TARGET = 1.0
VERIFY_TARGET = 0.6


# -- child processes -----------------------------------------------------------------------


def read_once(paths: Sequence[Path]) -> None:
    """Read files (a directory: every file in it) once, so that they are in the page cache."""
    buf = bytearray(8 * MIB)
    for path in paths:
        for file in sorted(path.iterdir()) if path.is_dir() else [path]:
            with file.open("rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def drop_caches() -> None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``: clean page cache, dentries and inodes."""
    os.sync()
    DROP_CACHES.write_text("3\n")


def cold_cache_unavailable() -> str | None:
    """Why the cold-cache group cannot run here, or None when dropping the cache works."""
    if os.geteuid() != 0:
        return "not root: /proc/sys/vm/drop_caches needs root"
    try:
        drop_caches()
    except OSError as exc:
        return f"{DROP_CACHES}: {exc.strerror}"
    return None


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


# -- set-up with the real CLI ---------------------------------------------------------------


@dataclass
class Fixture:
    """Keys and a root made once with the real CLI; the bundle and its splits (not timed)."""

    work: Path
    appliance: str
    builder: str
    log: Path
    key: Path = field(init=False)
    root_json: Path = field(init=False)
    fingerprint: str = field(init=False)
    skip_health: list[str] = field(init=False)

    def __post_init__(self) -> None:
        keys = self.work / "keys"
        keys.mkdir(parents=True)
        self.key = keys / "signer.pem"
        for key in (keys / "root.pem", self.key):
            self.cli(self.builder, "keygen", str(key))
        self.root_json = self.work / "root.json"
        self.cli(
            self.builder,
            "root",
            "create",
            "--root-key",
            str(keys / "root.pem"),
            "--bundle-key",
            f"{self.key}.pub",
            "--threshold",
            "1",
            "-o",
            str(self.root_json),
        )
        self.fingerprint = self.output(self.builder, "root", "fingerprint", str(self.root_json))
        # Step I7 loads the model with its runtime: random weights cannot load, and loading a
        # model is no part of the copy being measured (as in bench_bundle.py).
        usage = self.output(self.appliance, "install", "--help")
        self.skip_health = ["--skip-health-check"] if "--skip-health-check" in usage else []

    def cli(self, *argv: str) -> Sample:
        return run_child(argv, log=self.log)

    def output(self, *argv: str) -> str:
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()

    def host(self, root: Path, *argv: str | Path) -> Sample:
        return self.cli(self.appliance, "--root", str(root), *map(str, argv))

    def fresh_host(self, root: Path) -> None:
        shutil.rmtree(root, ignore_errors=True)
        self.host(root, "trust", "init", self.root_json, "--fingerprint", self.fingerprint)

    def build(self, size: int) -> tuple[Path, Sample]:
        """One large incompressible file as the model (as quantised GGUF weights are), and a
        recipe: the shape of a real bundle, whose bytes are nearly all one file."""
        src = self.work / "src"
        src.mkdir()
        write_random(src / "model.gguf", size)
        recipe = src / "bench.toml"
        recipe.write_text(
            '[bundle]\nname = "bench"\nversion = "1.0.0"\n\n[model]\npath = "model.gguf"\n\n'
            '[runtime]\nbackend = "llama.cpp"\ncontext_size = 256\n'
        )
        bundle = self.work / "bundle.tar"
        sample = self.cli(
            self.builder, "build", str(recipe), "--key", str(self.key), "-o", str(bundle)
        )
        shutil.rmtree(src)
        return bundle, sample

    def split(self, bundle: Path, out: Path, part_size: int, parity: int = 0) -> Sample:
        argv = [self.builder, "split", str(bundle), "--size", f"{part_size // 1024}K"]
        return self.cli(*argv, *(["--parity", str(parity)] if parity else []), "-o", str(out))


def write_random(path: Path, size: int) -> None:
    chunk = 4 * MIB
    with path.open("wb") as fh:
        left = size
        while left:
            n = min(chunk, left)
            fh.write(os.urandom(n))
            left -= n


def part_size_for(bundle_bytes: int) -> int:
    """The smallest multiple of the stripe that splits the bundle into exactly PARTS parts."""
    return -(-bundle_bytes // (PARTS * STRIPE)) * STRIPE


def without_part(full: Path, out: Path, number: int) -> None:
    """The parts of ``full`` less data part ``number``, as hard links (a medium that lost one)."""
    out.mkdir()
    for file in full.iterdir():
        if not file.name.endswith(f".{number:03d}"):
            os.link(file, out / file.name)


# -- the rounds -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    """One command: ``prepare`` (untimed), then ``run`` (timed) after the cache is set up:
    ``reads`` read once (warm), or the page cache dropped (cold)."""

    prepare: Callable[[], None]
    run: Callable[[], Sample]
    reads: tuple[Path, ...]


@dataclass(frozen=True)
class Group:
    name: str
    sides: dict[str, Side]
    cold: bool = False


Samples = dict[str, dict[str, list[Sample]]]


def run_rounds(groups: Sequence[Group], repeat: int) -> Samples:
    """Every group's sides once per round, in a new random order each round and group.

    A random order, not a rotation: a rotation keeps every side behind the same predecessor,
    and what a predecessor leaves behind (freed page cache, pages the VM host reclaimed) made
    two identical installs differ by up to 1.5x in bench_bundle.py.
    """
    samples: Samples = {g.name: {n: [] for n in g.sides} for g in groups}
    for rnd in range(repeat):
        started = time.perf_counter()
        for group in groups:
            order = list(group.sides)
            random.Random(f"{group.name}:{rnd}").shuffle(order)  # noqa: S311 - an order
            for name in order:
                side = group.sides[name]
                side.prepare()
                if group.cold:
                    drop_caches()
                else:
                    os.sync()  # what the previous side and its clean-up left dirty
                    read_once(side.reads)
                samples[group.name][name].append(side.run())
        print(f"   round {rnd + 1}/{repeat}: {time.perf_counter() - started:.0f} s", flush=True)
    return samples


def build_groups(
    fx: Fixture, sets: dict[str, Path], part_size: int, *, cold: bool
) -> tuple[list[Group], dict[str, int]]:
    """The sides, and where the split sides record the bytes they wrote."""
    bundle = sets["file"]
    scratch = fx.work / "scratch"
    target = scratch / "out"
    verify_host = fx.work / "verify-host"
    fx.fresh_host(verify_host)
    written: dict[str, int] = {}

    def reset() -> None:
        """Remove what the previous side wrote (its sync happens before the timed run)."""
        shutil.rmtree(scratch, ignore_errors=True)
        target.mkdir(parents=True)

    def reset_host() -> None:
        reset()
        fx.fresh_host(scratch / "host")

    def tar_sync() -> Sample:
        script = 'tar -xf "$1" -C "$2" && sync'
        return run_child(["sh", "-c", script, "sh", str(bundle), str(target)], log=fx.log)

    def install(source: Path) -> Side:
        return Side(
            reset_host,
            lambda: fx.host(scratch / "host", "install", source, *fx.skip_health),
            (source,),
        )

    def verify(source: Path) -> Side:
        return Side(reset, lambda: fx.host(verify_host, "verify", source), (source,))

    def openssl() -> Sample:
        return run_child(["openssl", "dgst", "-sha256", str(bundle)], log=fx.log)

    def split(name: str, parity: int | None) -> Side:
        def run() -> Sample:
            if parity is None:  # coreutils: the same byte ranges, then everything flushed
                script = f'split -b {part_size} -d -a 3 "$1" "$2"/bundle.tar. && sync'
                sample = run_child(["sh", "-c", script, "sh", str(bundle), str(target)], log=fx.log)
            else:
                sample = fx.split(bundle, target, part_size, parity)
            written[name] = tree_bytes(target)
            return sample

        return Side(reset, run, (bundle,))

    groups = [
        Group(
            "install",
            {
                TAR: Side(reset, tar_sync, (bundle,)),
                "install (file)": install(bundle),
                "install (8 parts)": install(sets["8"]),
                "install (8 + 1 parity)": install(sets["8+1"]),
                f"install ({LOST})": install(sets["8+1 lost"]),
            },
        ),
        Group(
            "verify",
            {
                OPENSSL: Side(reset, openssl, (bundle,)),
                "verify (file)": verify(bundle),
                "verify (8 parts)": verify(sets["8"]),
                "verify (8 + 1 parity)": verify(sets["8+1"]),
                f"verify ({LOST})": verify(sets["8+1 lost"]),
            },
        ),
        Group(
            "split",
            {
                name: split(name, parity)
                for name, parity in (
                    (SPLIT, None),
                    ("split", 0),
                    ("split --parity 1", 1),
                    ("split --parity 2", 2),
                )
            },
        ),
    ]
    if cold:
        groups.append(
            Group(
                "cold",
                {
                    TAR: Side(reset, tar_sync, ()),
                    "install (file)": install(bundle),
                    "install (8 parts)": install(sets["8"]),
                    OPENSSL: Side(reset, openssl, ()),
                    "verify (file)": verify(bundle),
                    "verify (8 parts)": verify(sets["8"]),
                },
                cold=True,
            )
        )
    return groups, written


# -- summaries -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ratio:
    """Side ``ours`` / side ``base`` of one group, with issue 11's target or what it shows."""

    group: str
    ours: str
    base: str
    target: float | None = None
    why: str = ""


def ratios(cold: bool) -> list[Ratio]:
    rows = [
        Ratio("install", "install (8 parts)", "install (file)", PARTS_TARGET),
        Ratio("verify", "verify (8 parts)", "verify (file)", PARTS_TARGET),
        Ratio("install", "install (file)", TAR, INSTALL_TARGET),
        Ratio("install", "install (8 parts)", TAR, why="for scale"),
        Ratio("verify", "verify (file)", OPENSSL, VERIFY_TARGET),
        Ratio("verify", "verify (8 parts)", OPENSSL, why="for scale"),
        Ratio("install", "install (8 + 1 parity)", "install (8 parts)", why="hashes one more part"),
        Ratio("install", f"install ({LOST})", "install (8 + 1 parity)", why="rebuilds a part"),
        Ratio("verify", f"verify ({LOST})", "verify (8 + 1 parity)", why="rebuilds a part"),
        Ratio("split", "split --parity 1", "split", why="parity overhead"),
        Ratio("split", "split --parity 2", "split", why="parity overhead"),
        Ratio("split", "split", SPLIT, why="for scale"),
    ]
    if cold:
        rows += [
            Ratio("cold", "install (8 parts)", "install (file)", PARTS_TARGET),
            Ratio("cold", "verify (8 parts)", "verify (file)", PARTS_TARGET),
            Ratio("cold", "install (file)", TAR, INSTALL_TARGET),
            Ratio("cold", "verify (file)", OPENSSL, VERIFY_TARGET),
        ]
    return rows


def rebuild_cost(group: dict[str, list[Sample]], missing: str, full: str) -> list[float]:
    return [m.wall_s - f.wall_s for m, f in zip(group[missing], group[full], strict=True)]


def walls(samples: Sequence[Sample]) -> list[float]:
    return [s.wall_s for s in samples]


def spread(values: Sequence[float], fmt: str = ".2f", unit: str = "") -> str:
    mid = statistics.median(values)
    return f"{mid:{fmt}}{unit} ({min(values):{fmt}}..{max(values):{fmt}}{unit})"


def size_label(size: int) -> str:
    for unit in ("G", "M", "K"):
        if size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]} {unit}iB"
    return f"{size} B"


def markdown(res: dict[str, Any], samples: Samples, args: argparse.Namespace) -> str:
    lay = res["layout"]
    m = res["machine"]
    cold_note = (
        "Cold cache (group `cold`): before each side `sync; echo 3 > /proc/sys/vm/drop_caches` "
        "instead of the read (the interpreter's own files are dropped too: our CLI starts cold)"
        if res["cold"] is None
        else f"No cold-cache group: {res['cold']}"
    )
    lines = [
        BEGIN,
        HEADING,
        "",
        f"Run {res['started']}, took {res['took_s'] / 60:.1f} min. Machine: {m['summary']}; "
        f"load average (1 min) before / after: {res['load_start'][0]:.2f} / "
        f"{res['load_end'][0]:.2f}. Code at {m['git_head']} ({m['git_dirty_files']} paths changed "
        "or new in the working tree).",
        "",
        f"- Bundle: one `model.gguf` of {size_label(res['size'])} random bytes (GGUF-shaped: "
        "nearly all of it one incompressible file) and a recipe, built and signed with "
        f"`appliance-builder build` (in {res['build'].wall_s:.1f} s): {lay['bundle_bytes']:,} "
        "bytes.",
        f"- `appliance-builder split --size {lay['part_size'] // 1024}K`: {PARTS} parts of "
        f"{lay['part_size']:,} bytes (the last {lay['last_part']:,}); `--parity 1` adds one "
        f"parity part as large as part 1. The rebuild sides lose data part {MISSING}.",
        "- Every install on a fresh `appliance --root` (`trust init` untimed)"
        + (", `--skip-health-check`" if res["skip_health"] else "")
        + "; every verify on one host.",
        f"- {res['repeat']} round{'s' if res['repeat'] != 1 else ''}; in each, every group's "
        "sides one at a time, in a new random order. Before each side the previous side's "
        "output is removed and `sync` run, then (warm) the side's input is read once: every "
        "warm side reads from the page cache.",
        f"- {cold_note}.",
        "",
        "Ratios, ours / baseline, taken round by round: median (min..max) of the rounds; the "
        "ratio of the medians beside it.",
        "",
        "| ratio | rounds: median (min..max) | of medians | target (issue 11) |",
        "|---|---|---|---|",
    ]
    for r in ratios(res["cold"] is None):
        ours, base = samples[r.group][r.ours], samples[r.group][r.base]
        per_round = [o.wall_s / b.wall_s for o, b in zip(ours, base, strict=True)]
        of_medians = statistics.median(walls(ours)) / statistics.median(walls(base))
        mid = statistics.median(per_round)
        if r.target is None:
            goal = r.why
        else:
            goal = f"<= {r.target:.2f}x: " + ("meets" if mid <= r.target else "**misses**")
        what = ("cold: " if r.group == "cold" else "") + f"`{r.ours}` / `{r.base}`"
        lines.append(f"| {what} | {spread(per_round, unit='x')} | {of_medians:.2f}x | {goal} |")
    rebuilt = lay["part_size"] / MIB
    extra = []
    for g in ("install", "verify"):
        cost = rebuild_cost(samples[g], f"{g} ({LOST})", f"{g} (8 + 1 parity)")
        mid = statistics.median(cost)
        rate = f", {rebuilt / mid:.0f} MiB/s" if mid > 0 else ""
        extra.append(f"{g} {spread(cost, fmt='+.2f')} s{rate}")
    lines += [
        "",
        f"Rebuilding data part {MISSING} ({rebuilt:.0f} MiB) from parity, the missing set's time "
        f"minus the full set's, round by round: {', '.join(extra)}.",
    ]
    lines += [
        "",
        "Wall time of the whole command, median (min..max); CPU user+sys (median); peak RSS "
        "(largest):",
        "",
        "| group | side | wall s | CPU s | peak RSS MiB |",
        "|---|---|---|---|---|",
    ]
    for group, sides in samples.items():
        for name, got in sides.items():
            cpu = statistics.median(s.user_s + s.sys_s for s in got)
            rss = max(s.maxrss_kib for s in got) / 1024
            lines.append(f"| {group} | {name} | {spread(walls(got))} | {cpu:.2f} | {rss:.1f} |")
    lines += [
        "",
        "Bytes written by the split sides (parts, parity parts and the part index):",
        "",
        "| side | bytes | / bundle |",
        "|---|---|---|",
    ]
    for name in samples["split"]:
        size = res["written"][name]
        lines.append(f"| {name} | {size:,} | {size / lay['bundle_bytes']:.3f}x |")
    lines += [
        "",
        "Reproduce: `.venv/bin/python bench/bench_parts.py "
        f"--size {args.size} --repeat {args.repeat} --out docs/benchmarks.md`.",
        "",
        NOTES,
        END,
    ]
    return "\n".join(lines) + "\n"


# -- the machine, the output -----------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size", default="1G", help="model bytes, K/M/G binary (default %(default)s)"
    )
    parser.add_argument("--repeat", type=int, default=7, help="rounds (default %(default)s)")
    parser.add_argument(
        "--out",
        type=Path,
        action="append",
        default=[],
        help="FILE.json: every sample; any other FILE: the markdown section, between "
        "bench_parts markers (notes kept); repeatable",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help="scratch directory, removed at the end (default %(default)s)",
    )
    parser.add_argument(
        "--no-cold",
        action="store_true",
        help="skip the cold-cache group even where root can drop caches",
    )
    args = parser.parse_args()
    size = parse_size(args.size)

    appliance, builder = tools()
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ.setdefault("SOURCE_DATE_EPOCH", str(int(time.time())))
    os.environ.pop("APPLIANCE_ROOT", None)
    began = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_start = os.getloadavg()
    try:
        fx = Fixture(work, appliance, builder, work / "commands.log")
        print(f"== building a {size_label(size)} bundle, splitting it", flush=True)
        bundle, build = fx.build(size)
        bundle_bytes = bundle.stat().st_size
        part_size = part_size_for(bundle_bytes)
        sets = {"file": bundle, "8": work / "parts-8", "8+1": work / "parts-8+1"}
        fx.split(bundle, sets["8"], part_size)
        fx.split(bundle, sets["8+1"], part_size, parity=1)
        sets["8+1 lost"] = work / f"parts-8+1-without-{MISSING}"
        without_part(sets["8+1"], sets["8+1 lost"], MISSING)
        count = len([p for p in sets["8"].iterdir() if p.suffix[1:].isdigit()])
        if count != PARTS:
            sys.exit(f"split made {count} parts, not {PARTS}")
        cold = "--no-cold given" if args.no_cold else cold_cache_unavailable()
        groups, written = build_groups(fx, sets, part_size, cold=cold is None)
        print(
            f"== {args.repeat} rounds: {', '.join(g.name for g in groups)}"
            + ("" if cold is None else f" (no cold group: {cold})"),
            flush=True,
        )
        samples = run_rounds(groups, args.repeat)
        res: dict[str, Any] = {
            "started": started,
            "took_s": time.perf_counter() - began,
            "size": size,
            "repeat": args.repeat,
            "machine": machine(work),
            "load_start": load_start,
            "load_end": os.getloadavg(),
            "cold": cold,
            "skip_health": bool(fx.skip_health),
            "build": build,
            "layout": {
                "bundle_bytes": bundle_bytes,
                "part_size": part_size,
                "last_part": bundle_bytes - (PARTS - 1) * part_size,
            },
            "written": written,
            "samples": samples,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    section = markdown(res, samples, args)
    print("\n" + section)
    for path in args.out:
        if path.suffix == ".json":
            path.write_text(json.dumps(res, indent=1, default=asdict) + "\n")
        else:
            write_section(path, section, begin=BEGIN, end=END, notes=NOTES, heading=HEADING)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
