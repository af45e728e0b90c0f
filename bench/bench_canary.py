"""Benchmark the canary's overhead on tokens/s (target: at most 5%, issue 13).

A host with two installed slots of the same real GGUF (Gemma 3 270M Q4_K_M, tests/realmodel.py;
``--model`` for another), built with the test simulator's signed bundles and installed by the
real ``Appliance`` (no health check: the engine loads below anyway); ``1.0.0`` active, ``1.1.0``
beside it. Served in this process exactly as ``appliance serve`` wires it: the active slot's
model in a :class:`ModelHolder` (:class:`SlotFollower`), the canary's in a
:class:`CanaryRoute` (:class:`CanaryFollower`), the app on loopback; llama.cpp threads pinned
(``--threads``, both engines).

Per round, three sides, one client sending ``--requests`` text completions in a row
(``--tokens`` tokens each, ``ignore_eos``, temperature 0, a prompt of its own per request):

- ``off``: no canary (``canary.json`` absent): the active slot alone;
- ``idle``: a canary loaded beside it (``--keys bench-canary``), the client's key not routed
  to it: what every active-slot request pays for a canary (the routing decision, a second engine
  in memory);
- ``routed``: the same canary, the client's key routed to it: the canary's own path.

The canary is started and aborted through :mod:`appliance.canary` (audited, as the CLI does)
between rounds, and the idle/routed order alternates. Tokens/s of a side: completion tokens over
the summed request times. Overhead: 1 - side / off, per round against the mean of the ``off``
runs just before and just after it (the load of a shared host drifts), the median over rounds.

    .venv/bin/python bench/bench_canary.py --rounds 3 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import httpx
from benchdoc import write_section

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from server_helpers import live_server  # noqa: E402
from simulator import BundleSimulator, Host  # noqa: E402

from appliance import canary  # noqa: E402
from appliance.apikeys import KeyStore, key_file  # noqa: E402
from appliance.canary import Thresholds  # noqa: E402
from appliance.installer import InstallOptions  # noqa: E402
from appliance.server.canary import CanaryFollower, CanaryRoute  # noqa: E402
from appliance.server.holder import ModelHolder  # noqa: E402
from appliance.server.serve import SlotFollower  # noqa: E402

WORK = REPO / "bench" / "out" / "canary"
HEADING = "## Canary: overhead on tokens/s (`bench/bench_canary.py`)"
BEGIN, END, NOTES = (
    "<!-- bench_canary:begin -->",
    "<!-- bench_canary:end -->",
    "<!-- bench_canary:notes -->",
)
WORDS = ("Apple", "Bridge", "Desert", "Engine", "Forest", "Garden", "Island", "Ladder", "Orange")
SIDES = ("off", "idle", "routed")
TARGET = 0.05


def setup_host(model: Path, threads: int) -> Host:
    shutil.rmtree(WORK, ignore_errors=True)
    host = Host(root=WORK / "host", bundles=WORK / "bundles", sim=BundleSimulator())
    host.trust_init()
    files = {"model/model.gguf": model.read_bytes(), "recipe.toml": b'name = "bench"\n'}
    runtime = {"backend": "llama.cpp", "context_size": 1024, "threads": threads}
    for version in ("1.0.0", "1.1.0"):
        bundle = host.sim.bundle(version, name="bench", files=files, runtime=runtime)
        host.install(bundle, InstallOptions(skip_health_check=True))
    host.appliance.rollback()
    return host


def run_side(http: httpx.Client, key: str, *, requests: int, tokens: int, tag: int) -> float:
    """Tokens/s of ``requests`` completions in a row with ``key``."""
    done, spent = 0, 0.0
    for i in range(requests):
        body = {
            "model": "bench",
            "prompt": f"{WORDS[i % len(WORDS)]} {tag:04d}: tell me about the weather.",
            "max_tokens": tokens,
            "temperature": 0,
            "seed": i,
            "ignore_eos": True,
        }
        began = time.perf_counter()
        response = http.post(
            "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        spent += time.perf_counter() - began
        response.raise_for_status()
        done += int(response.json()["usage"]["completion_tokens"])
    return done / spent


def measure(host: Host, args: argparse.Namespace) -> dict[str, list[float]]:
    store = KeyStore(key_file(host.root))
    active_key, canary_key = store.add("bench-active"), store.add("bench-canary")
    holder = ModelHolder()
    slots = SlotFollower(host.root, holder, parallel=1, threads=args.threads)
    slots.load_active()
    route = CanaryRoute(Thresholds(max_error_rate=1.0, min_requests=200))
    follower = CanaryFollower(host.root, route, parallel=1, threads=args.threads)
    results: dict[str, list[float]] = {side: [] for side in SIDES}
    tag = 0
    try:
        with live_server(host.root, holder, canary=route, max_concurrency=1) as live:
            http = httpx.Client(base_url=live.url, timeout=600.0)
            run_side(http, active_key, requests=1, tokens=args.tokens, tag=9999)  # warm-up
            for r in range(args.rounds):
                tag += 1
                results["off"].append(
                    run_side(http, active_key, requests=args.requests, tokens=args.tokens, tag=tag)
                )
                canary.start(
                    host.appliance,
                    "1.1.0",
                    percent=None,
                    keys=("bench-canary",),
                    thresholds=Thresholds(),
                    known_keys=frozenset({"bench-canary"}),
                )
                follower.check()
                assert route.state is not None, "the canary did not load"
                run_side(http, canary_key, requests=1, tokens=args.tokens, tag=9998)  # warm-up
                order = ("idle", "routed") if r % 2 == 0 else ("routed", "idle")
                for side in order:
                    tag += 1
                    key = canary_key if side == "routed" else active_key
                    before = route.watch.total
                    results[side].append(
                        run_side(http, key, requests=args.requests, tokens=args.tokens, tag=tag)
                    )
                    routed = route.watch.total - before
                    assert routed == (args.requests if side == "routed" else 0), (side, routed)
                canary.abort(host.appliance, reason="bench round over")
                follower.check()
                print(
                    f"round {r + 1}: "
                    + ", ".join(f"{s} {results[s][-1]:.1f} tok/s" for s in SIDES),
                    flush=True,
                )
            tag += 1  # the last reference: each round is judged against the offs around it
            results["off"].append(
                run_side(http, active_key, requests=args.requests, tokens=args.tokens, tag=tag)
            )
            http.close()
    finally:
        route.end()
        holder.close()
    return results


def overheads(results: dict[str, list[float]]) -> dict[str, float]:
    """1 - side / off, the median over rounds of each round against the mean of the ``off``
    measured just before and just after it (a shared host's load drifts between rounds)."""
    off = results["off"]
    return {
        side: statistics.median(
            1 - value / ((off[r] + off[r + 1]) / 2) for r, value in enumerate(results[side])
        )
        for side in ("idle", "routed")
    }


def section(results: dict[str, list[float]], args: argparse.Namespace, model: Path) -> str:
    medians = {side: statistics.median(values) for side, values in results.items()}
    overhead = overheads(results)
    worst = max(overhead.values())
    verdict = "meets" if worst <= TARGET else "misses"
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    lines = [
        BEGIN,
        HEADING,
        "",
        f"Run of {when} UTC: {model.name}, {args.rounds} rounds of {args.requests} requests x "
        f"{args.tokens} tokens, llama.cpp threads {args.threads} (both engines), "
        f"{platform.machine()}, Python {platform.python_version()}.",
        "",
        "| side | tok/s (median) | per round | overhead vs the offs around each round (median) |",
        "|---|---|---|---|",
    ]
    for side in SIDES:
        rounds = ", ".join(f"{v:.1f}" for v in results[side])
        cost = "" if side == "off" else f"{overhead[side]:+.1%}"
        lines.append(f"| {side} | {medians[side]:.1f} | {rounds} | {cost} |")
    lines += [
        "",
        f"Verdict: the worst overhead is {worst:+.1%}, which {verdict} the target (at most "
        f"{TARGET:.0%}). `off`: the active slot alone; `idle`: a canary loaded beside it, this "
        "client not routed to it; `routed`: the client's key routed to the canary (the same "
        "GGUF in both slots).",
        "",
        NOTES,
        END,
    ]
    return "\n".join(lines) + "\n"


def default_model() -> Path:
    realmodel = importlib.import_module("realmodel")
    return Path(realmodel.gemma_gguf())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=4, help="requests per side and round")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads, both engines")
    parser.add_argument("--model", type=Path, help="a GGUF (default: Gemma 3 270M Q4_K_M)")
    parser.add_argument("--out", type=Path, action="append", default=[], help=".md or .json")
    args = parser.parse_args()
    model = args.model or default_model()
    host = setup_host(model, args.threads)
    try:
        results = measure(host, args)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    text = section(results, args, model)
    print(text)
    for out in args.out:
        if out.suffix == ".json":
            out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        else:
            write_section(out, text, begin=BEGIN, end=END, notes=NOTES, heading=HEADING)


if __name__ == "__main__":
    main()
