"""A PEFT LoRA adapter folder to a GGUF LoRA adapter, on the builder (issue 11, item 4).

llama.cpp's ``convert_lora_to_gguf.py`` does the conversion, from the same llama-cpp-python
sdist and in the same venv as the model pipeline's ``convert_hf_to_gguf.py`` (builder/convert.py:
pinned by sha256, fetched through the content-addressed cache, the venv kept in the builder's
cache). The script imports the ``conversion`` package and ``gguf-py`` beside it; the model
pipeline's converter folder holds both, so only the script itself is taken from the sdist here,
into a folder of its own in the cache, keyed by the sdist's sha256.

1. Check the adapter folder: ``adapter_config.json`` (a LoRA: ``lora_alpha`` and ``r``) and
   ``adapter_model.safetensors``. A pickled ``adapter_model.bin`` is refused: the builder does
   not unpickle what it is handed.
2. Check the base: a Hugging Face folder with ``config.json`` (the script reads only the
   config, never the base weights). The hub is never asked (``HF_HUB_OFFLINE``).
3. Run the script into a temporary file beside the output, then check what it wrote: a GGUF
   whose ``general.type`` is ``adapter`` and ``adapter.type`` is ``lora``, with tensors; rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from builder.cache import Cache, default_cache_root, sha256_file
from builder.convert import (
    _VENDOR,
    CONVERT_TIMEOUT_S,
    CONVERTER_SDIST,
    _run,
    prepare_converter,
)
from builder.fetch import fetch_all
from signing.errors import InputError, ModelError

Say = Callable[[str], None]

LORA_SCRIPT: Final = "convert_lora_to_gguf.py"
OUT_TYPES: Final = ("f32", "f16", "bf16", "q8_0")
ADAPTER_CONFIG: Final = "adapter_config.json"
ADAPTER_WEIGHTS: Final = "adapter_model.safetensors"
MAX_CONFIG_BYTES: Final = 1 << 20


@dataclass(frozen=True)
class ConvertedAdapter:
    """A GGUF LoRA adapter: its path, sha256, alpha and how many tensors it holds."""

    path: Path
    sha256: str
    lora_alpha: float
    tensors: int


def lora_script(*, cache: Cache | None = None) -> Path:
    """``convert_lora_to_gguf.py`` from :data:`CONVERTER_SDIST`, extracted once into the
    builder's cache (a temporary name, renamed in: never half a script)."""
    home = default_cache_root() / "converter-lora" / CONVERTER_SDIST.sha256[:32]
    script = home / LORA_SCRIPT
    if script.is_file():
        return script
    store = cache if cache is not None else Cache()
    sdist = fetch_all([CONVERTER_SDIST], store, jobs=1, progress=False)[CONVERTER_SDIST.sha256]
    member = f"{CONVERTER_SDIST.filename.removesuffix('.tar.gz')}/{_VENDOR}/{LORA_SCRIPT}"
    home.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist, "r:gz") as tar:
        try:
            info = tar.getmember(member)
        except KeyError:
            raise InputError(f"{sdist.name} holds no {_VENDOR}/{LORA_SCRIPT}") from None
        source = tar.extractfile(info) if info.isfile() else None
        if source is None:
            raise InputError(f"{sdist.name}: {member} is not a plain file")
        fd, partial = tempfile.mkstemp(prefix=f".{LORA_SCRIPT}.", dir=home)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(source.read())
            Path(partial).replace(script)
        finally:
            with contextlib.suppress(FileNotFoundError):
                Path(partial).unlink()
    return script


def convert_lora(
    adapter: Path,
    *,
    base: Path,
    out: Path,
    outtype: str = "f16",
    say: Say = lambda _: None,
) -> ConvertedAdapter:
    """The PEFT adapter folder ``adapter`` for the Hugging Face model folder ``base`` as a GGUF
    LoRA adapter at ``out`` (a new file; module docstring)."""
    if outtype not in OUT_TYPES:
        raise InputError(f"unknown adapter type {outtype!r}; one of {list(OUT_TYPES)}")
    alpha = _check_adapter(adapter)
    if not (base / "config.json").is_file():
        raise InputError(f"base model {base}: no config.json (a Hugging Face model folder)")
    if out.exists():
        raise InputError(f"{out} exists; the adapter is written to a new file")
    converter = prepare_converter(say=say)
    script = lora_script()
    partial = out.with_name(f".{out.name}.{os.getpid()}.part")
    say(f"converting the LoRA adapter {adapter} to GGUF {outtype} with {LORA_SCRIPT}")
    try:
        _run(
            [
                str(converter.python),
                str(script),
                "--base",
                str(base),
                "--outfile",
                str(partial),
                "--outtype",
                outtype,
                str(adapter),
            ],
            what=f"converting the LoRA adapter {adapter}",
            timeout=CONVERT_TIMEOUT_S,
            env={
                # The script imports ``conversion`` from its own folder in the source tree.
                "PYTHONPATH": os.pathsep.join(
                    [str(converter.source), str(converter.source / "gguf-py")]
                ),
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
            },
        )
        tensors = _check_output(partial)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return ConvertedAdapter(out, sha256_file(out), alpha, tensors)


def _check_adapter(adapter: Path) -> float:
    config_path = adapter / ADAPTER_CONFIG
    if not config_path.is_file():
        raise InputError(f"adapter {adapter}: no {ADAPTER_CONFIG} (a PEFT adapter folder)")
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        pickled = (adapter / "adapter_model.bin").is_file()
        raise InputError(
            f"adapter {adapter}: no {ADAPTER_WEIGHTS}"
            + (
                "; adapter_model.bin is a pickle, which the builder does not load"
                if pickled
                else ""
            )
        )
    raw = config_path.read_bytes()
    if len(raw) > MAX_CONFIG_BYTES:
        raise InputError(f"adapter {adapter}: {ADAPTER_CONFIG} is {len(raw)} bytes")
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"adapter {adapter}: {ADAPTER_CONFIG} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InputError(f"adapter {adapter}: {ADAPTER_CONFIG} is not an object")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise InputError(f"adapter {adapter}: peft_type {kind!r}; only LORA converts to GGUF")
    alpha, rank = config.get("lora_alpha"), config.get("r")
    numbers = (int, float)
    if not isinstance(alpha, numbers) or isinstance(alpha, bool) or alpha <= 0:
        raise InputError(f"adapter {adapter}: lora_alpha {alpha!r} is not a positive number")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InputError(f"adapter {adapter}: r {rank!r} is not a positive integer")
    return float(alpha)


def _check_output(path: Path) -> int:
    """What the script wrote is a GGUF LoRA adapter with tensors; their count."""
    try:
        import gguf  # noqa: PLC0415  # the builder extra
    except ImportError:
        raise InputError("converting an adapter needs the 'builder' extra (gguf)") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{LORA_SCRIPT} wrote no readable GGUF: {exc}") from None

    def text(key: str) -> str | None:
        field = reader.fields.get(key)
        if field is None or not field.data:
            return None
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")

    if text("general.type") != "adapter" or text("adapter.type") != "lora":
        raise ModelError(f"{LORA_SCRIPT} wrote a GGUF that is not a LoRA adapter")
    count = len(reader.tensors)
    if count == 0:
        raise ModelError(f"{LORA_SCRIPT} wrote an adapter with no tensors")
    return count
