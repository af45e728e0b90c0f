"""Benchmark concurrent generation in-process: one Llama + a lock, the pool, continuous batching.

The model is the ~85M-parameter random llama of ``appliance-builder tiny-model --embedding 768
--layers 12 --feed-forward 2048``, written to bench/out/ on first use, with one change (see
``write_model``): it never samples its special tokens or bytes outside printable ASCII. A random
byte model otherwise writes text that is not UTF-8 half the time, and llama-cpp-python holds
back text until it decodes, so its first chunk would come only at the end of the generation;
it would also end streams early at random with its end-of-sequence token. Now every token is
one character for every engine, and every stream runs to max_tokens.

Every engine runs the same requests: 1 stream, then N concurrent streams, each ``--tokens``
tokens at temperature 0.7 with a fixed seed per stream. One engine is loaded at a time.

- ``lock``: one llama_cpp.Llama, one lock held for a whole streamed completion: what
  llama-cpp-python's own server does.
- ``pool``: appliance.runtime.llamacpp.LlamaCppBackend, ``parallel`` contexts on threads.
- ``batched``: appliance.runtime.llamacpp_batch.BatchedLlamaCppBackend, one context, one
  llama_decode per step for every stream.

Time to first token (TTFT) is from the generate() call to the first chunk (queueing included).
Tokens/s is completion tokens over the wall time of the whole round.

    .venv/bin/python bench/bench_batching.py --repeat 2
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.runtime.base import Generation, GenerationChunk, RuntimeSettings, SamplingParams
from appliance.runtime.llamacpp import LlamaCppBackend
from appliance.runtime.llamacpp_batch import BatchedLlamaCppBackend
from builder.tinymodel import write_tiny_llama

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "bench" / "out" / "bench-85m.gguf"
SHAPE = {"n_embd": 768, "n_layer": 12, "n_ff": 2048, "n_head": 4, "context": 2048, "seed": 0}
CONTEXT = 512  # per sequence: the prompts and 64 tokens fit, and 8 KV caches stay small
_SPECIAL_TOKENS = 3  # <unk>, <s>, </s>; then one token per byte


def write_model(path: Path) -> None:
    """The benchmark model: random, except that it writes printable ASCII only.

    Embedding dimension 0 is 1.0 for every token, so the final hidden state has a large
    positive component 0 (the other components are random and small). The output rows of the
    tokens to avoid get -4.0 in column 0: their logits sit far below the others.
    """
    import gguf

    partial = path.with_suffix(".partial")
    write_tiny_llama(partial, **SHAPE)
    reader = gguf.GGUFReader(partial, "r+")
    tensors = {tensor.name: tensor.data for tensor in reader.tensors}
    tensors["token_embd.weight"][:, 0] = 1.0
    output = tensors["output.weight"]
    for token in range(output.shape[0]):
        byte = token - _SPECIAL_TOKENS
        if not (0x20 <= byte < 0x7F or byte == 0x0A):
            output[token, 0] = -4.0
    del reader, tensors, output  # flushes the memory map
    partial.replace(path)


class LockedLlama:
    """One Llama behind one lock held for a whole completion, as llama-cpp-python's server."""

    def __init__(self, settings: RuntimeSettings) -> None:
        import llama_cpp

        threads = settings.threads or os.cpu_count() or 1
        self._llama = llama_cpp.Llama(
            model_path=str(settings.model_path),
            n_ctx=settings.context_size or CONTEXT,
            n_gpu_layers=settings.gpu_layers or 0,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self._lock = threading.Lock()

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        generation = Generation(prompt_tokens=0, chunks=iter(()))
        generation.chunks = self._stream(prompt, params)
        return generation

    def _stream(self, prompt: str, params: SamplingParams) -> Iterator[GenerationChunk]:
        with self._lock:
            count = 0
            stream: Any = self._llama.create_completion(
                prompt,
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                seed=params.seed,
                stream=True,
            )
            for part in stream:
                choice = part["choices"][0]
                count += bool(choice["text"])
                if choice["text"] or choice.get("finish_reason"):
                    yield GenerationChunk(choice["text"], choice.get("finish_reason"), count)

    def close(self) -> None:
        self._llama.close()


@dataclass
class Round:
    wall_s: float
    tokens: int
    ttft_s: list[float] = field(default_factory=list)
    early: int = 0  # streams that ended before max_tokens


def one_stream(engine: Any, prompt: str, params: SamplingParams) -> tuple[float, int, bool]:
    """TTFT, completion tokens, and whether it ended early."""
    started = time.perf_counter()
    first: float | None = None
    last: GenerationChunk | None = None
    for chunk in engine.generate(prompt, params).chunks:
        if first is None:
            first = time.perf_counter() - started
        last = chunk
    assert last is not None and first is not None
    if last.finish_reason == "length":
        return first, params.max_tokens or 0, False
    return first, last.completion_tokens, True


def run_round(engine: Any, streams: int, tokens: int, label: str) -> Round:
    results: list[tuple[float, int, bool] | None] = [None] * streams

    def work(i: int) -> None:
        params = SamplingParams(max_tokens=tokens, temperature=0.7, seed=1000 + i)
        # A prompt never seen before: llama-cpp-python reuses the KV cache of a Llama's last
        # prompt when the new one starts the same way.
        prompt = f"{label}.{i}: tell me about the weather."
        results[i] = one_stream(engine, prompt, params)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    done = [r for r in results if r is not None]
    assert len(done) == streams, "a stream failed"
    return Round(
        wall_s=wall,
        tokens=sum(r[1] for r in done),
        ttft_s=[r[0] for r in done],
        early=sum(r[2] for r in done),
    )


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: with few samples, p99 is the slowest one."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def engines(threads: int | None) -> list[tuple[str, Callable[[], Any]]]:
    def settings(parallel: int) -> RuntimeSettings:
        return RuntimeSettings(
            backend="llama.cpp",
            model_path=MODEL,
            model_id="bench-85m",
            context_size=CONTEXT,
            gpu_layers=0,
            threads=threads,
            parallel=parallel,
        )

    return [
        ("lock: one Llama + lock (llama-cpp-python server)", lambda: LockedLlama(settings(1))),
        ("pool: LlamaCppBackend parallel=2", lambda: LlamaCppBackend(settings(2))),
        ("pool: LlamaCppBackend parallel=8", lambda: LlamaCppBackend(settings(8))),
        ("batched: BatchedLlamaCppBackend parallel=8", lambda: BatchedLlamaCppBackend(settings(8))),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,8", help="comma-separated concurrent streams")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of every stream")
    parser.add_argument("--repeat", type=int, default=2, help="rounds per engine and streams")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    parser.add_argument("--only", default="", help="engines whose name contains this")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    if not MODEL.exists():
        MODEL.parent.mkdir(parents=True, exist_ok=True)
        write_model(MODEL)
    rows: list[str] = []
    for name, make in engines(args.threads):
        if args.only not in name:
            continue
        engine = make()
        try:
            run_round(engine, 1, 4, "warm-up")  # page in the weights, allocate buffers
            for count in streams:
                rounds = [
                    run_round(engine, count, args.tokens, f"{count}.{r}")
                    for r in range(args.repeat)
                ]
                ttft = [t for r in rounds for t in r.ttft_s]
                rates = [r.tokens / r.wall_s for r in rounds]
                rows.append(
                    f"| {name} | {count} | {statistics.median(rates):.1f} | {max(rates):.1f} "
                    f"| {percentile(ttft, 50) * 1000:.0f} | {percentile(ttft, 99) * 1000:.0f} "
                    f"| {sum(r.early for r in rounds)}/{count * args.repeat} |"
                )
                print(rows[-1], flush=True)
        finally:
            close: Callable[[], None] = engine.close
            close()
    header = [
        f"model: {MODEL.name} ({MODEL.stat().st_size / 1e6:.0f} MB, F32, ~85M parameters), "
        f"{args.tokens} tokens per stream, temperature 0.7, {args.repeat} rounds, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"threads={args.threads or 'auto'}",
        "",
        "| engine | streams | tokens/s (median) | tokens/s (best) | TTFT p50 ms | TTFT p99 ms "
        "| ended early |",
        "|---|---|---|---|---|---|---|",
    ]
    table = "\n".join([*header, *rows])
    print()
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
