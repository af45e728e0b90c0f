"""``python -m appliance.runtime.evalrun SLOT SET MAX_TOKENS THREADS``: answer an evaluation set.

Run by the evaluation gate (appliance.evalgate) in a child process, once for the new slot and
once for the active one, exactly as the health check is run (appliance.runtime.loader): under
the slot environment's interpreter, dying with the installer, bounded by a timeout. Every item
is answered greedily (temperature 0, seed 0, no penalties: the same sampler for both slots),
one sequence at a time, with ``THREADS`` threads when it is not 0 (else the slot's own
setting). One JSON line per item on stdout: ``{"id", "answer", "ms"}`` (``"error"`` instead of
an answer for an item the model refused, such as one too long for its context). A model that
does not load: one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

from appliance.evalset import parse_eval_set
from appliance.runtime.base import ChatMessage, SamplingParams
from appliance.runtime.healthcheck import _die_with_the_installer
from appliance.runtime.loader import load_backend, slot_runtime_settings
from signing.bounded import one_line
from signing.errors import AirgapError, InputError


def main(argv: list[str]) -> int:
    _die_with_the_installer()  # the health check child's own guard
    if len(argv) != 4:
        sys.stderr.write("usage: python -m appliance.runtime.evalrun SLOT SET MAX_TOKENS THREADS\n")
        return 2
    slot, set_path, max_tokens, threads = Path(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3])
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("appliance.runtime").addHandler(handler)
    items, problems = parse_eval_set(set_path.read_bytes())
    if problems:
        sys.stderr.write(f"evaluation set: {problems[0]}\n")
        return 1
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=0)
    try:
        settings = slot_runtime_settings(slot, parallel=1)
        if threads:
            settings = replace(settings, threads=threads)
        backend = load_backend(settings)
        try:
            for item in items:
                result: dict[str, object] = {"id": item.id}
                started = time.perf_counter()
                try:
                    prompt = item.prompt
                    if prompt is None:
                        chat = [ChatMessage(role, content) for role, content in item.messages]
                        prompt = backend.format_chat(chat)
                    generation = backend.generate(prompt, params)
                    result["answer"] = "".join(chunk.text for chunk in generation.chunks)
                except InputError as exc:
                    result["error"] = one_line(exc.diagnostics())
                result["ms"] = round((time.perf_counter() - started) * 1000, 3)
                sys.stdout.write(json.dumps(result) + "\n")
                sys.stdout.flush()
        finally:
            backend.close()
    except AirgapError as exc:
        sys.stderr.write(exc.diagnostics() + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
