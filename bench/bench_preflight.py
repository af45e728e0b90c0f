"""How long `appliance preflight` takes, against the CLI's own start-up and against `verify`.

Issue 10's target: the preflight answers "will this bundle run here?" well under a second. It
reads only the signed head of the bundle, so its cost should be the CLI's start-up plus the
host's facts (/proc/cpuinfo, /proc/meminfo, statvfs, glibc, NVML when installed), whatever the
bundle's size. Measured, through the real command lines, interleaved, ``--repeat`` times each:

- ``appliance history --check``: the interpreter, click and the host's audit log read, the
  floor of any host command (``--help`` is no floor: it imports the lazily loaded ``serve``);
- ``appliance preflight BUNDLE``: head verification, host facts, the checks, one audit record;
- ``appliance verify BUNDLE``: every payload byte hashed, for scale (it grows with the bundle);

and, in-process, ``appliance.hostfacts.gather`` and ``appliance.preflight.check`` alone. The
bundle carries a model file of ``--size`` MiB, so that a preflight that read the payload would
show it. Prints a Markdown table for docs/benchmarks.md.

    .venv/bin/python bench/bench_preflight.py --repeat 15 --size 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def cli(*argv: str | Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [str(a) for a in argv],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def fixture(work: Path, size_mib: int) -> tuple[Path, Path]:
    """Keys, a 1-of-1 root, a bundle with a model of ``size_mib`` MiB, a host that trusts it."""
    builder, appliance = BIN / "appliance-builder", BIN / "appliance"
    key = work / "k.pem"
    cli(builder, "keygen", key)
    root_json = work / "root.json"
    cli(builder, "root", "create", "--root-key", key, "--bundle-key", f"{key}.pub",
        "--threshold", "1", "-o", root_json)  # fmt: skip
    src = work / "src"
    (src / "models").mkdir(parents=True)
    model = src / "models" / "model.bin"
    with model.open("wb") as fh:
        for _ in range(size_mib):
            fh.write(os.urandom(1 << 20))
    (src / "recipe.toml").write_text(
        '[bundle]\nname = "bench"\nversion = "1.0.0"\n\n[model]\npath = "models/model.bin"\n\n'
        '[runtime]\nbackend = "llama.cpp"\ncontext_size = 256\n'
    )
    bundle = work / "bundle.tar"
    cli(builder, "build", src / "recipe.toml", "--key", key, "-o", bundle)
    host = work / "host"
    fingerprint = subprocess.run(
        [str(builder), "root", "fingerprint", str(root_json)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[-1]
    cli(appliance, "--root", host, "trust", "init", root_json, "--fingerprint", fingerprint)
    return bundle, host


def in_process(host: Path, bundle: Path, repeat: int) -> tuple[list[float], list[float]]:
    from appliance.hostfacts import gather
    from appliance.preflight import check
    from signing.bundle import Limits, open_bundle, read_head
    from signing.manifest import BundleManifest

    with bundle.open("rb") as fh:
        head = read_head(open_bundle(fh, Limits()), Limits())
    requires = BundleManifest.from_bytes(head.manifest_bytes).requires
    assert requires is not None, "the builder records requires"
    facts_s, check_s = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        facts = gather(host)
        facts_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        check(requires, facts)
        check_s.append(time.perf_counter() - start)
    return facts_s, check_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--size", type=int, default=256, help="model MiB in the bundle")
    args = parser.parse_args()
    appliance = BIN / "appliance"
    with tempfile.TemporaryDirectory(prefix="bench-preflight-") as tmp:
        bundle, host = fixture(Path(tmp), args.size)
        sides = {
            "appliance history --check": [appliance, "--root", host, "history", "--check"],
            "appliance preflight": [appliance, "--root", host, "preflight", bundle],
            "appliance verify": [appliance, "--root", host, "verify", bundle],
        }
        times: dict[str, list[float]] = {name: [] for name in sides}
        for round_ in range(args.repeat):
            order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
            for name in order:
                times[name].append(cli(*sides[name]))
        facts_s, check_s = in_process(host, bundle, args.repeat)
    load = os.getloadavg()[0]
    floor = statistics.median(times["appliance history --check"])
    print(f"bundle with a {args.size} MiB model; {args.repeat} runs each; load {load:.1f}\n")
    print("| what | median | min..max | vs `history --check` |")
    print("|---|---|---|---|")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(
            f"| `{name}` | {median * 1000:.0f} ms | {min(samples) * 1000:.0f}.."
            f"{max(samples) * 1000:.0f} ms | {median / floor:.2f}x |"
        )
    for name, samples in (("hostfacts.gather()", facts_s), ("preflight.check()", check_s)):
        median = statistics.median(samples)
        print(f"| `{name}` in-process | {median * 1000:.2f} ms | "
              f"{min(samples) * 1000:.2f}..{max(samples) * 1000:.2f} ms | |")  # fmt: skip


if __name__ == "__main__":
    main()
