"""``python -m appliance.runtime.healthcheck SLOT``: load a slot's model, generate, exit 0.

Run by the installer in a child process (see appliance.runtime.loader.health_check). Prints
the generated text on success; one line on stderr and a non-zero status on failure. The
runtime's log goes to stderr too, where the installer logs it: the CPU variant chosen, and for
llama.cpp one ``memory: ...`` line (appliance.runtime.memreport: what llama.cpp allocated, from
its engine's startup log, beside the signed estimate).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import time
from pathlib import Path

from appliance.runtime.base import SamplingParams
from appliance.runtime.loader import PARENT_ENV, load_backend, slot_runtime_settings
from signing.errors import AirgapError

PROMPT = "Hello"
TOKENS = 4


_PR_SET_PDEATHSIG = 1


def _die_with_the_installer() -> None:
    """Ask Linux to SIGKILL this child when the installer dies, however it dies (kill -9
    included): a health check must never outlive the install it belongs to. An installer that
    is stopped by SIGTERM or Ctrl-C kills this child itself (subprocess.run)."""
    # The installer's pid, from the installer itself: one that died while this interpreter was
    # still starting has left us to init already, and getppid() alone would not tell.
    parent = int(os.environ.get(PARENT_ENV, "0")) or os.getppid()
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the installer died before the request took effect
        os._exit(1)


def main(argv: list[str]) -> int:
    _die_with_the_installer()
    if os.environ.get("APPLIANCE_FAULT_INJECT") == "hang:health-check":  # docs/adr/0004
        time.sleep(3600)
    if len(argv) != 1:
        sys.stderr.write("usage: python -m appliance.runtime.healthcheck SLOT\n")
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    runtime_log = logging.getLogger("appliance.runtime")
    runtime_log.addHandler(handler)
    runtime_log.setLevel(logging.INFO)
    try:
        backend = load_backend(slot_runtime_settings(Path(argv[0]), parallel=1))
        try:
            generation = backend.generate(
                PROMPT, SamplingParams(max_tokens=TOKENS, temperature=0.0, seed=0)
            )
            text = "".join(chunk.text for chunk in generation.chunks)
        finally:
            backend.close()
    except AirgapError as exc:
        sys.stderr.write(exc.diagnostics() + "\n")
        return 1
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
