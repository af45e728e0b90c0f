"""The standalone ``appliance`` (``appliance-builder freeze``) against the venv-installed CLI,
in one run (issue 12, "Measurements"; docs/adr/0018-interpreter-for-slot-environments.md).

- Size: the frozen folder (and its tar) against what a venv install needs: the installed files
  of the distributions the appliance depends on (its base dependencies and the ``llama`` extra,
  summed from their ``RECORD``), plus the CPython they run on (this interpreter's standard
  library and ``libpython``), which a host without Python would have to get too.
- Start-up: ``appliance --version`` and ``appliance verify`` of a small bundle (a 1 MiB model),
  frozen against ``.venv/bin/appliance``. Target: frozen / venv <= 1.5x.
- Install: ``appliance install`` of a large bundle (``--size``, default 256 MiB; the issue's
  1 GiB with ``--size 1G``) into a fresh host, frozen against venv. Target: <= 1.05x.

Every side is a child process run one at a time; each round runs the sides in a new random
order and each ratio is taken within the round, so that what the shared machine does meanwhile
hits both sides alike. A ratio is the median of the rounds, with min..max.

    .venv/bin/python bench/bench_freeze.py --repeat 3 --size 64M       # a smoke run
    .venv/bin/python bench/bench_freeze.py --out docs/benchmarks.md    # the reference run
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import sysconfig
import time
from importlib import metadata
from pathlib import Path

from bench_bundle import machine, parse_size, run_child, tools
from bench_parts import Fixture, write_random
from benchdoc import write_section
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from frozen import frozen_program  # noqa: E402

DEFAULT_WORKDIR = REPO / "bench" / "out" / "freeze"
HEADING = "## The standalone program (`bench/bench_freeze.py`)"
BEGIN, END, NOTES = (
    "<!-- bench_freeze:begin -->",
    "<!-- bench_freeze:end -->",
    "<!-- bench_freeze:notes -->",
)
STARTUP_TARGET = 1.5
INSTALL_TARGET = 1.05
MIB = 1 << 20


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def venv_size() -> tuple[int, int, list[str]]:
    """The installed bytes of the appliance's dependencies (base + llama, recursively), and of
    the CPython under them; and the distributions counted."""
    seen: dict[str, metadata.Distribution] = {}
    todo = ["airgap-appliance"]
    extras = {"airgap-appliance": {"llama"}}
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[key] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            wanted = extras.get(key, set())
            if req.marker is None or any(
                req.marker.evaluate({"extra": e}) for e in (wanted or {""})
            ):
                todo.append(req.name)
    packages = 0
    for dist in seen.values():
        for file in dist.files or []:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                packages += path.stat().st_size
    # The standard library as a distribution ships it to hosts: without its own test suite
    # and the GUI and installer modules (left out of the frozen program too).
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    left_out = ("site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3")
    python = tree_size(stdlib) - sum(
        tree_size(stdlib / d) for d in left_out if (stdlib / d).is_dir()
    )
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "/nonexistent")
    python += sum(p.stat().st_size for p in libdir.glob("libpython3*.so*") if p.is_file())
    return packages, python, sorted(seen)


Rounds = dict[str, tuple[list[float], list[float], list[float]]]


def ratio_rounds(sides: dict[str, tuple[object, object]], repeat: int) -> Rounds:
    """For each name: the ``repeat`` ratios frozen/venv of the two callables' wall times, and
    the frozen and the venv wall times themselves."""
    out: Rounds = {name: ([], [], []) for name in sides}
    for _ in range(repeat):
        order = [(name, which) for name in sides for which in (0, 1)]
        random.shuffle(order)
        walls: dict[tuple[str, int], float] = {}
        for name, which in order:
            walls[(name, which)] = sides[name][which]()  # type: ignore[operator]
        for name in sides:
            out[name][0].append(walls[(name, 0)] / walls[(name, 1)])
            out[name][1].append(walls[(name, 0)])
            out[name][2].append(walls[(name, 1)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256M", help="install bundle size (default 256M)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (default %(default)s)")
    parser.add_argument("--startup-runs", type=int, default=5, help="start-ups per side per round")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--out", type=Path, help="write the section into this markdown file")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.monotonic()
    load_start = os.getloadavg()
    venv_cli, builder = tools()
    program = frozen_program()
    frozen_cli = str(program.program)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    log = args.workdir / "log.txt"
    fx = Fixture(work=args.workdir, appliance=venv_cli, builder=builder, log=log)

    # a small bundle for verify, a large one for install
    small_src = args.workdir / "small"
    small_src.mkdir()
    write_random(small_src / "model.gguf", MIB)
    (small_src / "s.toml").write_text(
        '[bundle]\nname = "small"\nversion = "1.0.0"\n\n[model]\npath = "model.gguf"\n\n'
        '[runtime]\nbackend = "llama.cpp"\ncontext_size = 256\n'
    )
    small = args.workdir / "small.tar"
    fx.cli(builder, "build", str(small_src / "s.toml"), "--key", str(fx.key), "-o", str(small))
    size = parse_size(args.size)
    big, _ = fx.build(size)
    verify_root = args.workdir / "verify-host"
    fx.fresh_host(verify_root)

    def wall(*argv: str) -> float:
        return run_child(argv, log=log).wall_s

    def startup(cli: str, *argv: str) -> float:
        return statistics.median(wall(cli, *argv) for _ in range(args.startup_runs))

    def install(cli: str) -> float:
        root = args.workdir / "install-host"
        shutil.rmtree(root, ignore_errors=True)
        run_child(
            [cli, "--root", str(root), "trust", "init", str(fx.root_json), "--fingerprint",
             fx.fingerprint],
            log=log,
        )  # fmt: skip
        os.sync()
        took = wall(cli, "--root", str(root), "install", str(big), *fx.skip_health)
        shutil.rmtree(root, ignore_errors=True)
        return took

    verify = ("--root", str(verify_root), "verify", str(small))
    startup_ratios = ratio_rounds(
        {
            "--version": (
                lambda: startup(frozen_cli, "--version"),
                lambda: startup(venv_cli, "--version"),
            ),
            "verify (1 MiB bundle)": (
                lambda: startup(frozen_cli, *verify),
                lambda: startup(venv_cli, *verify),
            ),
        },
        args.repeat,
    )
    install_ratios = ratio_rounds(
        {
            f"install ({size // MIB} MiB bundle)": (
                lambda: install(frozen_cli),
                lambda: install(venv_cli),
            )
        },
        args.repeat,
    )
    packages, python, dists = venv_size()
    folder = tree_size(program.folder)
    load_end = os.getloadavg()
    took = time.monotonic() - t0
    m = machine(args.workdir)

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}x ({min(values):.2f}..{max(values):.2f})"

    lines = [
        BEGIN,
        HEADING,
        "",
        f"Run {started}, took {took / 60:.1f} min. Machine: {m['summary']}; load average "
        f"(1 min) before / after: {load_start[0]:.2f} / {load_end[0]:.2f}. "
        f"{args.repeat} rounds; sides in random order within a round; ratio = frozen / venv, "
        "median of the rounds (min..max).",
        "",
        "| what | frozen | venv | ratio | target |",
        "|---|---|---|---|---|",
        f"| size on disk | {folder / MIB:.0f} MiB (tar {program.tar.stat().st_size / MIB:.0f} "
        f"MiB) | {packages / MIB:.0f} MiB packages ({len(dists)} distributions) + "
        f"{python / MIB:.0f} MiB CPython (stdlib without tests, libpython) | "
        f"{folder / (packages + python):.2f}x | - |",
    ]
    for name, (values, frozen_s, venv_s) in startup_ratios.items():
        lines.append(
            f"| start-up `appliance {name}` | {statistics.median(frozen_s) * 1000:.0f} ms | "
            f"{statistics.median(venv_s) * 1000:.0f} ms | {spread(values)} | "
            f"<= {STARTUP_TARGET}x |"
        )
    for name, (values, frozen_s, venv_s) in install_ratios.items():
        lines.append(
            f"| `appliance {name}` | {statistics.median(frozen_s):.2f} s | "
            f"{statistics.median(venv_s):.2f} s | {spread(values)} | <= {INSTALL_TARGET}x |"
        )
    lines += [
        "",
        "Start-up times are the median of "
        f"{args.startup_runs} starts per side; the install skips the model health check "
        "(random weights) and starts each time from a fresh host (`trust init`, not timed). "
        "The program's sha256 is the sha256 of its tar (builder/freeze.py).",
        "",
        NOTES,
        END,
    ]
    section = "\n".join(lines) + "\n"
    print(section)
    if args.out is not None:
        write_section(args.out, section, begin=BEGIN, end=END, notes=NOTES, heading=HEADING)


if __name__ == "__main__":
    main()
