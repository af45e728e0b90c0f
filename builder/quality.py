"""The quality of a quantisation: the KL-divergence of the quantised model's next-token
distribution from the F16 model's, on a short fixed text (docs/adr/0013-model-pipeline.md).

Both models evaluate :data:`KL_TEXT` with every position's logits (``logits_all``); the figure
is the mean over positions of KL(P_f16 || P_quant), in nats, recorded in the manifest as an
integer of nanonats (signed JSON has no floats).

It runs in a child process (``python -m builder.quality kl F16 QUANT``), as does the
quantisation (``quantize``), for two reasons: llama.cpp writes its log to the process's own
stderr, and its kernels may crash. A runtime built for runtime CPU dispatch gets its CPU
variant chosen by running it first (appliance.runtime.cpuvariant), as on a host. A native build
on a CPU that advertises what it cannot execute (AMX on some VMs) dies on the quantised
kernels: that is a ModelError naming the signal, and ``--eval-python`` (or
``AIRGAP_APPLIANCE_EVAL_PYTHON``) names an interpreter with a runtime that works, such as the
bundle's own portable build.

This module imports only the standard library at the top: the child runs in whichever
interpreter has llama-cpp-python, with our packages on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

KL_TEXT: Final = (
    "An air gap keeps a machine apart from every network. Models cross it in signed bundles, "
    "and the appliance verifies every byte before it installs them. The quick brown fox jumps "
    "over the lazy dog."
)
EVAL_PYTHON_ENV: Final = "AIRGAP_APPLIANCE_EVAL_PYTHON"
KL_TIMEOUT_S: Final = 1800
_NANO: Final = 1_000_000_000


@dataclass(frozen=True)
class KlResult:
    nanonats: int
    tokens: int

    @property
    def nats(self) -> float:
        return self.nanonats / _NANO


def measure_kl(reference: Path, quantised: Path, *, python: Path | None = None) -> KlResult:
    """The mean KL-divergence of ``quantised`` from ``reference`` over :data:`KL_TEXT`,
    measured in a child of ``python`` (else ``$AIRGAP_APPLIANCE_EVAL_PYTHON``, else this
    interpreter)."""
    from signing.bounded import one_line  # noqa: PLC0415 - the parent side only
    from signing.errors import ModelError  # noqa: PLC0415

    interpreter = str(python or os.environ.get(EVAL_PYTHON_ENV) or sys.executable)
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    argv = [interpreter, "-m", "builder.quality", "kl", str(reference), str(quantised)]
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=KL_TIMEOUT_S, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        raise ModelError(f"measuring the KL-divergence: no result after {KL_TIMEOUT_S} s") from None
    except OSError as exc:
        raise ModelError(f"measuring the KL-divergence: cannot run {interpreter}: {exc}") from None
    if result.returncode < 0:
        name = signal.Signals(-result.returncode).name
        raise ModelError(
            f"measuring the KL-divergence: the llama.cpp runtime of {interpreter} died with "
            f"{name} on the quantised model; give --eval-python an interpreter whose "
            f"llama-cpp-python runs on this CPU (a portable build, docs/adr/0013)"
        )
    lines = result.stdout.strip().splitlines()
    if result.returncode == 0 and lines:
        try:
            figures = json.loads(lines[-1])
            return KlResult(nanonats=int(figures["nanonats"]), tokens=int(figures["tokens"]))
        except (ValueError, KeyError, TypeError):
            pass
    last = [line for line in result.stderr.splitlines() if line.strip()][-1:] or ["no output"]
    raise ModelError(f"measuring the KL-divergence failed: {one_line(last[0])}")


def _logits(path: str, text: str) -> tuple[list[int], object]:
    import llama_cpp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    llm = llama_cpp.Llama(
        model_path=path, n_ctx=512, logits_all=True, n_gpu_layers=0, verbose=False, seed=0
    )
    tokens = llm.tokenize(text.encode())
    llm.eval(tokens)
    scores = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    llm.close()
    return tokens, scores


def kl_main(reference: str, quantised: str) -> dict[str, int]:
    """The child's side: both models' logits, then the mean KL (module docstring)."""
    import numpy as np  # noqa: PLC0415

    from appliance.runtime import cpuvariant  # noqa: PLC0415

    # One CPU variant for the process (ggml keeps the first it loads): the one that runs the
    # quantised model, whose kernels are the ones that may not run here.
    cpuvariant.prepare(model_path=Path(quantised), memory=None)
    tokens, p_logits = _logits(reference, KL_TEXT)
    again, q_logits = _logits(quantised, KL_TEXT)
    if tokens != again:
        raise SystemExit("the two models tokenise the text differently")

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(axis=-1, keepdims=True)
        out: np.ndarray = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
        return out

    log_p, log_q = log_softmax(p_logits), log_softmax(q_logits)  # type: ignore[arg-type]
    per_position = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    mean = max(float(per_position.mean()), 0.0)  # rounding may give -1e-12
    return {"nanonats": round(mean * _NANO), "tokens": len(tokens)}


def quantize_main(source: str, dest: str, ftype: int) -> None:
    """The child's side of the quantisation: llama_cpp.llama_model_quantize."""
    import ctypes  # noqa: PLC0415

    import llama_cpp  # noqa: PLC0415

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(source.encode(), dest.encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize refused {source}")


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["kl"] and len(argv) == 3:
        sys.stdout.write(json.dumps(kl_main(argv[1], argv[2])) + "\n")
        return 0
    if argv[:1] == ["quantize"] and len(argv) == 4:
        quantize_main(argv[1], argv[2], int(argv[3]))
        return 0
    sys.stderr.write("usage: python -m builder.quality kl F16 QUANT | quantize SRC DEST FTYPE\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
