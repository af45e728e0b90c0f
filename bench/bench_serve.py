"""Benchmark ``appliance serve`` (our gateway in front of a supervised ``llama-server``) against
a bare ``llama-server`` of the same build, ``llama_cpp.server`` and ``llama-batched-bench``, on a
real quantised GGUF (Gemma 3 270M Q4_K_M, tests/realmodel.py; ``--model`` for another).

Everything lives under bench/out/serve/, rebuilt on every run:

1. an appliance host set up with the real CLI: keygen, a 1-of-1 root, ``appliance-builder
   build`` of a recipe whose ``[runtime]`` has ``context_size`` and ``threads``, ``trust init``,
   ``install`` (its health check chooses the CPU variant by execution and remembers it in the
   slot), ``keys add``;
2. per round, each server started afresh (timed: process start to ready), in the round's order:
   - ours: ``appliance --root HOST serve --max-concurrency P`` (its ``llama-server`` child gets
     ``--parallel P``), ready when ``GET /readyz`` (with our key) answers 200;
   - bare: the very command serve gives its child (``EngineProcess.command``: same binary,
     model, threads, ``--parallel P``, context, flags), on TCP instead of a unix socket, run
     from a directory holding a hard link of it and the slot's remembered CPU variant only
     (``engine_dir``: ggml would otherwise load the best *scored* variant, AMX here, which
     crashes on quantised models); ready when ``GET /health`` answers 200;
   - llama_cpp.server: ``python -m llama_cpp.server`` (one sequence: it has no batching), the
     same variant loaded first (the dispatch build's bindings load no CPU backend themselves),
     ``--interrupt_requests False``; skipped when its extras are not installed;
3. per round and client count, the sides in the round's order (alternating between rounds):
   N official ``openai`` clients (threads of this process, one client per stream) each stream
   one text completion at once (1 client: ``--requests`` in a row), ``--tokens`` tokens with
   ``ignore_eos``, temperature 0.7, top_p 1, top_k 40, min_p 0.05, repeat_penalty 1, a fixed
   seed per stream; every prompt begins with its own word (no prompt-cache reuse), every side
   gets the same prompts and seeds;
4. per round, ``llama-batched-bench`` (same binary directory, model, threads, context) with
   ``-npp`` the prompts' token count, ``-ntg --tokens``, ``-npl`` the client counts: the limit;
5. after the largest client count, the resident memory (VmRSS, and the peak VmHWM) from /proc:
   ours is serve plus its ``llama-server``.

Tokens/s: completion tokens over the wall time of the round (1 client: the sum of its request
times). TTFT: from calling ``create`` to the first non-empty chunk. Relay overhead at 1 client:
the same request (prompt and seed) on ours and bare, round by round: the difference in TTFT,
and in time per token after the first.

    .venv/bin/python bench/bench_serve.py --repeat 5 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.util
import json
import math
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
from benchdoc import write_section

from appliance.runtime import cpuvariant
from appliance.runtime.llamaengine import EngineProcess, ServerBinary, engine_dir, find_server
from appliance.runtime.loader import slot_runtime_settings
from appliance.slots import SlotPaths

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "bench" / "out" / "serve"
BIN = Path(sys.executable).parent
HEADING = "## Serving: `appliance serve` vs bare `llama-server` (`bench/bench_serve.py`)"
BEGIN, END, NOTES = (
    "<!-- bench_serve:begin -->",
    "<!-- bench_serve:end -->",
    "<!-- bench_serve:notes -->",
)
MODEL_NAME = "bench"
# Every prompt begins with a word of its own: llama-server reuses a slot's KV cache for a shared
# prefix, so prompts must differ from the first token on. Words of one token each in Gemma 3's
# vocabulary (checked with llama-tokenize): equal prompt lengths.
# fmt: off
WORDS = (
    "Apple", "Bridge", "Desert", "Engine", "Forest", "Garden", "Island", "Ladder", "Orange",
    "Pepper", "Quartz", "River", "Silver", "Tiger", "Valley", "Window", "Yellow", "Anchor",
    "Basket", "Castle", "Dragon", "Eagle", "Hammer", "Iron", "Kingdom", "Lemon", "Mirror", "Nest",
    "Ocean", "Queen", "Rocket", "Thunder", "Violet", "Copper", "Falcon", "Ginger", "Honey",
    "Marble", "Piano", "Rabbit", "Salmon", "Tomato", "Table", "Music", "Paper", "Stone", "Cloud",
    "Light", "Water", "Fire", "Sugar", "Money", "Doctor", "Father", "Mother", "Summer", "Winter",
    "Spring", "Autumn", "Market", "Letter", "Number", "Picture", "Science", "History", "Village",
    "Station", "School", "Church", "Office", "Energy", "Power", "Metal", "Glass", "Bread",
    "Cheese", "Coffee", "Butter", "Chicken", "Flower", "Horse", "Camera", "Planet", "Silence",
    "Nature", "Travel", "Purple", "Golden", "Battle", "Circle", "Square", "Family", "Friend",
)
# fmt: on
PROMPT = "{word} {tag}: tell me about the weather."  # tag of fixed width: equal prompt lengths
SAMPLING = {"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0, "ignore_eos": True}
SIDES = {
    "ours": "`appliance serve` (gateway + llama-server)",
    "bare": "bare `llama-server`",
    "llama_cpp": "`llama_cpp.server` (1 sequence)",
}
# llama_cpp.server with the variant loaded first: the dispatch build's bindings load none.
LLAMA_CPP_LAUNCH = (
    "import runpy, sys; from pathlib import Path; import llama_cpp; "
    "from appliance.runtime.cpuvariant import load_backends; load_backends([Path(sys.argv[1])]); "
    "sys.argv = ['llama_cpp.server', *sys.argv[2:]]; "
    "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)"
)


# --- set-up ---------------------------------------------------------------------------------


def cli(*args: str | Path) -> str:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=False, cwd=REPO
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed:\n{result.stderr}{result.stdout}")
    return result.stdout.strip()


def setup_host(model: Path, context: int, threads: int) -> tuple[Path, str]:
    """An appliance host with ``model`` installed (health check included), and an API key."""
    keys, recipe, host = WORK / "keys", WORK / "recipe", WORK / "host"
    (recipe / "models").mkdir(parents=True)
    keys.mkdir()
    builder, appliance = BIN / "appliance-builder", BIN / "appliance"
    cli(builder, "keygen", keys / "root.pem")
    cli(builder, "keygen", keys / "signer.pem")
    cli(
        builder, "root", "create", "--root-key", keys / "root.pem",
        "--bundle-key", keys / "signer.pem.pub", "--threshold", "1", "-o", WORK / "root.json",
    )  # fmt: skip
    gguf = recipe / "models" / model.name
    try:
        os.link(model, gguf)
    except OSError:
        shutil.copyfile(model, gguf)
    (recipe / "bench.toml").write_text(
        f'[bundle]\nname = "{MODEL_NAME}"\nversion = "1.0.0"\n\n'
        f'[model]\npath = "models/{model.name}"\n\n'
        f'[runtime]\nbackend = "llama.cpp"\ncontext_size = {context}\nthreads = {threads}\n'
    )
    bundle = WORK / "bench.tar"
    cli(builder, "build", recipe / "bench.toml", "--key", keys / "signer.pem", "-o", bundle)
    fingerprint = cli(builder, "root", "fingerprint", WORK / "root.json")
    cli(
        appliance, "--root", host, "trust", "init", WORK / "root.json", "--fingerprint", fingerprint
    )
    cli(appliance, "--root", host, "install", bundle)
    bundle.unlink()
    shutil.rmtree(recipe)
    key = cli(appliance, "--root", host, "keys", "add", "bench").splitlines()[-1].strip()
    return host, key


@dataclass(frozen=True)
class Engine:
    """What the bare side and llama-batched-bench run: the slot's binaries and CPU variant."""

    binary: ServerBinary
    variant: Path | None
    folder: Path  # engine_dir: llama-server, llama-batched-bench, the one variant
    command: list[str]  # serve's command for its child, host/port/key still to patch
    model: Path


def prepare_engine(slot: Path, parallel: int) -> Engine:
    binary = find_server()
    settings = slot_runtime_settings(slot, parallel=parallel)
    variant = None
    if binary.runtime is not None:  # the install's health check remembered it in the slot
        choice = cpuvariant.choose(
            binary.runtime, model_path=settings.model_path, memory=SlotPaths(slot).cpu_variant
        )
        variant = choice.path
    folder = WORK / "engine"
    server = engine_dir(binary, variant, folder)
    batched = binary.server.with_name("llama-batched-bench")
    if batched.is_file():
        os.link(batched, folder / batched.name)
    process = EngineProcess(settings)  # only for its command: nothing is started
    try:
        command = process.command(server)
    finally:
        process.close()
    return Engine(binary, variant, folder, command, settings.model_path)


def engine_env(engine: Engine) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(engine.binary.lib), env.get("LD_LIBRARY_PATH", "")) if p
    )
    return env


def bare_command(engine: Engine, port: int, key: str) -> list[str]:
    command = list(engine.command)
    command[command.index("--host") + 1] = "127.0.0.1"
    command[command.index("--api-key") + 1] = key
    return [*command, "--port", str(port)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- servers --------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    cold_start_s: float


def start(
    name: str, command: list[str], *, port: int, ready: str, key: str, **popen: Any
) -> Server:
    """Start ``command`` and time it until ``ready`` answers 200 (polled every 20 ms)."""
    url = f"http://127.0.0.1:{port}"
    log = WORK / f"{name}.log"
    with (
        httpx.Client(
            headers={"Authorization": f"Bearer {key}"}, timeout=5, trust_env=False
        ) as http,
        log.open("ab") as out,
    ):
        started = time.perf_counter()
        process = subprocess.Popen(  # its own session: a stop reaches its children too
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen
        )
        try:
            elapsed = wait_ready(process, http, url + ready, started, f"{name} (log: {log})")
        except BaseException:
            stop(Server(name, url, process, 0.0))
            raise
    return Server(name, url, process, elapsed)


def wait_ready(
    process: subprocess.Popen[bytes], http: httpx.Client, url: str, started: float, what: str
) -> float:
    """Seconds from ``started`` until ``url`` answers 200."""
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode})")
        with contextlib.suppress(httpx.HTTPError):
            if http.get(url).status_code == 200:
                return time.perf_counter() - started
        if time.perf_counter() - started > 300:
            raise RuntimeError(f"{what} did not get ready in 300 s")
        time.sleep(0.02)


def stop(server: Server) -> None:
    if server.process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)


def start_side(
    side: str, *, host: Path, engine: Engine, key: str, parallel: int, threads: int, context: int
) -> Server:
    port = free_port()
    if side == "ours":
        command = [
            str(BIN / "appliance"), "--root", str(host), "serve", "--host", "127.0.0.1",
            "--port", str(port), "--max-concurrency", str(parallel),
            "--max-queue", str(4 * parallel),
        ]  # fmt: skip
        return start(side, command, port=port, ready="/readyz", key=key, cwd=REPO)
    if side == "bare":
        command = bare_command(engine, port, key)
        return start(
            side, command, port=port, ready="/health", key=key,
            cwd=engine.folder, env=engine_env(engine),
        )  # fmt: skip
    command = [
        sys.executable, "-c", LLAMA_CPP_LAUNCH, str(engine.variant or ""),
        "--model", str(engine.model), "--model_alias", MODEL_NAME, "--host", "127.0.0.1",
        "--port", str(port), "--n_ctx", str(context), "--n_threads", str(threads),
        "--n_threads_batch", str(threads), "--n_gpu_layers", "0",
        "--interrupt_requests", "False", "--api_key", key,
    ]  # fmt: skip
    return start(side, command, port=port, ready="/v1/models", key=key, cwd=REPO)


def llama_cpp_server_missing() -> str | None:
    """Why ``python -m llama_cpp.server`` cannot run here, or None."""
    missing = [
        m
        for m in ("sse_starlette", "starlette_context", "pydantic_settings")
        if importlib.util.find_spec(m) is None
    ]
    return f"not installed: {', '.join(missing)}" if missing else None


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` and of every process below it, summed; ``top``: VmRSS of
    ``pid`` alone (serve without its llama-server)."""
    total = {"VmRSS": 0, "VmHWM": 0, "top": 0}
    pending = [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in total:
                    total[name] += int(value.split()[0])
                    if name == "VmRSS" and current == pid:
                        total["top"] = int(value.split()[0])
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    pending += [int(c) for c in (task / "children").read_text().split()]
    return total


# --- measuring ------------------------------------------------------------------------------


@dataclass
class Stream:
    prompt: str
    ttft_s: float
    wall_s: float
    tokens: int
    prompt_tokens: int
    early: bool


@dataclass
class Round:
    wall_s: float
    streams: list[Stream] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return sum(s.tokens for s in self.streams) / self.wall_s


# One stream: (prompt, seed, max_tokens) -> Stream.
StreamFn = Callable[[str, int, int], Stream]


def over_http(url: str, key: str) -> StreamFn:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=600)

    def one(prompt: str, seed: int, tokens: int) -> Stream:
        started = time.perf_counter()
        first, count, reason, usage = None, 0, None, None
        stream = client.completions.create(
            model=MODEL_NAME,
            prompt=prompt,
            max_tokens=tokens,
            temperature=0.7,
            top_p=1.0,
            seed=seed,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=SAMPLING,
        )
        for part in stream:
            usage = part.usage or usage
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
        produced = usage.completion_tokens if usage is not None else count
        prompt_tokens = usage.prompt_tokens if usage is not None else 0
        return Stream(prompt, first, wall, produced, prompt_tokens, reason != "length")

    return one


def run_round(
    url: str, key: str, *, clients: int, requests: int, tokens: int, prompts: list[str]
) -> Round:
    """``clients`` streams at once; 1 client sends ``requests`` requests in a row."""
    if clients == 1:
        one = over_http(url, key)
        streams = [one(prompts[i], 1000 + i, tokens) for i in range(requests)]
        return Round(sum(s.wall_s for s in streams), streams)
    fns = [over_http(url, key) for _ in range(clients)]
    results: list[Stream | BaseException | None] = [None] * clients
    barrier = threading.Barrier(clients + 1)

    def work(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fns[i](prompts[i], 1000 + i, tokens)
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
    streams = [r for r in results if isinstance(r, Stream)]
    if len(streams) != clients:
        raise RuntimeError(f"a stream failed: {[r for r in results if not isinstance(r, Stream)]}")
    return Round(wall, streams)


def batched_bench(
    engine: Engine, *, prompt_tokens: int, tokens: int, clients: list[int], threads: int, ctx: int
) -> dict[int, dict[str, float]]:
    """llama-batched-bench's jsonl rows by batch size: {npl: {"s_tg": t/s, "t": s, ...}}."""
    command = [
        str(engine.folder / "llama-batched-bench"), "--model", str(engine.model),
        "--ctx-size", str(ctx), "--threads", str(threads), "--threads-batch", str(threads),
        "--n-gpu-layers", "0", "-npp", str(prompt_tokens), "-ntg", str(tokens),
        "-npl", ",".join(map(str, clients)), "--output-format", "jsonl",
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, check=False, cwd=engine.folder,
        env=engine_env(engine),
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"llama-batched-bench failed ({result.returncode}):\n{result.stderr}")
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {int(r["pl"]): r for r in rows}


# --- report ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: with few samples, p99 is the slowest one."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def spread(values: list[float], fmt: str = "{:.2f}x") -> str:
    """Median (min..max); ratios by default."""
    if not values:
        return "-"
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} ({fmt.format(min(values))}..{fmt.format(max(values))})"


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def versions(engine: Engine) -> str:
    build = subprocess.run(
        [str(engine.folder / "llama-server"), "--version"], capture_output=True, text=True,
        check=False, cwd=engine.folder, env=engine_env(engine),
    )  # fmt: skip
    line = next((x for x in build.stderr.splitlines() if x.startswith("version")), "?")
    commit = ""
    with contextlib.suppress(Exception):
        commit = cli("git", "rev-parse", "--short", "HEAD")
    packages = ", ".join(
        f"{p} {metadata.version(p)}" for p in ("llama_cpp_python", "openai", "fastapi", "uvicorn")
    )
    return (
        f"llama.cpp {line.removeprefix('version: ')} (llama-cpp-python's wheel), {packages}, "
        f"Python {platform.python_version()}; code at {commit or '?'} (working tree may differ)"
    )


@dataclass
class Results:
    rounds: dict[tuple[str, int], list[Round]] = field(default_factory=dict)
    cold: dict[str, list[float]] = field(default_factory=dict)
    memory: dict[str, list[dict[str, int]]] = field(default_factory=dict)
    batched: list[dict[int, dict[str, float]]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    prompt_tokens: int = 0


def per_round(
    results: Results, a: str, b: str, clients: int, fn: Callable[[Round], float]
) -> list[float]:
    pairs = zip(
        results.rounds.get((a, clients), []), results.rounds.get((b, clients), []), strict=False
    )
    return [fn(x) / fn(y) for x, y in pairs]


def ttft_p50(r: Round) -> float:
    return percentile([s.ttft_s for s in r.streams], 50)


def per_token_s(s: Stream) -> float:
    return (s.wall_s - s.ttft_s) / max(1, s.tokens - 1)


def report(args: argparse.Namespace, res: Results, engine: Engine, meta: dict[str, str]) -> str:
    sides = [s for s in SIDES if s not in res.skipped]
    lengths = [
        s.prompt_tokens
        for (side, _), rounds in res.rounds.items()
        if side in {"ours", "bare"}
        for r in rounds
        for s in r.streams
    ] or [res.prompt_tokens]
    length = f"{min(lengths)}" + (f" to {max(lengths)}" if max(lengths) > min(lengths) else "")
    lines = [
        BEGIN,
        HEADING,
        "",
        f"Run {meta['started']}, took {meta['elapsed']}. Machine: {os.cpu_count()} CPUs "
        f"({cpu_name()}), shared with other work; load average (1, 5, 15 min) before: "
        f"{meta['load_before']}; after: {meta['load_after']}. {meta['versions']}.",
        "",
        f"Model: `{engine.model.name}` ({engine.model.stat().st_size / 1e6:.0f} MB), CPU only, "
        f"CPU variant {engine.variant.name if engine.variant else 'built in'} (the slot's "
        f"remembered choice) for every side. Threads {args.threads} (`--threads` and "
        f"`--threads-batch`) for every side; `--parallel {args.parallel}` for ours and bare "
        f"(the largest client count), context {args.context} per sequence "
        f"(`--ctx-size {args.context * args.parallel}`); llama_cpp.server has one sequence of "
        f"{args.context}. Streaming text completions of {args.tokens} tokens (`ignore_eos`), "
        "temperature 0.7, top_p 1, top_k 40, min_p 0.05, fixed seeds, prompts of "
        f"{length} tokens that differ from the first token on; one official "
        "`openai` client per stream, in threads of the benchmark process; servers on "
        "127.0.0.1, started afresh every round (then one untimed 4-token request each). "
        f"{args.repeat} round{'s' if args.repeat > 1 else ''}, sides interleaved in "
        f"an order that alternates; 1 client sends {args.requests} requests in a row, N "
        "clients one request each at once. Figures: median of rounds (min..max across rounds).",
        "",
        "| clients | side | tokens/s | TTFT p50 ms | TTFT p99 ms | streams (ended early) |",
        "|---|---|---|---|---|---|",
    ]
    for clients in args.clients:
        for side in sides:
            rounds = res.rounds.get((side, clients), [])
            if not rounds:
                continue
            ttft = [s.ttft_s * 1000 for r in rounds for s in r.streams]
            streams = [s for r in rounds for s in r.streams]
            lines.append(
                f"| {clients} | {SIDES[side]} | {spread([r.rate for r in rounds], '{:.1f}')} "
                f"| {percentile(ttft, 50):.0f} | {percentile(ttft, 99):.0f} "
                f"| {len(streams)} ({sum(s.early for s in streams)}) |"
            )
        limit = [b[clients] for b in res.batched if clients in b]
        if limit:
            gen = [clients * args.tokens / float(b["t"]) for b in limit]
            lines.append(
                f"| {clients} | `llama-batched-bench` (generated tokens / total time; "
                f"decode only: {spread([float(b['speed_tg']) for b in limit], '{:.1f}')}) "
                f"| {spread(gen, '{:.1f}')} | - | - | - |"
            )
    lines += [
        "",
        "Ratios, round by round: median (min..max).",
        "",
        "| clients | ours / bare tokens/s | ours / bare TTFT p50 | bare / batched-bench "
        "| llama_cpp.server / bare tokens/s |",
        "|---|---|---|---|---|",
    ]
    for clients in args.clients:
        vs_limit = [
            r.rate / (clients * args.tokens / float(b[clients]["t"]))
            for r, b in zip(res.rounds.get(("bare", clients), []), res.batched, strict=False)
            if clients in b
        ]
        lines.append(
            f"| {clients} | {spread(per_round(res, 'ours', 'bare', clients, lambda r: r.rate))} "
            f"| {spread(per_round(res, 'ours', 'bare', clients, ttft_p50))} "
            f"| {spread(vs_limit)} "
            f"| {spread(per_round(res, 'llama_cpp', 'bare', clients, lambda r: r.rate))} |"
        )
    ours1, bare1 = res.rounds.get(("ours", 1), []), res.rounds.get(("bare", 1), [])
    pairs = [
        (o, b)
        for ro, rb in zip(ours1, bare1, strict=False)
        for o, b in zip(ro.streams, rb.streams, strict=True)
    ]
    if pairs:
        d_ttft = [(o.ttft_s - b.ttft_s) * 1000 for o, b in pairs]
        d_token = [(per_token_s(o) - per_token_s(b)) * 1000 for o, b in pairs]
        d_total = [(o.wall_s - b.wall_s) / o.tokens * 1000 for o, b in pairs]
        lines += [
            "",
            f"Relay overhead at 1 client (ours minus bare, the same request; {len(pairs)} pairs, "
            "median (min..max)): TTFT "
            f"{spread(d_ttft, '{:+.1f}')} ms; time per token after the first "
            f"{spread(d_token, '{:+.2f}')} ms (bare: "
            f"{statistics.median(per_token_s(b) * 1000 for _, b in pairs):.1f} ms); whole "
            f"request over its tokens {spread(d_total, '{:+.2f}')} ms per token.",
        ]
    lines += [
        "",
        f"| side | cold start s (to ready) | RSS MiB after the {max(args.clients)}-client round "
        "| of which the process started (ours: serve alone) | peak RSS MiB (VmHWM, summed) |",
        "|---|---|---|---|---|",
    ]
    for side in sides:
        mem = res.memory.get(side, [])
        lines.append(
            f"| {SIDES[side]} | {spread(res.cold.get(side, []), '{:.2f}')} "
            f"| {spread([m['VmRSS'] / 1024 for m in mem], '{:.0f}')} "
            f"| {spread([m['top'] / 1024 for m in mem], '{:.0f}')} "
            f"| {spread([m['VmHWM'] / 1024 for m in mem], '{:.0f}')} |"
        )
    cold = per_round_cold(res)
    if cold:
        lines += [
            "",
            f"Cold start ours / bare, round by round: {spread(cold)}. From process start to "
            "ready: ours `GET /readyz` (with the key) 200, bare `GET /health` 200, "
            "llama_cpp.server `GET /v1/models` 200; polled every 20 ms; the model file is in the "
            "page cache (set-up and earlier rounds read it).",
        ]
    for side, why in res.skipped.items():
        lines += ["", f"{SIDES[side]}: skipped, {why} (`pip install 'llama-cpp-python[server]'`)."]
    lines += ["", "Tokens/s of every round, in run order:", ""]
    for (side, clients), rounds in res.rounds.items():
        lines.append(f"- {side}, {clients}: " + ", ".join(f"{r.rate:.1f}" for r in rounds))
    lines += [
        "",
        f"Reproduce: `.venv/bin/python bench/bench_serve.py --repeat {args.repeat} "
        f"--tokens {args.tokens} --clients {','.join(map(str, args.clients))} "
        f"--requests {args.requests} --threads {args.threads}"
        + (f" --model {args.model}" if args.model else "")
        + " --out docs/benchmarks.md`.",
        "",
        NOTES,
        END,
    ]
    return "\n".join(lines)


def per_round_cold(res: Results) -> list[float]:
    pairs = zip(res.cold.get("ours", []), res.cold.get("bare", []), strict=False)
    return [o / b for o, b in pairs]


def default_model() -> Path:
    """tests/realmodel.py's Gemma GGUF, assembled once per machine from the dev extra."""
    sys.path.insert(0, str(REPO / "tests"))
    realmodel = importlib.import_module("realmodel")
    return Path(realmodel.gemma_gguf())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="rounds")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--clients", default="1,4,8,16", help="comma-separated client counts")
    parser.add_argument(
        "--requests", type=int, default=3, help="requests in a row of the 1-client round"
    )
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads, every side")
    parser.add_argument("--model", type=Path, help="a GGUF (default: Gemma 3 270M Q4_K_M)")
    parser.add_argument("--out", type=Path, help="update the bench_serve section of this file")
    args = parser.parse_args()
    args.clients = sorted({int(c) for c in args.clients.split(",")})
    args.parallel = max(args.clients)
    args.context = max(512, math.ceil((args.tokens + 64) / 256) * 256)

    def interrupted(signum: int, _frame: object) -> None:  # unwind: servers are stopped
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    t0 = time.monotonic()
    meta = {
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_before": load_average(),
    }
    print(f"load average before: {meta['load_before']}", flush=True)
    model = (args.model or default_model()).resolve()
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    host, key = setup_host(model, args.context, args.threads)
    engine = prepare_engine(host / "current", args.parallel)
    meta["versions"] = versions(engine)
    print(f"host set up in {time.monotonic() - t0:.0f} s; {meta['versions']}", flush=True)

    res = Results()
    if (why := llama_cpp_server_missing()) is not None:
        res.skipped["llama_cpp"] = why
    sides = [s for s in SIDES if s not in res.skipped]
    streams_per_round = sum(args.requests if c == 1 else c for c in args.clients)
    if streams_per_round + 1 > len(WORDS):
        parser.error(f"at most {len(WORDS) - 1} streams per round ({streams_per_round} asked)")
    for r in range(args.repeat):
        order = sides if r % 2 == 0 else sides[::-1]
        running: dict[str, Server] = {}
        warm_prompt = PROMPT.format(word=WORDS[-1], tag=f"r{r:02d}c00s00")
        try:
            if r % 2 == 1:  # the limit runs first or last, alternately, with no server up
                run_batched(args, res, engine)
            for side in order:
                server = start_side(
                    side,
                    host=host,
                    engine=engine,
                    key=key,
                    parallel=args.parallel,
                    threads=args.threads,
                    context=args.context,
                )
                running[side] = server
                res.cold.setdefault(side, []).append(server.cold_start_s)
                warm = run_round(
                    server.url, key, clients=1, requests=1, tokens=4, prompts=[warm_prompt]
                )
                if not res.prompt_tokens:
                    res.prompt_tokens = warm.streams[0].prompt_tokens
                print(f"round {r} {side:9} ready in {server.cold_start_s:.2f} s", flush=True)
            used = 0
            for clients in args.clients:
                count = args.requests if clients == 1 else clients
                prompts = [
                    PROMPT.format(word=WORDS[used + i], tag=f"r{r:02d}c{clients:02d}s{i:02d}")
                    for i in range(count)
                ]
                used += count
                for side in order:
                    rnd = run_round(
                        running[side].url,
                        key,
                        clients=clients,
                        requests=args.requests,
                        tokens=args.tokens,
                        prompts=prompts,
                    )
                    res.rounds.setdefault((side, clients), []).append(rnd)
                    print(
                        f"round {r} {side:9} clients={clients:2}: {rnd.rate:6.1f} tok/s, TTFT "
                        f"p50 {ttft_p50(rnd) * 1000:.0f} ms, {time.monotonic() - t0:.0f} s",
                        flush=True,
                    )
                    if clients == args.parallel:
                        res.memory.setdefault(side, []).append(
                            memory_kib(running[side].process.pid)
                        )
        finally:
            for server in running.values():
                stop(server)
        if r % 2 == 0:
            run_batched(args, res, engine)
    meta["load_after"] = load_average()
    meta["elapsed"] = f"{(time.monotonic() - t0) / 60:.1f} min"
    section = report(args, res, engine, meta)
    print(section)
    (WORK / "results.json").write_text(
        json.dumps(
            {
                "rounds": {
                    f"{k[0]}/{k[1]}": [
                        {"wall_s": x.wall_s, "streams": [asdict(s) for s in x.streams]} for x in v
                    ]
                    for k, v in res.rounds.items()
                },
                "cold_start_s": res.cold,
                "memory_kib": res.memory,
                "batched_bench": res.batched,
                "skipped": res.skipped,
            },
            indent=1,
        )
    )
    if args.out:
        write_section(args.out, section, begin=BEGIN, end=END, notes=NOTES, heading=HEADING)
        print(f"wrote the bench_serve section of {args.out}")


def run_batched(args: argparse.Namespace, res: Results, engine: Engine) -> None:
    if not (engine.folder / "llama-batched-bench").is_file():
        return
    rows = batched_bench(
        engine,
        prompt_tokens=res.prompt_tokens or 12,
        tokens=args.tokens,
        clients=args.clients,
        threads=args.threads,
        ctx=args.context * args.parallel,
    )
    res.batched.append(rows)
    print(
        "llama-batched-bench: "
        + ", ".join(f"{n}: {float(v['speed_tg']):.1f} tok/s decode" for n, v in rows.items()),
        flush=True,
    )


if __name__ == "__main__":
    main()
