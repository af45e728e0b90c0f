"""Benchmark the OpenAI-compatible API of ``appliance serve`` against in-process generation and
llama-cpp-python's own server, on loopback, on one GGUF.

The model is bench_batching's ~85M-parameter random llama (bench/out/bench-85m.gguf, made on
first use), patched to write printable ASCII only: every token is one character, no stream
ends early at random, and llama-cpp-python never holds text back (see bench_batching's
docstring). Everything lives under bench/out/api/, rebuilt on every run:

1. an appliance host set up with the real CLI: keygen, a 1-of-1 root, ``appliance-builder
   build`` of a recipe whose ``[runtime]`` has ``context_size`` and ``threads``, ``trust init``,
   ``install --skip-health-check``, ``keys add``;
2. ``appliance --root HOST serve --max-concurrency 8`` in a child process (the server loads
   BatchedLlamaCppBackend with parallel = 8 from the slot, as in production);
3. ``python -m llama_cpp.server`` in a child process on the same GGUF, same ``n_ctx``
   (per sequence), same ``n_threads``/``n_threads_batch``, ``--interrupt_requests False``
   (otherwise a new request cuts the stream in flight short), with an API key too;
4. in this process, the slot's model loaded the way the server loads it
   (``load_backend(slot_runtime_settings(slot, parallel=8))``) and called directly.

Every side gets the same work: streaming text completions, ``--tokens`` tokens, temperature
0.7, top_p 1, a fixed seed per stream, a prompt that side never saw before (llama-cpp-python
reuses the KV cache of a shared prefix), equal prompt lengths. Every side gets the very same
prompts and seeds in a round: the batched engine's speed at 8 streams depends on them (up to
3x between prompt sets, reproducibly, in process too), so sides must not get different ones.
llama_cpp.server gets ``top_k 0, min_p 0, repeat_penalty 1`` too, to sample like ours.
HTTP clients are the official
``openai`` client, one per concurrent stream, in this process: client and server do not share
a GIL. Each round: 1 client sending ``--requests`` requests one after another, and N clients
sending one request each at once, on every side; sides run interleaved, in an order that
alternates between rounds, ``--repeat`` rounds.

Tokens/s: completion tokens over the wall time of the round (1 client: the sum of its request
times, first byte to last). TTFT: from sending the request (calling generate()) to the first
non-empty chunk.

    .venv/bin/python bench/bench_api.py --repeat 3 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batching import MODEL, percentile, write_model

from appliance.runtime.base import Backend, SamplingParams

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "bench" / "out" / "api"
BIN = Path(sys.executable).parent
CONTEXT = 512  # per sequence, as bench_batching
BEGIN, END = "<!-- bench_api:begin -->", "<!-- bench_api:end -->"
MODEL_NAME = "bench"
PROMPT = "{tag}: tell me about the weather."  # tag has a fixed width: equal prompt lengths


# --- set-up ---------------------------------------------------------------------------------


def cli(*args: str | Path) -> str:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=False, cwd=REPO
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed:\n{result.stderr}{result.stdout}")
    return result.stdout.strip()


def setup_host(threads: int) -> tuple[Path, str]:
    """An appliance host with the bench model installed, and an API key: (root, key)."""
    if WORK.exists():
        shutil.rmtree(WORK)
    keys, recipe, host = WORK / "keys", WORK / "recipe", WORK / "host"
    (recipe / "models").mkdir(parents=True)
    keys.mkdir()
    builder, appliance = BIN / "appliance-builder", BIN / "appliance"
    cli(builder, "keygen", keys / "root.pem")
    cli(builder, "keygen", keys / "signer.pem")
    cli(
        builder,
        "root",
        "create",
        "--root-key",
        keys / "root.pem",
        "--bundle-key",
        keys / "signer.pem.pub",
        "--threshold",
        "1",
        "-o",
        WORK / "root.json",
    )
    gguf = recipe / "models" / MODEL.name
    try:
        os.link(MODEL, gguf)
    except OSError:
        shutil.copyfile(MODEL, gguf)
    (recipe / "bench.toml").write_text(
        f'[bundle]\nname = "{MODEL_NAME}"\nversion = "1.0.0"\n\n'
        f'[model]\npath = "models/{MODEL.name}"\n\n'
        f'[runtime]\nbackend = "llama.cpp"\ncontext_size = {CONTEXT}\nthreads = {threads}\n'
    )
    bundle = WORK / "bench.tar"
    cli(builder, "build", recipe / "bench.toml", "--key", keys / "signer.pem", "-o", bundle)
    fingerprint = cli(builder, "root", "fingerprint", WORK / "root.json")
    cli(
        appliance, "--root", host, "trust", "init", WORK / "root.json", "--fingerprint", fingerprint
    )
    cli(appliance, "--root", host, "install", bundle, "--skip-health-check")
    bundle.unlink()  # the slot has its own copy; 341 MB less on disk
    shutil.rmtree(recipe)
    key = cli(appliance, "--root", host, "keys", "add", "bench").splitlines()[-1].strip()
    return host, key


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def start(name: str, command: list[str], port: int, ready: str, key: str) -> Server:
    log = WORK / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(  # its own session: a stop reaches its children too
            command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
    server = Server(name, f"http://127.0.0.1:{port}", process, log)
    import httpx

    deadline = time.monotonic() + 180
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=5, trust_env=False) as h:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited ({process.returncode}):\n{log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if h.get(server.url + ready).status_code == 200:
                    return server
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not get ready:\n{log.read_text()}")
            time.sleep(0.2)


def stop(server: Server) -> None:
    if server.process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)


# --- measuring ------------------------------------------------------------------------------


@dataclass
class Stream:
    ttft_s: float
    wall_s: float
    tokens: int
    early: bool


@dataclass
class Round:
    wall_s: float
    streams: list[Stream] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.streams)


# One stream: (tag, seed, max_tokens) -> Stream.
StreamFn = Callable[[str, int, int], Stream]


def inprocess(backend: Backend) -> Callable[[], StreamFn]:
    def make() -> StreamFn:
        def one(tag: str, seed: int, tokens: int) -> Stream:
            params = SamplingParams(max_tokens=tokens, temperature=0.7, top_p=1.0, seed=seed)
            started = time.perf_counter()
            first, last = None, None
            for chunk in backend.generate(PROMPT.format(tag=tag), params).chunks:
                if first is None and chunk.text:
                    first = time.perf_counter() - started
                last = chunk
            wall = time.perf_counter() - started
            assert last is not None and first is not None
            done = last.finish_reason == "length"
            return Stream(first, wall, tokens if done else last.completion_tokens, not done)

        return one

    return make


def over_http(url: str, key: str, extra: dict[str, Any]) -> Callable[[], StreamFn]:
    import openai

    def make() -> StreamFn:
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)

        def one(tag: str, seed: int, tokens: int) -> Stream:
            started = time.perf_counter()
            first, count, reason = None, 0, None
            stream = client.completions.create(
                model=MODEL_NAME,
                prompt=PROMPT.format(tag=tag),
                max_tokens=tokens,
                temperature=0.7,
                top_p=1.0,
                seed=seed,
                stream=True,
                extra_body=extra or None,
            )
            for part in stream:
                if not part.choices:
                    continue
                choice = part.choices[0]
                if choice.text:
                    count += 1
                    if first is None:
                        first = time.perf_counter() - started
                reason = choice.finish_reason or reason
            wall = time.perf_counter() - started
            assert first is not None, f"{url}: no text came back"
            done = reason == "length"
            return Stream(first, wall, tokens if done else count, not done)

        return one

    return make


def run_round(
    make: Callable[[], StreamFn], clients: int, requests: int, tokens: int, tag: str
) -> Round:
    """``clients`` at once; one client sends ``requests`` requests in a row, N clients one each."""
    if clients == 1:
        one = make()
        streams = [one(f"{tag}{i:02d}", 1000 + i, tokens) for i in range(requests)]
        return Round(sum(s.wall_s for s in streams), streams)
    fns = [make() for _ in range(clients)]
    results: list[Stream | BaseException | None] = [None] * clients
    barrier = threading.Barrier(clients + 1)

    def work(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fns[i](f"{tag}{i:02d}", 1000 + i, tokens)
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    for result in results:
        if not isinstance(result, Stream):
            raise RuntimeError(f"a stream failed: {result!r}")  # noqa: TRY004 - a failure
    return Round(wall, [r for r in results if isinstance(r, Stream)])


# --- report ---------------------------------------------------------------------------------


def uptime() -> str:
    return cli("uptime").split("load average:")[-1].strip()


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def rate(r: Round) -> float:
    return r.tokens / r.wall_s


def summary(rounds: list[Round]) -> dict[str, float]:
    rates = [rate(r) for r in rounds]
    ttft = [s.ttft_s for r in rounds for s in r.streams]
    return {
        "median": statistics.median(rates),
        "best": max(rates),
        "p50": percentile(ttft, 50),
        "p99": percentile(ttft, 99),
        "p50_best_round": min(percentile([s.ttft_s for s in r.streams], 50) for r in rounds),
        "early": sum(s.early for r in rounds for s in r.streams),
        "streams": sum(len(r.streams) for r in rounds),
        "rates": rates,  # type: ignore[dict-item]
    }


def verdict(value: float, target: float, *, higher: bool = True) -> str:
    ok = value >= target if higher else value <= target
    return "meets" if ok else "**misses**"


def report(
    args: argparse.Namespace,
    results: dict[tuple[str, int], list[Round]],
    load: tuple[str, str],
    started: str,
    elapsed: float,
) -> str:
    sides = [
        ("inproc", "in-process BatchedLlamaCppBackend (parallel 8)"),
        ("ours", "`appliance serve` (HTTP, --max-concurrency 8)"),
        ("llama", "`llama_cpp.server` (HTTP)"),
    ]
    s = {key: summary(rounds) for key, rounds in results.items()}
    commit = ""
    with contextlib.suppress(Exception):
        commit = cli("git", "rev-parse", "--short", "HEAD")
    lines = [
        BEGIN,
        "## API server: `appliance serve` vs in-process vs `llama_cpp.server` "
        "(`bench/bench_api.py`)",
        "",
        f"Run {started}, took {elapsed / 60:.1f} min; code at {commit or '?'} "
        "(working tree may differ). "
        f"Machine: {os.cpu_count()} CPUs ({cpu_name()}), shared with other work; "
        f"load average (1, 5, 15 min) before: {load[0]}; after: {load[1]}.",
        "",
        f"Model: `{MODEL.name}` ({MODEL.stat().st_size / 1e6:.0f} MB, F32, ~85M parameters, "
        "printable-ASCII patch of `bench_batching.py`), CPU only, "
        f"n_threads = n_threads_batch = {args.threads} for every side, context {CONTEXT} per "
        f"sequence. Streaming text completions of {args.tokens} tokens, temperature 0.7, "
        "top_p 1, fixed seeds, a unique prompt per request; official `openai` client in the "
        "benchmark process, servers in their own processes on 127.0.0.1. "
        f"{args.repeat} rounds, sides interleaved; per round 1 client sends {args.requests} "
        "requests in a row, N clients send one request each at once.",
        "",
        "| side | clients | tokens/s median | tokens/s best | TTFT p50 ms | TTFT p99 ms "
        "| streams (ended early) |",
        "|---|---|---|---|---|---|---|",
    ]
    for clients in args.clients:
        for key, name in sides:
            if (key, clients) not in s:
                continue
            v = s[(key, clients)]
            lines.append(
                f"| {name} | {clients} | {v['median']:.1f} | {v['best']:.1f} "
                f"| {v['p50'] * 1000:.0f} | {v['p99'] * 1000:.0f} "
                f"| {v['streams']:.0f} ({v['early']:.0f}) |"
            )
    lines += ["", "Ratios (median of rounds [best of rounds]):", ""]
    lines += ["| comparison | ratio | target | verdict |", "|---|---|---|---|"]
    one = min(args.clients)
    if ("ours", one) in s and ("inproc", one) in s:
        o, i = s[("ours", one)], s[("inproc", one)]
        ratio = o["median"] / i["median"]
        lines.append(
            f"| {one} client: HTTP tokens/s / in-process tokens/s | {ratio:.2f}x "
            f"[{o['best'] / i['best']:.2f}x] | >= 0.95x | {verdict(ratio, 0.95)} |"
        )
        per_round = [a / b for a, b in zip(o["rates"], i["rates"], strict=True)]  # type: ignore[call-overload]
        lines.append(
            f"| {one} client: same, round by round (sides run back to back) | "
            + ", ".join(f"{x:.2f}x" for x in per_round)
            + f"; median {statistics.median(per_round):.2f}x | >= 0.95x "
            f"| {verdict(statistics.median(per_round), 0.95)} |"
        )
    for clients in args.clients:
        if ("ours", clients) not in s or ("llama", clients) not in s:
            continue
        o, ll = s[("ours", clients)], s[("llama", clients)]
        r = o["median"] / ll["median"]
        who = f"{clients} client{'s' if clients > 1 else ''}: ours / llama_cpp.server"
        lines.append(
            f"| {who} tokens/s | {r:.2f}x [{o['best'] / ll['best']:.2f}x] | > 1x "
            f"| {verdict(r, 1.0)} |"
        )
        for q in ("p50", "p99"):
            ratio = o[q] / ll[q]
            lines.append(
                f"| {who} TTFT {q} | {ratio:.2f}x | < 1x | {verdict(ratio, 1.0, higher=False)} |"
            )
    lines += ["", "Tokens/s of every round, in run order:", ""]
    for (key, clients), rounds in results.items():
        lines.append(
            f"- {key}, {clients} client{'s' if clients > 1 else ''}: "
            + ", ".join(f"{rate(r):.1f}" for r in rounds)
        )
    lines.append("")
    lines.append(
        f"Reproduce: `.venv/bin/python bench/bench_api.py --repeat {args.repeat} "
        f"--tokens {args.tokens} --clients {','.join(map(str, args.clients))} "
        f"--threads {args.threads} --out docs/benchmarks.md`."
    )
    lines.append("")
    lines.append("<!-- bench_api:notes -->")
    lines.append(END)
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace our marked section of ``path`` (append it, or create the file, if absent).

    Hand-written notes between ``<!-- bench_api:notes -->`` and the end marker are kept.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        old, tail = rest.split(END, 1)
        if "<!-- bench_api:notes -->" in old:
            notes = old.split("<!-- bench_api:notes -->", 1)[1]
            section = section.replace(
                "<!-- bench_api:notes -->\n" + END, "<!-- bench_api:notes -->" + notes + END
            )
        text = head + section + tail
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# --- main -----------------------------------------------------------------------------------


@contextlib.contextmanager
def servers_running(
    host: Path, key: str, threads: int, concurrency: int
) -> Iterator[dict[str, Server]]:
    running: dict[str, Server] = {}
    try:
        port = free_port()
        running["ours"] = start(
            "ours",
            [
                str(BIN / "appliance"),
                "--root",
                str(host),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--max-concurrency",
                str(concurrency),
                "--max-queue",
                str(4 * concurrency),
            ],
            port,
            "/readyz",
            key,
        )
        port = free_port()
        running["llama"] = start(
            "llama",
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(MODEL),
                "--model_alias",
                MODEL_NAME,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                str(CONTEXT),
                "--n_threads",
                str(threads),
                "--n_threads_batch",
                str(threads),
                "--n_gpu_layers",
                "0",
                "--interrupt_requests",
                "False",
                "--api_key",
                key,
            ],
            port,
            "/v1/models",
            key,
        )
        yield running
    finally:
        for server in running.values():
            stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds per side")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--clients", default="1,8", help="comma-separated concurrent clients")
    parser.add_argument(
        "--requests", type=int, default=3, help="requests in a row of the single client, per round"
    )
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads, every side")
    parser.add_argument("--out", type=Path, help="update the bench_api section of this file")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    concurrency = max(8, *args.clients)

    # SIGTERM/SIGHUP unwind like Ctrl-C, so that the servers are stopped on the way out.
    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    t0 = time.monotonic()
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    load_before = uptime()
    print(f"load average before: {load_before}", flush=True)
    if not MODEL.exists():
        MODEL.parent.mkdir(parents=True, exist_ok=True)
        write_model(MODEL)
    host, key = setup_host(args.threads)
    print(f"host set up in {time.monotonic() - t0:.0f} s", flush=True)

    from appliance.runtime.loader import load_backend, slot_runtime_settings

    results: dict[tuple[str, int], list[Round]] = {}
    with servers_running(host, key, args.threads, concurrency) as running:
        backend = load_backend(slot_runtime_settings(host / "current", parallel=concurrency))
        try:
            makers = {
                "inproc": inprocess(backend),
                "ours": over_http(running["ours"].url, key, {}),
                "llama": over_http(
                    running["llama"].url, key, {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}
                ),
            }
            print(f"servers up at {time.monotonic() - t0:.0f} s", flush=True)
            for name, make in makers.items():  # warm-up: page in the weights, fill buffers
                run_round(make, 1, 1, 4, f"w{name[0]}")
            for r in range(args.repeat):
                order = list(makers) if r % 2 == 0 else list(reversed(makers))
                for clients in args.clients:
                    for name in order:
                        rnd = run_round(
                            makers[name],
                            clients,
                            args.requests if clients == 1 else 1,
                            args.tokens,
                            f"r{r}c{clients}x",  # the same prompts on every side
                        )
                        results.setdefault((name, clients), []).append(rnd)
                        print(
                            f"round {r} {name:6} clients={clients}: {rate(rnd):6.1f} tok/s, "
                            f"TTFT p50 {percentile([s.ttft_s for s in rnd.streams], 50) * 1000:.0f}"
                            f" ms, {time.monotonic() - t0:.0f} s",
                            flush=True,
                        )
        finally:
            backend.close()
    load_after = uptime()
    elapsed = time.monotonic() - t0
    section = report(args, results, (load_before, load_after), started, elapsed)
    print(section)
    (WORK / "results.json").write_text(
        json.dumps(
            {
                f"{k[0]}/{k[1]}": [
                    {"wall_s": r.wall_s, "streams": [s.__dict__ for s in r.streams]} for r in v
                ]
                for k, v in results.items()
            },
            indent=1,
        )
    )
    if args.out:
        write_section(args.out, section)
        print(f"wrote the bench_api section of {args.out}")


if __name__ == "__main__":
    main()
