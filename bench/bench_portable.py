"""Tokens/s of the portable llama.cpp runtime against a native build, on this CPU, same model.

DESIGN.md's target: a portable runtime build (runtime CPU dispatch, builder.llamabuild) keeps
at least 0.95x the tokens/s of a native build (``GGML_NATIVE``, what llama.cpp builds by
default) on the builder. Two interpreters are compared, each with its own llama-cpp-python:

- ``--native-python``: a native build (the project's ``.venv``, compiled by pip at set-up);
- ``--portable-python``: the builder's dispatch build (the slot environment of an installed
  bundle, or a venv with the wheel from the build cache: ``python tests/portable_build.py``).

The portable side's CPU variant is chosen once, the way the host chooses it
(appliance.runtime.cpuvariant.choose: ranked by ggml's score, the best one that runs the model)
and then loaded by every measuring child; ``--variant`` adds other variants to measure too.

Each measurement is a fresh child process pinned to ``--cpus`` (sched_setaffinity) with
``n_threads`` = their number: it loads the model, generates 8 tokens to warm up, then times
``--tokens`` greedy decode steps (EOS ignored, prompt evaluation not counted). Sides run
interleaved, in an order that alternates between rounds, ``--rounds`` rounds. Reported per
model: each side's median tokens/s with its spread (max-min over median: the machine's noise),
and the ratio portable/native per round (paired), median and range. A side that crashes (the
native build on a model that reaches kernels this machine cannot execute) is reported as such.

    .venv/bin/python bench/bench_portable.py --native-python .venv/bin/python \\
        --portable-python /tmp/portable-venv/bin/python --model bench/out/tiny.gguf \\
        --model ~/.cache/airgap-appliance/models/...-gemma-3-270m-q4_k_m.gguf --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"
MEASURE = """
import json, os, sys, time
from pathlib import Path
cpus, variant, model, tokens = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
os.sched_setaffinity(0, cpus)
if variant != "-":
    from appliance.runtime import cpuvariant
    cpuvariant.load_backends([cpuvariant.find_runtime().variants[variant]])
import llama_cpp
llm = llama_cpp.Llama(model_path=model, n_ctx=512, n_threads=len(cpus),
                      n_threads_batch=len(cpus), n_gpu_layers=0, verbose=False)
prompt = llm.tokenize(PROMPT.encode())
def decode(n):
    llm.reset()
    stream = llm.generate(prompt, temp=0.0)
    next(stream)  # the prompt's evaluation and the first token: not timed
    start = time.perf_counter()
    for _ in range(n):
        next(stream)
    return time.perf_counter() - start
decode(8)
print(json.dumps({"tokens_per_s": tokens / decode(tokens)}))
""".replace("PROMPT", repr(PROMPT))
CHOOSE = """
import sys
from pathlib import Path
from appliance.runtime import cpuvariant
choice = cpuvariant.choose(cpuvariant.find_runtime(), model_path=Path(sys.argv[1]), memory=None)
print(choice.variant)
print(choice.describe(), file=sys.stderr)
"""


def measure(python: str, variant: str, model: Path, cpus: list[int], tokens: int) -> float | str:
    """Tokens/s of one child, or how it died."""
    command = [python, "-c", MEASURE, json.dumps(cpus), variant, str(model), str(tokens)]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode < 0:
        return f"crashed ({signal.Signals(-result.returncode).name})"
    if result.returncode != 0:
        return f"failed (exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]})"
    return float(json.loads(result.stdout.splitlines()[-1])["tokens_per_s"])


def choose(python: str, model: Path) -> str:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [python, "-c", CHOOSE, str(model)], capture_output=True, text=True, env=env, check=True
    )
    sys.stderr.write(f"{model.name}: {result.stderr.strip().splitlines()[-1]}\n")
    return result.stdout.strip()


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--native-python", required=True)
    parser.add_argument("--portable-python", required=True)
    parser.add_argument("--model", type=Path, action="append", required=True)
    parser.add_argument("--variant", action="append", default=[], help="also measure these")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--cpus", default="0", help="comma-separated CPU numbers to pin to")
    args = parser.parse_args()
    cpus = [int(c) for c in args.cpus.split(",")]
    report = []
    for model in args.model:
        chosen = choose(args.portable_python, model)
        sides = {
            "native": (args.native_python, "-"),
            f"portable ({chosen})": (args.portable_python, chosen),
        }
        for extra in args.variant:
            if extra != chosen:
                sides[f"portable ({extra})"] = (args.portable_python, extra)
        runs: dict[str, list[float | str]] = {name: [] for name in sides}
        for round_ in range(args.rounds):
            order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
            for name in order:
                python, variant = sides[name]
                runs[name].append(measure(python, variant, model, cpus, args.tokens))
        report.append({"model": model.name, "chosen": chosen, "runs": runs})
        sys.stderr.write(json.dumps(report[-1]) + "\n")
    for entry in report:
        print(f"\n{entry['model']} (portable variant chosen by execution: {entry['chosen']})")
        runs = entry["runs"]
        native = [v for v in runs["native"] if isinstance(v, float)]
        for name, values in runs.items():
            numbers = [v for v in values if isinstance(v, float)]
            if len(numbers) != len(values):
                print(f"  {name:28s} {next(v for v in values if isinstance(v, str))}")
                continue
            median = statistics.median(numbers)
            line = f"  {name:28s} {median:8.1f} tok/s  spread {spread(numbers):5.1%}"
            if name != "native" and len(native) == len(numbers):
                ratios = [p / n for p, n in zip(numbers, native, strict=True)]
                line += (
                    f"  ratio {statistics.median(ratios):.3f} "
                    f"(rounds {min(ratios):.3f}..{max(ratios):.3f})"
                )
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
