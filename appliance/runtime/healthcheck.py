"""``python -m appliance.runtime.healthcheck SLOT``: load a slot's model, generate, exit 0.

Run by the installer in a child process (see appliance.runtime.loader.health_check). Prints
the generated text on success; one line on stderr and a non-zero status on failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

from appliance.runtime.base import SamplingParams
from appliance.runtime.loader import load_backend, slot_runtime_settings
from signing.errors import AirgapError

PROMPT = "Hello"
TOKENS = 4


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m appliance.runtime.healthcheck SLOT\n")
        return 2
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
