"""Benchmark install step I7 (a bundle's package environment) against plain pip and py-rattler.

Two groups, each side a child process, interleaved in a new random order every repetition,
``sync`` before every timed command (so no side pays for the previous side's writeback):

- pip: ``python -m venv X && X/bin/pip install --no-index --find-links W -r reqs`` (the plain
  way, the baseline), the fastest plain variant for scale (``venv --without-pip`` and the
  host's ``pip --python X/bin/python``), and ours: ``setup_environment`` on a slot whose
  payload holds the same wheels (venv, pip install with hashes, pip check, .pth, syncfs).
- conda: plain py-rattler (``rattler.index.index_fs`` over a directory of the package files,
  the records from its repodata.json, ``rattler.install`` with a fresh cache), the same install
  alone from an already indexed channel for scale, and ours: ``setup_environment`` on a slot
  (manifest pin check, channel in the slot, ``index_fs``, ``rattler.install``, cache removed,
  syncfs). ``RepoDataRecord.from_package_archive`` would be the shorter plain way, but with
  py-rattler 0.28.0 about one process in five that uses it dies at exit (SIGSEGV/SIGABRT).

The wheels are real: ``pip download`` (PyPI or the configured index) of numpy, pydantic, rich
and friends, about 20 wheels and 22 MB; ``--wheels DIR`` reuses a directory of wheels, and
``--synthetic`` builds pure-Python wheels with tests/pkgfactory.py instead (fully offline).
The conda packages are built with tests/pkgfactory.py (``--conda-packages`` of them, each
with ``--conda-files`` files). Results are ratios of medians (target <= 1.1x), written as a
markdown table to ``--out``.

    .venv/bin/python bench/bench_envsetup.py --repeat 7

See bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from pkgfactory import make_conda_channel, make_conda_package, make_wheel  # noqa: E402

from appliance.slots import SlotPaths  # noqa: E402
from signing.manifest import BundleManifest, Entry, EnvironmentSpec  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "out" / "envsetup.md"
DEFAULT_WORKDIR = REPO / "bench" / "out" / "work-envsetup"
TARGET = 1.1
PY = f"{sys.version_info.major}.{sys.version_info.minor}"
# Real packages of the kind a bundle carries (numpy and compiled pydantic-core, pyyaml,
# markupsafe among pure-Python ones); their dependencies come along.
WHEELS = ["numpy==2.4.6", "pydantic", "rich", "click", "packaging", "idna", "certifi"]
WHEELS += ["six", "attrs", "jinja2", "pyyaml"]

# The installer has imported appliance.envsetup (and signing) long before step I7: the
# child reports how long those imports took, and that is taken off its wall time.
OURS = """
import time
started = time.perf_counter()
import json, sys
from pathlib import Path
from appliance.envsetup import setup_environment
from appliance.slots import SlotPaths
from signing.manifest import BundleManifest
imports = time.perf_counter() - started
slot = Path(sys.argv[1])
manifest = BundleManifest.from_bytes(SlotPaths(slot).manifest.read_bytes())
summary = setup_environment(slot, manifest)
print(json.dumps(summary | {"imports_s": imports}))
"""

RATTLER_PLAIN = """
import asyncio, sys
from pathlib import Path
import rattler, rattler.index
channel, prefix, cache = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
asyncio.run(rattler.index.index_fs(channel, write_zst=False, write_shards=False))
records = []
source = rattler.Channel(channel.as_uri())
for repodata in sorted(channel.glob("*/repodata.json")):
    records += rattler.RepoData.from_path(repodata).into_repo_data(source)
asyncio.run(rattler.install(records, prefix, cache_dir=cache, execute_link_scripts=False,
                            show_progress=False))
"""

RATTLER_INDEXED = """
import asyncio, sys
from pathlib import Path
import rattler
channel, prefix, cache = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
records = []
source = rattler.Channel(channel.as_uri())
for repodata in sorted(channel.glob("*/repodata.json")):
    records += rattler.RepoData.from_path(repodata).into_repo_data(source)
asyncio.run(rattler.install(records, prefix, cache_dir=cache, execute_link_scripts=False,
                            show_progress=False))
"""


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return env


def timed(argv: Sequence[str | os.PathLike[str]], log: Path, *, ours: bool = False) -> float:
    """Run one command after a ``sync``; its wall time in seconds (it must succeed). For
    ``ours``, less the import time the child reports on its last line of output."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.run(
        [os.fspath(a) for a in argv], capture_output=True, env=child_env(), check=False
    )
    wall = time.perf_counter() - start
    with log.open("ab") as out:
        out.write(f"$ {' '.join(map(str, argv))}\n".encode() + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(map(str, argv))}; see {log}")
    if ours:
        wall -= json.loads(proc.stdout.splitlines()[-1])["imports_s"]
    return wall


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- fixtures -----------------------------------------------------------------------------------


def get_wheels(work: Path, args: argparse.Namespace) -> list[Path]:
    if args.wheels:
        return sorted(Path(args.wheels).glob("*.whl"))
    target = work / "wheels"
    if not args.synthetic:
        download = subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:"),
                *("--disable-pip-version-check", "-d", str(target), *WHEELS),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if download.returncode == 0:
            return sorted(target.glob("*.whl"))
        print(f"pip download failed, using synthetic wheels: {download.stderr.strip()[-200:]}")
    shutil.rmtree(target, ignore_errors=True)
    return [
        make_wheel(
            target,
            f"synth{i}",
            "1.0",
            files={f"synth{i}/m{j}.py": f"X = {j}\n" * (50 * j + 1) for j in range(40)},
        )
        for i in range(16)
    ]


def get_conda_packages(work: Path, count: int, files: int) -> list[Path]:
    out = work / "conda-src"
    rng = random.Random(7)  # noqa: S311 - reproducible content, not secrets
    packages = []
    for i in range(count):
        content = {
            f"share/pkg{i}/file{j}.txt": (
                " ".join(
                    rng.choice(["alpha", "beta", "gamma", "delta", str(j)])
                    for _ in range(rng.randint(100, 2000))
                )
            ).encode()
            for j in range(files)
        }
        content[f"lib/libpkg{i}.so"] = rng.randbytes(rng.randint(4096, 65536))
        depends = [f"pkg{i - 1}"] if i else []
        packages.append(make_conda_package(out, f"pkg{i}", "1.0", depends=depends, files=content))
    return packages


def manifest_for(payload: dict[str, Path], spec: EnvironmentSpec) -> BundleManifest:
    now = datetime.now(UTC).replace(microsecond=0)
    entries = tuple(
        Entry(path=rel, size=p.stat().st_size, sha256=sha256(p), kind="package")
        for rel, p in sorted(payload.items())
    )
    return BundleManifest(
        name="bench",
        version="1.0.0",
        created=now - timedelta(hours=1),
        expires=now + timedelta(days=30),
        runtime={"backend": "llama.cpp"},
        model_path=next(iter(sorted(payload))),
        entries=entries,
        environment=spec,
    )


def make_slot(slot: Path, payload: dict[str, Path], manifest: BundleManifest) -> None:
    """A slot as the installer leaves it before I7: the payload and the verified manifest."""
    paths = SlotPaths(slot)
    for rel, source in payload.items():
        dest = paths.payload / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
    paths.bundle.mkdir(parents=True)
    paths.manifest.write_bytes(manifest.to_bytes())


# -- the groups ---------------------------------------------------------------------------------

Side = Callable[[int], float]


def pip_group(work: Path, wheels: list[Path], log: Path) -> dict[str, Side]:
    src = work / "pip-src"
    (src / "wheels").mkdir(parents=True)
    lines = []
    payload: dict[str, Path] = {}
    for wheel in wheels:
        copy = src / "wheels" / wheel.name
        shutil.copyfile(wheel, copy)
        name, version = wheel.name.split("-")[:2]
        lines.append(f"{name}=={version} --hash=sha256:{sha256(copy)}")
        payload[f"env/wheels/{wheel.name}"] = copy
    reqs = src / "requirements.txt"
    reqs.write_text("\n".join(lines) + "\n")
    payload["env/requirements.txt"] = reqs
    spec = EnvironmentSpec(
        type="pip",
        platform="linux_x86_64",
        python=PY,
        install_list="env/requirements.txt",
        packages="env/wheels",
    )
    manifest = manifest_for(payload, spec)
    run = work / "pip-run"

    def fresh(name: str) -> Path:
        target = run / name
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def baseline(_: int) -> float:
        venv = fresh("plain")
        script = (
            f'"{sys.executable}" -m venv "{venv}" && "{venv}/bin/pip" install --quiet '
            f'--no-index --find-links "{src / "wheels"}" -r "{reqs}"'
        )
        return timed(["sh", "-c", script], log)

    def fastest_plain(_: int) -> float:
        venv = fresh("plain-nopip")
        script = (
            f'"{sys.executable}" -m venv --without-pip "{venv}" && "{sys.executable}" -m pip '
            f'--python "{venv}/bin/python" install --quiet --no-index '
            f'--find-links "{src / "wheels"}" -r "{reqs}"'
        )
        return timed(["sh", "-c", script], log)

    def ours(_: int) -> float:
        slot = fresh("slot")
        make_slot(slot, payload, manifest)
        return timed([sys.executable, "-c", OURS, slot], log, ours=True)

    return {"plain pip": baseline, "venv --without-pip + pip --python": fastest_plain, "ours": ours}


def conda_group(work: Path, packages: list[Path], log: Path) -> dict[str, Side]:
    src = work / "conda-pkgs"
    payload: dict[str, Path] = {}
    lines = ["@EXPLICIT"]
    for package in packages:
        dest = src / "noarch" / package.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(package, dest)
        payload[f"env/conda/noarch/{package.name}"] = dest
        lines.append(f"noarch/{package.name}#sha256:{sha256(dest)}")
    explicit = work / "conda-explicit.txt"
    explicit.write_text("\n".join(lines) + "\n")
    payload["env/conda-explicit.txt"] = explicit
    spec = EnvironmentSpec(
        type="conda",
        platform="noarch",
        python=PY,
        install_list="env/conda-explicit.txt",
        packages="env/conda",
    )
    channel = make_conda_channel(work / "conda-channel", packages)
    # The builder ships the channel's repodata in the bundle (builder.environment).
    payload["env/conda/noarch/repodata.json"] = channel / "noarch" / "repodata.json"
    manifest = manifest_for(payload, spec)
    run = work / "conda-run"

    def fresh(name: str) -> Path:
        target = run / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        return target

    def baseline(_: int) -> float:
        out = fresh("plain")
        for package in src.glob("*/*"):  # a directory of package files, not yet indexed
            (out / "channel" / package.parent.name).mkdir(parents=True, exist_ok=True)
            os.link(package, out / "channel" / package.parent.name / package.name)
        argv = [sys.executable, "-c", RATTLER_PLAIN, out / "channel", out / "env", out / "cache"]
        return timed(argv, log)

    def indexed(_: int) -> float:
        out = fresh("indexed")
        return timed(
            [sys.executable, "-c", RATTLER_INDEXED, channel, out / "env", out / "cache"], log
        )

    def ours(_: int) -> float:
        slot = fresh("slot")
        make_slot(slot, payload, manifest)
        return timed([sys.executable, "-c", OURS, slot], log, ours=True)

    return {
        "plain rattler": baseline,
        "rattler.install only (indexed channel)": indexed,
        "ours": ours,
    }


def measure(sides: dict[str, Side], repeat: int, rng: random.Random) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in sides}
    for side in sides.values():  # warm-up, untimed: page cache and .pyc files
        side(-1)
    for i in range(repeat):
        order = list(sides)
        rng.shuffle(order)
        for name in order:
            samples[name].append(sides[name](i))
        print(
            f"  rep {i + 1}/{repeat}: " + ", ".join(f"{n} {samples[n][-1]:.2f}s" for n in sides),
            flush=True,
        )
    return samples


# -- report -------------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    lines = [
        "# Environment set-up (install step I7) against plain pip and py-rattler",
        "",
        f"{results['started']}; {results['machine']}; median of {results['repeat']} runs "
        "(minimum in brackets); each side a child process, interleaved in random order, "
        "`sync` before each.",
        "",
        f"| group | side | time | ours / side (target <= {TARGET}x for the baseline) |",
        "|---|---|---|---|",
    ]
    for group in results["groups"]:
        samples = group["samples"]
        ours = med(samples["ours"])
        for side, xs in samples.items():
            ratio = "" if side == "ours" else f"{ours / med(xs):.2f}x"
            if side == group["baseline"]:
                ratio += " (baseline)"
            lines.append(
                f"| {group['label']} | {side} | {med(xs):.2f} s ({min(xs):.2f}) | {ratio} |"
            )
    lines += ["", *results["notes"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown table")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--wheels", help="a directory of wheels to use instead of downloading")
    parser.add_argument("--synthetic", action="store_true", help="pkgfactory wheels, no download")
    parser.add_argument("--conda-packages", type=int, default=40)
    parser.add_argument("--conda-files", type=int, default=20)
    parser.add_argument("--only", choices=["pip", "conda"], help="run one group")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "commands.log"
    rng = random.Random(1)  # noqa: S311 - the order of the sides
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M"),
        "repeat": args.repeat,
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
        ),
        "groups": [],
        "notes": [],
    }
    try:
        if args.only in (None, "pip"):
            wheels = get_wheels(work, args)
            size = sum(w.stat().st_size for w in wheels) / (1 << 20)
            label = f"pip: {len(wheels)} wheels, {size:.1f} MiB"
            print(f"== {label}", flush=True)
            samples = measure(pip_group(work, wheels, log), args.repeat, rng)
            results["groups"].append({"label": label, "baseline": "plain pip", "samples": samples})
            results["notes"].append(
                f"pip wheels: {', '.join(w.name.split('-')[0] for w in wheels)}."
            )
        if args.only in (None, "conda"):
            packages = get_conda_packages(work, args.conda_packages, args.conda_files)
            size = sum(p.stat().st_size for p in packages) / (1 << 20)
            label = (
                f"conda: {len(packages)} packages x {args.conda_files + 1} files, "
                f"{size:.1f} MiB (.tar.bz2)"
            )
            print(f"== {label}", flush=True)
            samples = measure(conda_group(work, packages, log), args.repeat, rng)
            results["groups"].append(
                {"label": label, "baseline": "plain rattler", "samples": samples}
            )
        results["notes"].append(
            "ours = `appliance.envsetup.setup_environment` in a fresh interpreter, less the "
            "time it took that interpreter to import `appliance.envsetup` and "
            "`signing.manifest` (the installer has them loaded before step I7; py-rattler's "
            "import stays counted, as in the plain sides); with its checks, the smoke-import "
            "machinery (no modules listed here) and the final syncfs (the plain sides do not "
            "flush to disk)."
        )
        text = markdown(results)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        (args.out.with_suffix(".json")).write_text(json.dumps(results, indent=1))
        print(text)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
