"""Benchmark install, verify, co-sign and rollback against standard tools (docs/benchmarks.md).

Everything runs through the real command lines (``appliance-builder``, ``appliance``) as child
processes, one at a time. Each child is timed with ``time.perf_counter`` around spawn and
``os.wait4``, which also gives that child's own peak RSS and CPU time. Baselines and our
commands are interleaved within each repetition, in a new random order each repetition, and
the bundle is read once before every timed command so that every side starts from the same
warm page cache. Results are ratios of medians, never absolute thresholds.

    .venv/bin/python bench/bench_bundle.py --sizes 64M,256M,1G --repeat 5 --out bench/out/r.json

See bench/README.md.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
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

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = REPO / "bench" / "out" / "work"
MARK_BEGIN = "<!-- bench_bundle:begin -->"
MARK_END = "<!-- bench_bundle:end -->"
MIB = 1 << 20
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}

# Install targets (DESIGN.md, "Performance targets"): ratio of medians, ours / baseline.
INSTALL_TARGET = 1.3
VERIFY_TARGET = 1.15
RSS_TARGET_MIB = 100


# -- child processes -----------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    wall_s: float
    maxrss_kib: int
    user_s: float
    sys_s: float


class ChildError(RuntimeError):
    pass


GNU_TIME = "/usr/bin/time"


def run_child(argv: Sequence[str], *, log: Path, cwd: Path | None = None) -> Sample:
    """Run one command; return its wall time, peak RSS (its own and its children's) and CPU.

    The command runs under GNU time (``/usr/bin/time -f %M``, package ``time``) when present:
    the peak RSS that ``os.wait4`` reports for a child of this Python process never drops
    below this process's own RSS, because the child was forked from it (the kernel keeps the
    pre-exec high-water mark). The small ``time`` process has no such floor. Wall time comes
    from ``time.perf_counter`` around spawn and ``os.wait4``; CPU time from ``wait4``.
    """
    rss_file = log.with_name("maxrss.txt")
    wrapped = list(argv)
    if Path(GNU_TIME).exists():
        wrapped = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *argv]
    with log.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise ChildError(f"{argv[0]} exited {proc.returncode}:\n{tail}")
    maxrss = usage.ru_maxrss
    if wrapped is not argv and rss_file.exists():
        maxrss = int(rss_file.read_text().split()[-1])
        rss_file.unlink()
    return Sample(wall, maxrss, usage.ru_utime, usage.ru_stime)


def warm(path: Path) -> None:
    """Read a file once so that it is in the page cache (cannot drop caches here)."""
    buf = bytearray(8 * MIB)
    with path.open("rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass


def settle() -> None:
    """Flush what earlier commands (and their clean-up) left dirty, outside any timing."""
    os.sync()


def tools() -> tuple[str, str]:
    """The appliance and appliance-builder entry points of this interpreter's environment.

    The project's modules are compiled to bytecode first, as an installed wheel or the frozen
    program has them: with PYTHONDONTWRITEBYTECODE set (this machine sets it), every command
    would otherwise compile the modules changed since their last .pyc, about 25 ms of a
    verify's start-up that no host pays.
    """
    compileall.compile_dir(REPO / "appliance", quiet=1)
    compileall.compile_dir(REPO / "signing", quiet=1)
    compileall.compile_dir(REPO / "builder", quiet=1)
    found = []
    for name in ("appliance", "appliance-builder"):
        candidate = Path(sys.executable).parent / name
        path = str(candidate) if candidate.exists() else shutil.which(name)
        if path is None:
            sys.exit(f"{name} not found: run bench_bundle.py with the project's .venv/bin/python")
        found.append(path)
    return found[0], found[1]


# -- set-up with the real CLI ---------------------------------------------------------------


@dataclass
class Fixture:
    work: Path
    appliance: str
    builder: str
    log: Path
    root_json: Path = field(init=False)
    fingerprint: str = field(init=False)
    key_a: Path = field(init=False)
    key_b: Path = field(init=False)

    def __post_init__(self) -> None:
        keys = self.work / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        self.key_a, self.key_b = keys / "signer-a.pem", keys / "signer-b.pem"
        for key in (keys / "root.pem", self.key_a, self.key_b):
            self.cli(self.builder, "keygen", str(key))
        self.root_json = self.work / "root.json"
        self.cli(
            self.builder,
            "root",
            "create",
            "--root-key",
            str(keys / "root.pem"),
            "--bundle-key",
            f"{self.key_a}.pub",
            "--bundle-key",
            f"{self.key_b}.pub",
            "--threshold",
            "1",
            "-o",
            str(self.root_json),
        )
        self.fingerprint = subprocess.run(
            [self.builder, "root", "fingerprint", str(self.root_json)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def cli(self, *argv: str) -> Sample:
        return run_child(argv, log=self.log)

    def host(self, root: Path, *argv: str) -> Sample:
        return run_child([self.appliance, "--root", str(root), *argv], log=self.log)

    def install_args(self) -> list[str]:
        """``--skip-health-check`` where install has one (step I7 loads the model: random
        weights cannot load, and loading a model is no part of the copy being measured)."""
        if not hasattr(self, "_install_args"):
            usage = subprocess.run(
                [self.appliance, "install", "--help"], capture_output=True, text=True, check=True
            ).stdout
            self._install_args = ["--skip-health-check"] if "--skip-health-check" in usage else []
        return self._install_args

    def fresh_host(self, root: Path) -> None:
        """A new host root with the trusted root installed (not timed)."""
        shutil.rmtree(root, ignore_errors=True)
        self.host(root, "trust", "init", str(self.root_json), "--fingerprint", self.fingerprint)

    def build(self, size: int, files: int, version: str = "1.0.0") -> tuple[Path, float]:
        """A weights-dominated bundle: ``files`` random files of size/files bytes, a recipe."""
        src = self.work / f"src-{size}"
        model = src / "model"
        shutil.rmtree(src, ignore_errors=True)
        model.mkdir(parents=True)
        each = size // files
        for i in range(files):
            write_random(model / f"weights-{i:05d}.bin", each)
        recipe = src / "bench.toml"
        recipe.write_text(
            f'[bundle]\nname = "bench"\nversion = "{version}"\n\n'
            '[model]\npath = "model"\n\n[runtime]\nbackend = "llama.cpp"\ncontext_size = 256\n'
        )
        bundle = self.work / f"bundle-{size_label(size)}.tar"
        sample = self.cli(
            self.builder, "build", str(recipe), "--key", str(self.key_a), "-o", str(bundle)
        )
        shutil.rmtree(src)
        return bundle, sample.wall_s


def write_random(path: Path, size: int) -> None:
    """Incompressible bytes (as quantised weights are, near enough)."""
    chunk = 4 * MIB
    with path.open("wb") as fh:
        left = size
        while left:
            n = min(chunk, left)
            fh.write(os.urandom(n))
            left -= n


# -- the measurements -----------------------------------------------------------------------

Side = Callable[[], Sample]


def shuffled(names: Sequence[str], rep: int) -> list[str]:
    """The order of one repetition: random, reproducible (seeded by the repetition)."""
    order = list(names)
    random.Random(rep).shuffle(order)  # noqa: S311 - an order, not a secret
    return order


def interleave(
    sides: dict[str, tuple[Callable[[], None], Side]], repeat: int, bundle: Path
) -> dict[str, list[Sample]]:
    """Run every side ``repeat`` times, in a new random order each repetition.

    Not a rotation: a rotation keeps every side behind the same predecessor, and what the
    predecessor leaves (freed page cache, pages the VM host reclaimed) showed up as a
    systematic difference of up to 1.5x between two identical installs.

    Each side is (prepare, run): prepare is untimed (fresh directories, clean-up), then the
    dirty pages are flushed and the bundle is read once, then run is timed.
    """
    names = list(sides)
    samples: dict[str, list[Sample]] = {n: [] for n in names}
    for rep in range(repeat):
        order = shuffled(names, rep)
        for name in order:
            prepare, run = sides[name]
            prepare()
            settle()
            warm(bundle)
            samples[name].append(run())
    return samples


def bench_size(fx: Fixture, size: int, args: argparse.Namespace) -> dict[str, Any]:
    label = size_label(size)
    print(f"\n== {label}: building the bundle ({args.files} files)", flush=True)
    bundle, build_s = fx.build(size, args.files)
    result: dict[str, Any] = {
        "loadavg_start": os.getloadavg(),
        "size": size,
        "label": label,
        "bundle_bytes": bundle.stat().st_size,
        "build_s": build_s,
    }
    scratch = fx.work / "scratch"
    extract = scratch / "extract"
    host = scratch / "host"

    def reset_extract() -> None:
        shutil.rmtree(scratch, ignore_errors=True)
        extract.mkdir(parents=True)

    def reset_host() -> None:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        fx.fresh_host(host)

    def shell(script: str) -> Side:
        return lambda: run_child(["sh", "-c", script, "sh", str(bundle), str(extract)], log=fx.log)

    tar = 'tar -xf "$1" -C "$2"'
    fsync_files = 'find "$2" -exec sync -- {} +'  # fsync every file and directory, as we do
    hash_files = 'find "$2" -type f -exec openssl dgst -sha256 {} + >/dev/null'
    install_sides: dict[str, tuple[Callable[[], None], Side]] = {
        "tar+sync": (reset_extract, shell(f"{tar} && sync")),
        "tar+fsync": (reset_extract, shell(f"{tar} && {fsync_files}")),
        "tar+sha256+sync": (reset_extract, shell(f"{tar} && {hash_files} && sync")),
        "install": (reset_host, lambda: fx.host(host, "install", str(bundle), *fx.install_args())),
        # The same bundle through a pipe (as from a data diode): the streaming path of step I5
        # (read, hash, write on a thread) instead of the kernel copy a bundle file gets.
        "install - (pipe)": (
            reset_host,
            lambda: run_child(
                [
                    "sh",
                    "-c",
                    'b=$1 a=$2 r=$3; shift 3; cat "$b" | "$a" --root "$r" install - "$@"',
                    "sh",
                    str(bundle),
                    fx.appliance,
                    str(host),
                    *fx.install_args(),
                ],
                log=fx.log,
            ),
        ),
    }
    print(f"   install vs tar, {args.repeat} repetitions", flush=True)
    result["install"] = interleave(install_sides, args.repeat, bundle)

    verify_host = fx.work / "verify-host"
    fx.fresh_host(verify_host)
    verify_sides: dict[str, tuple[Callable[[], None], Side]] = {
        "openssl": (
            noop,
            lambda: run_child(["openssl", "dgst", "-sha256", str(bundle)], log=fx.log),
        ),
        "verify": (noop, lambda: fx.host(verify_host, "verify", str(bundle))),
    }
    print(f"   verify vs openssl dgst, {args.repeat} repetitions", flush=True)
    result["verify"] = interleave(verify_sides, args.repeat, bundle)
    shutil.rmtree(verify_host)

    shutil.rmtree(scratch, ignore_errors=True)
    result["loadavg_end"] = os.getloadavg()
    result["bundle"] = str(bundle)
    return result


def bench_constant(fx: Fixture, bundles: dict[str, Path], repeat: int) -> dict[str, Any]:
    """Co-sign and rollback at each size, interleaved in the same repetitions.

    Co-signing: signer B adds (then refreshes) its signature in place. Rollback: a host with two
    slots of the bundle's size (installed twice, the second time with --allow-downgrade), then
    `rollback` (newest -> previous) and `rollback --to 1.0.0` (back to the newest slot holding
    1.0.0), alternately. Importing appliance.cli runs in the same repetitions, for scale.
    """
    hosts = {}
    for label, bundle in bundles.items():
        host = fx.work / f"rollback-host-{label.replace(' ', '')}"
        fx.fresh_host(host)
        fx.host(host, "install", str(bundle), *fx.install_args())
        fx.host(host, "install", str(bundle), "--allow-downgrade", *fx.install_args())
        hosts[label] = host
    out: dict[str, Any] = {"loadavg_start": os.getloadavg(), "startup": [], "sizes": {}}
    for label in bundles:
        out["sizes"][label] = {"sign": [], "rollback": [], "rollback --to": []}
    labels = list(bundles)
    for rep in range(repeat):
        settle()
        out["startup"].append(run_child([sys.executable, "-c", "import appliance.cli"], log=fx.log))
        for label in shuffled(labels, rep):
            bundle, host, got = bundles[label], hosts[label], out["sizes"][label]
            settle()
            got["sign"].append(fx.cli(fx.builder, "sign", str(bundle), "--key", str(fx.key_b)))
            settle()
            got["rollback"].append(fx.host(host, "rollback"))
            settle()
            got["rollback --to"].append(fx.host(host, "rollback", "--to", "1.0.0"))
    for host in hosts.values():
        shutil.rmtree(host)
    out["loadavg_end"] = os.getloadavg()
    return out


def noop() -> None:
    pass


STARTUP_PROBES = {
    "python -c pass": ["-c", "pass"],
    "import what install needs": [
        "-c",
        "import click, appliance.installer, appliance.trust, appliance.host, appliance.verifier",
    ],
    "import appliance.cli": ["-c", "import appliance.cli"],
}


def startup(fx: Fixture, repeat: int) -> dict[str, list[Sample]]:
    """The fixed cost of starting the CLI: `appliance --help`, and what the imports cost
    (the interpreter alone; the modules install and verify use; the whole CLI module)."""
    sides: dict[str, list[Sample]] = {"appliance --help": [], **{k: [] for k in STARTUP_PROBES}}
    for _ in range(repeat):
        sides["appliance --help"].append(run_child([fx.appliance, "--help"], log=fx.log))
        for name, argv in STARTUP_PROBES.items():
            sides[name].append(run_child([sys.executable, *argv], log=fx.log))
    return sides


# -- summaries -------------------------------------------------------------------------------


def med(samples: Sequence[Sample], attr: str = "wall_s") -> float:
    return float(statistics.median(getattr(s, attr) for s in samples))


def low(samples: Sequence[Sample], attr: str = "wall_s") -> float:
    return float(min(getattr(s, attr) for s in samples))


def peak_mib(samples: Sequence[Sample]) -> float:
    return max(s.maxrss_kib for s in samples) / 1024


def verdict(ok: bool) -> str:
    return "meets" if ok else "**misses**"


def ratio_cell(
    ours: Sequence[Sample], base: Sequence[Sample], target: float, *, strict: bool
) -> str:
    ratio = med(ours) / med(base)
    ratio_min = low(ours) / low(base)
    ok = ratio < target if strict else ratio <= target
    return f"{ratio:.2f}x [{ratio_min:.2f}x] {verdict(ok)}"


def markdown(results: dict[str, Any]) -> str:
    sizes = results["sizes"]
    machine_info = results["machine"]
    install_sides = [k for k in sizes[0]["install"] if k.startswith("install")]
    verify_sides = [k for k in sizes[0]["verify"] if k.startswith("verify")]
    bases = ["tar+sync", "tar+fsync", "tar+sha256+sync"]
    loads = ", ".join(
        f"{r['label']} {r['loadavg_start'][0]:.1f} / {r['loadavg_end'][0]:.1f}" for r in sizes
    )
    lines = [
        f"Run {results['started']}: {results['repeat']} repetitions per side, "
        f"{results['files']} weight files per bundle, {machine_info['summary']}; code at "
        f"{machine_info['git_head']} ({machine_info['git_dirty_files']} paths changed or new "
        "in the working tree).",
        f"Load average (1 min) at the start / end of each size: {loads}.",
        "CLI start-up, median (min): "
        + ", ".join(f"`{k}` {med(v):.3f} s ({low(v):.3f})" for k, v in results["startup"].items())
        + ".",
        "",
        "Install, wall time, median (min):",
        "",
        "| bundle | " + " | ".join(bases + install_sides) + " |",
        "|---|" + "---|" * (len(bases) + len(install_sides)),
    ]
    for r in sizes:
        s = r["install"]
        cells = [f"{med(s[k]):.2f} s ({low(s[k]):.2f})" for k in bases + install_sides]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Install, ratio of medians [ratio of minimums]:",
        "",
        f"| bundle | ours | / tar+sync (target <= {INSTALL_TARGET}x) | / tar+fsync "
        f"(target <= {INSTALL_TARGET}x) | / tar+sha256+sync (target < 1x) | CPU user+sys, "
        "ours / tar+sync |",
        "|---|---|---|---|---|---|",
    ]
    for r in sizes:
        s = r["install"]
        for side in install_sides:
            ours = s[side]
            cpu = med(ours, "user_s") + med(ours, "sys_s")
            cpu_base = med(s["tar+sync"], "user_s") + med(s["tar+sync"], "sys_s")
            lines.append(
                f"| {r['label']} | {side} | "
                f"{ratio_cell(ours, s['tar+sync'], INSTALL_TARGET, strict=False)} | "
                f"{ratio_cell(ours, s['tar+fsync'], INSTALL_TARGET, strict=False)} | "
                f"{ratio_cell(ours, s['tar+sha256+sync'], 1.0, strict=True)} | "
                f"{cpu:.2f} s / {cpu_base:.2f} s |"
            )
    lines += [
        "",
        f"Verify, wall time median (min), ratio of medians [of minimums], target <= "
        f"{VERIFY_TARGET}x:",
        "",
        "| bundle | openssl dgst -sha256 | ours | time | ratio |",
        "|---|---|---|---|---|",
    ]
    for r in sizes:
        s = r["verify"]
        for side in verify_sides:
            lines.append(
                f"| {r['label']} | {med(s['openssl']):.2f} s ({low(s['openssl']):.2f}) | {side} "
                f"| {med(s[side]):.2f} s ({low(s[side]):.2f}) | "
                f"{ratio_cell(s[side], s['openssl'], VERIFY_TARGET, strict=False)} |"
            )
    lines += [
        "",
        f"Peak RSS, largest over all repetitions (target <= {RSS_TARGET_MIB} MiB, flat in size):",
        "",
        "| bundle | " + " | ".join(install_sides + verify_sides) + " | tar+sync (for scale) |",
        "|---|" + "---|" * (len(install_sides) + len(verify_sides) + 1),
    ]
    for r in sizes:
        cells = [f"{peak_mib(r['install'][k]):.1f} MiB" for k in install_sides]
        cells += [f"{peak_mib(r['verify'][k]):.1f} MiB" for k in verify_sides]
        cells.append(f"{peak_mib(r['install']['tar+sync']):.1f} MiB")
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    const = results["constant"]
    ops = ("sign", "rollback", "rollback --to")
    lines += [
        "",
        "Co-sign and rollback, wall time median (min) of the whole CLI invocation; the sizes "
        "interleaved in the same repetitions (load average "
        f"{const['loadavg_start'][0]:.1f} / {const['loadavg_end'][0]:.1f}):",
        "",
        "| bundle | sign (co-sign in place) | rollback | rollback --to | "
        "`python -c 'import appliance.cli'` |",
        "|---|---|---|---|---|",
    ]
    for label, got in const["sizes"].items():
        cells = [f"{med(got[k]):.3f} s ({low(got[k]):.3f})" for k in ops]
        cells.append(f"{med(const['startup']):.3f} s ({low(const['startup']):.3f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    labels = list(const["sizes"])
    if len(labels) > 1:
        small, big = const["sizes"][labels[0]], const["sizes"][labels[-1]]
        parts = [f"{k} {med(big[k]) / med(small[k]):.2f}x" for k in ops]
        lines += [
            "",
            f"{labels[-1]} / {labels[0]} (medians): {', '.join(parts)} (constant time: about 1x).",
        ]
    return "\n".join(lines) + "\n"


# -- the machine, the output -----------------------------------------------------------------


def machine(work: Path) -> dict[str, Any]:
    def out(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, check=False).stdout
        except OSError:
            return ""

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in out("lscpu").splitlines()
            if ln.startswith("Model name")
        ),
        platform.processor(),
    )
    nproc = out("nproc").strip()
    mem = out("free", "-h").splitlines()
    disk = out("df", "-h", str(work)).splitlines()
    fstype = out("findmnt", "-no", "FSTYPE", "--target", str(work)).strip()
    load = os.getloadavg()
    return {
        "summary": f"{nproc} cores ({cpu}), {fstype}, load average {load[0]:.2f} at start",
        "nproc": nproc,
        "cpu": cpu,
        "free": mem,
        "df": disk,
        "fstype": fstype,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": out("openssl", "version").strip(),
        "tar": out("tar", "--version").splitlines()[:1],
        "loadavg_start": load,
        "git_head": out("git", "-C", str(REPO), "rev-parse", "--short", "HEAD").strip(),
        "git_dirty_files": len(out("git", "-C", str(REPO), "status", "--porcelain").splitlines()),
    }


def write_out(path: Path, results: dict[str, Any], table: str) -> None:
    """JSON (all samples) for ``.json``; otherwise the markdown tables, between markers."""
    if path.suffix == ".json":
        path.write_text(json.dumps(results, indent=1, default=asdict) + "\n")
        return
    block = f"{MARK_BEGIN}\n{table}{MARK_END}\n"
    if path.exists():
        text = path.read_text()
        if MARK_BEGIN in text and MARK_END in text:
            head, _, rest = text.partition(MARK_BEGIN)
            _, _, tail = rest.partition(MARK_END + "\n")
            path.write_text(head + block + tail)
            return
        if text:
            sys.exit(f"{path} exists without {MARK_BEGIN} / {MARK_END} markers; not overwriting")
    path.write_text(block)


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1] if text and text[-1] in _UNITS else ""
    return int(float(text[: len(text) - len(unit)]) * _UNITS[unit])


def size_label(size: int) -> str:
    for unit in ("G", "M", "K"):
        if size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]} {unit}iB"
    return f"{size} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="64M,256M,1G", help="bundle sizes, comma-separated (default %(default)s)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="repetitions per side (default 5)")
    parser.add_argument(
        "--files", type=int, default=4, help="weight files per bundle (default %(default)s)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        action="append",
        default=[],
        help="write results: FILE.json (every sample) or FILE.md (the tables, "
        "between bench_bundle markers); repeatable",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help="scratch directory, removed at the end (default %(default)s)",
    )
    parser.add_argument(
        "--keep-bundles",
        action="store_true",
        help="keep the built bundles (and the work directory)",
    )
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]

    appliance, builder = tools()
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ.setdefault("SOURCE_DATE_EPOCH", str(int(time.time())))
    os.environ.pop("APPLIANCE_ROOT", None)
    try:
        fx = Fixture(work, appliance, builder, work / "commands.log")
        results: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "repeat": args.repeat,
            "files": args.files,
            "machine": machine(work),
            "startup": startup(fx, args.repeat),
            "sizes": [],
        }
        constant_sizes = {min(sizes), max(sizes)}
        kept: dict[str, Path] = {}
        for size in sizes:
            result = bench_size(fx, size, args)
            results["sizes"].append(result)
            if size in constant_sizes:
                kept[result["label"]] = Path(result["bundle"])
            elif not args.keep_bundles:
                Path(result["bundle"]).unlink()
        print(f"\n== co-sign and rollback at {', '.join(kept)}, interleaved", flush=True)
        results["constant"] = bench_constant(fx, kept, args.repeat)
        results["machine"]["loadavg_end"] = os.getloadavg()
    finally:
        if not args.keep_bundles:
            shutil.rmtree(work, ignore_errors=True)
    table = markdown(results)
    print("\n" + table)
    for path in args.out:
        write_out(path, results, table)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
