"""Benchmark builder.fetch: parallel downloads (jobs=8) against sequential ones (jobs=1).

A local HTTP server, in its own process so that it does not share this one's GIL, serves
``--files`` random files (``--total`` bytes together, mixed sizes) and stands for a real
registry: it waits ``--latency-ms`` before answering each request (a round trip) and, per
scenario, caps each connection's bandwidth (``--bandwidth``, bytes per second; 0 for none).
Both sides run in the same repetitions, in a new random order each time, each from an empty
cache. Results are medians (and minimums) and their ratio.

    .venv/bin/python bench/bench_fetch.py --repeat 5 --out bench/out/fetch.md

See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from builder.artifacts import Artifact  # noqa: E402
from builder.cache import Cache, sha256_file  # noqa: E402
from builder.fetch import fetch_all  # noqa: E402

DEFAULT_WORKDIR = REPO / "bench" / "out" / "fetch-work"
DEFAULT_OUT = REPO / "bench" / "out" / "fetch.md"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_PACE_CHUNK = 16 * 1024


# -- the server (child process) ---------------------------------------------------------------


def serve(root: Path, latency_s: float, bandwidth: int) -> None:
    """Serve ``root`` on a free loopback port (printed on stdout) until stdin closes."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:
            pass

        def do_GET(self) -> None:
            time.sleep(latency_s)
            target = root / self.path.lstrip("/")
            if not target.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = target.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not bandwidth:
                self.wfile.write(data)
                return
            start = time.perf_counter()
            for offset in range(0, len(data), _PACE_CHUNK):
                self.wfile.write(data[offset : offset + _PACE_CHUNK])
                ahead = start + (offset + _PACE_CHUNK) / bandwidth - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    print(httpd.server_address[1], flush=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    sys.stdin.read()  # the parent closes it when done
    httpd.shutdown()


class Server:
    """The server child process, as a context manager: ``url`` while it runs."""

    def __init__(self, root: Path, latency_s: float, bandwidth: int) -> None:
        argv = [sys.executable, __file__, "--serve", str(root)]
        argv += ["--latency-ms", str(latency_s * 1000), "--serve-bandwidth", str(bandwidth)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the measurement --------------------------------------------------------------------------


def make_files(www: Path, files: int, total: int) -> list[tuple[str, int, str]]:
    """``files`` random files of mixed sizes (a seeded log-normal spread) adding up to
    ``total`` bytes; returns (name, size, sha256) of each."""
    rng = random.Random(0)  # noqa: S311 - sizes, not secrets
    weights = [rng.lognormvariate(0, 1) for _ in range(files)]
    sizes = [max(1, int(total * w / sum(weights))) for w in weights]
    sizes[-1] += total - sum(sizes)
    made = []
    www.mkdir(parents=True)
    for i, size in enumerate(sizes):
        name = f"pkg{i:03d}-1.0-py3-none-any.whl"
        path = www / name
        path.write_bytes(os.urandom(size))
        made.append((name, size, sha256_file(path)))
    return made


@dataclass
class Scenario:
    latency_ms: float
    bandwidth: int
    sequential: list[float]
    parallel: list[float]


def run_scenario(
    work: Path, made: list[tuple[str, int, str]], args: argparse.Namespace, bandwidth: int
) -> Scenario:
    scenario = Scenario(args.latency_ms, bandwidth, [], [])
    cache_dir = work / "cache"
    with Server(work / "www", args.latency_ms / 1000, bandwidth) as server:
        artifacts = [
            Artifact(name.split("-")[0], "1.0", name, f"{server.url}/{name}", digest, size=size)
            for name, size, digest in made
        ]
        sides = {1: scenario.sequential, args.jobs: scenario.parallel}
        for rep in range(args.repeat):
            order = list(sides)
            random.Random(rep).shuffle(order)  # noqa: S311 - an order, not a secret
            for jobs in order:
                shutil.rmtree(cache_dir, ignore_errors=True)
                start = time.perf_counter()
                got = fetch_all(artifacts, Cache(cache_dir), jobs=jobs, progress=False)
                sides[jobs].append(time.perf_counter() - start)
                assert len(got) == len(made)
            print(
                f"  bandwidth {bandwidth_label(bandwidth)}, rep {rep + 1}/{args.repeat}: "
                f"jobs=1 {scenario.sequential[-1]:.3f} s, "
                f"jobs={args.jobs} {scenario.parallel[-1]:.3f} s",
                flush=True,
            )
    shutil.rmtree(cache_dir, ignore_errors=True)
    return scenario


def markdown(scenarios: list[Scenario], args: argparse.Namespace, files: int, total: int) -> str:
    load = os.getloadavg()
    lines = [
        f"Run {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: {args.repeat} repetitions per side, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, load average "
        f"{load[0]:.2f}. Local HTTP server in its own process; each request waits the latency "
        "before its answer; wall time of `fetch_all` from an empty cache, median (min).",
        "",
        f"| files | bytes | latency / request | bandwidth / connection | sequential (jobs=1) "
        f"| parallel (jobs={args.jobs}) | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in scenarios:
        seq, par = statistics.median(s.sequential), statistics.median(s.parallel)
        lines.append(
            f"| {files} | {total:,} | {s.latency_ms:g} ms | {bandwidth_label(s.bandwidth)} | "
            f"{seq:.3f} s ({min(s.sequential):.3f}) | {par:.3f} s ({min(s.parallel):.3f}) | "
            f"{seq / par:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B").removesuffix("/S")
    unit = text[-1] if text and text[-1] in _UNITS else ""
    return int(float(text[: len(text) - len(unit)]) * _UNITS[unit])


def bandwidth_label(bandwidth: int) -> str:
    if not bandwidth:
        return "unlimited"
    for unit in ("G", "M", "K"):
        if bandwidth % _UNITS[unit] == 0:
            return f"{bandwidth // _UNITS[unit]} {unit}iB/s"
    return f"{bandwidth} B/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=32, help="files (default %(default)s)")
    parser.add_argument(
        "--total", default="8M", help="bytes of all files together (default %(default)s)"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=30.0, help="per-request latency (default 30)"
    )
    parser.add_argument(
        "--bandwidth",
        default="0,4M",
        help="per-connection caps in bytes/s, comma-separated, one scenario each; 0 for none "
        "(default %(default)s)",
    )
    parser.add_argument("--jobs", type=int, default=8, help="parallel side (default 8)")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="markdown table (default %(default)s)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR, help="scratch, removed at the end"
    )
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve-bandwidth", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.latency_ms / 1000, args.serve_bandwidth)
        return

    total = parse_size(args.total)
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        made = make_files(work / "www", args.files, total)
        scenarios = []
        for text in args.bandwidth.split(","):
            scenarios.append(run_scenario(work, made, args, parse_size(text)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = markdown(scenarios, args, args.files, total)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
