"""The model pipeline: a Hugging Face checkpoint to a quantised GGUF, with its provenance
(docs/adr/0013-model-pipeline.md; the recipe's ``[model] quantize``).

1. The converter: llama.cpp's ``convert_hf_to_gguf.py`` with its ``conversion`` package and
   ``gguf-py``, as llama-cpp-python's sdist ships them (``vendor/llama.cpp``). The sdist is
   pinned here by sha256 (the same file the demo's lock pins) and fetched through the
   content-addressed cache, which checks the hash before anything reads it.
2. Its environment: the converter's own pins (transformers, torch, numpy) clash with the
   builder's, so it runs in a venv the builder makes with ``python -m venv`` and
   :data:`CONVERTER_REQUIREMENTS` (the whole closure, installed ``--no-deps``), kept in the
   builder's cache under a key of the sdist's sha256, the requirements and the builder's
   Python: a second build reuses it. It is made beside its final place and renamed into it,
   so a crash leaves no half venv that looks whole.
3. Convert to F16 (``--outtype f16``), the reference; F32 and BF16 are converted directly.
4. Quantise with ``llama_cpp.llama_model_quantize`` in a child of the builder's own
   interpreter (llama.cpp writes its log to the process's stderr, and a crash must not take the
   build with it).
5. The quality: builder.quality measures the KL-divergence of the quantised model's next-token
   distribution from the F16 one's, in a child process (a runtime that crashes on the
   quantised kernels, as a native build does where the CPU advertises AMX the VM forbids, is a
   refusal, never a guess).
6. Provenance (:class:`~signing.manifest.ModelPipeline`): converter name, version and sdist
   sha256, the quantisation type, the sha256 of every input file and of the output, the KL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from builder.artifacts import Artifact
from builder.cache import Cache, default_cache_root, sha256_file
from builder.fetch import fetch_all
from builder.quality import measure_kl
from signing.bounded import one_line
from signing.errors import InputError, ModelError
from signing.manifest import ModelPipeline

Say = Callable[[str], None]

# llama-cpp-python's sdist: the converter's source (lockfiles/pylock.llamacpp-cpu.toml pins the
# same file; tests/test_model_pipeline.py keeps the two equal).
CONVERTER_SDIST: Final = Artifact(
    name="llama-cpp-python",
    version="0.3.36",
    filename="llama_cpp_python-0.3.36.tar.gz",
    url=(
        "https://files.pythonhosted.org/packages/ec/e9/"
        "e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
        "llama_cpp_python-0.3.36.tar.gz"
    ),
    sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
)
_VENDOR: Final = "vendor/llama.cpp"
_CONVERTER_FILES: Final = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")
# The converter's closure, installed with --no-deps: what convert_hf_to_gguf.py imports for a
# llama checkpoint (torch at the top; sentencepiece, then transformers' AutoTokenizer for the
# vocabulary; gguf-py's numpy, yaml and tqdm). torch is the CPU build: the builder's pip
# configuration must offer it (a find-links directory, or the index
# https://download.pytorch.org/whl/cpu), else PyPI's CUDA wheel is gigabytes (ADR 0013).
CONVERTER_REQUIREMENTS: Final = (
    "certifi==2026.10.19.post1",
    "charset-normalizer==3.5.3",
    "filelock==4.3.1",
    "fsspec==2026.9.0",
    "hf-xet==1.8.0",
    "huggingface_hub==2.4.0",
    "idna==3.20",
    "Jinja2==3.1.6",
    "MarkupSafe==3.0.4",
    "mpmath==1.3.0",
    "networkx==3.6.1",
    "numpy==2.2.6",
    "packaging==26.4",
    "PyYAML==6.0.4",
    "regex==2026.11.19",
    "requests==2.34.2",
    "safetensors==0.8.0",
    "sentencepiece==0.2.1",
    "sympy==1.14.0",
    "tokenizers==0.23.3",
    "torch==2.13.0",
    "tqdm==4.70.1",
    "transformers==5.23.0",
    "typing_extensions==4.16.0",
    "urllib3==2.8.0",
    # transformers 5's own imports
    "annotated-doc==0.0.7",
    "click==8.5.1",
    "httpx2==2.16.2",
    "httpcore2==2.16.2",
    "h11==0.16.0",
    "anyio==4.16.0",
    "shellingham==1.5.4",
    "typer==0.29.2",
    "rich==15.0.0",
    "markdown-it-py==4.3.0",
    "mdurl==0.1.2",
    "Pygments==2.21.0",
    "truststore==0.10.5",
)
# GGUF file types llama_model_quantize makes (llama.h's LLAMA_FTYPE_MOSTLY_*), by the names
# llama.cpp's tools use; F32, F16 and BF16 come from the converter itself.
QUANT_TYPES: Final[Mapping[str, int]] = {
    "Q8_0": 7,
    "Q6_K": 18,
    "Q5_K_M": 17,
    "Q5_K_S": 16,
    "Q5_0": 8,
    "Q5_1": 9,
    "Q4_K_M": 15,
    "Q4_K_S": 14,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q3_K_L": 13,
    "Q3_K_M": 12,
    "Q3_K_S": 11,
    "Q2_K": 10,
    "IQ4_NL": 25,
    "IQ4_XS": 30,
}
CONVERTED_TYPES: Final = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
GGUF_TYPES: Final = frozenset(QUANT_TYPES) | frozenset(CONVERTED_TYPES)
CONVERT_TIMEOUT_S: Final = 3600
VENV_TIMEOUT_S: Final = 1800


@dataclass(frozen=True)
class Converter:
    """A ready converter: the venv's interpreter and the directory that holds the script."""

    python: Path
    source: Path


@dataclass(frozen=True)
class ConvertedModel:
    path: Path
    pipeline: ModelPipeline


def converter_key(sdist_sha256: str) -> str:
    """The cache key of a converter venv: the sdist, the requirements and this Python."""
    blob = "\n".join(
        [sdist_sha256, *CONVERTER_REQUIREMENTS, sys.implementation.cache_tag, sys.platform]
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare_converter(*, cache: Cache | None = None, say: Say = lambda _: None) -> Converter:
    """The converter of :data:`CONVERTER_SDIST`, from the cache or made there (steps 1, 2)."""
    store = cache if cache is not None else Cache()
    home = default_cache_root() / "converter" / converter_key(CONVERTER_SDIST.sha256)[:32]
    ready = Converter(home / "venv" / "bin" / "python", home / "llama.cpp")
    if (home / "ready").is_file():
        return ready
    say(
        f"making the model converter's venv ({CONVERTER_SDIST.name} {CONVERTER_SDIST.version}; "
        f"once per builder): {home}"
    )
    sdist = fetch_all([CONVERTER_SDIST], store, jobs=1, progress=False)[CONVERTER_SDIST.sha256]
    home.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{home.name}.", dir=home.parent))
    try:
        _extract_converter(sdist, staging / "llama.cpp")
        _run(
            [sys.executable, "-m", "venv", str(staging / "venv")],
            what="creating the converter venv",
            timeout=VENV_TIMEOUT_S,
        )
        requirements = staging / "requirements.txt"
        requirements.write_text("\n".join(CONVERTER_REQUIREMENTS) + "\n")
        _run(
            [
                str(staging / "venv" / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--disable-pip-version-check",
                "-r",
                str(requirements),
            ],
            what="installing the converter's requirements",
            timeout=VENV_TIMEOUT_S,
        )
        # A venv records its own path: it is made at its final place's name, then renamed in.
        (staging / "ready").write_text(CONVERTER_SDIST.sha256 + "\n")
        with contextlib.suppress(OSError):  # another builder made it meanwhile: use theirs
            staging.rename(home)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not (home / "ready").is_file():
        raise InputError(f"the converter venv {home} was not made")
    return ready


def _extract_converter(sdist: Path, dest: Path) -> None:
    """The converter's files from the sdist (checked by hash in the cache), nothing else;
    members that are not plain files or directories, or that leave ``dest``, are refused."""
    root = f"{CONVERTER_SDIST.filename.removesuffix('.tar.gz')}/{_VENDOR}/"
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for member in tar.getmembers():
            rel = member.name.removeprefix(root)
            if rel == member.name or not rel.startswith(_CONVERTER_FILES):
                continue
            if not (member.isfile() or member.isdir()):
                raise InputError(f"{sdist.name}: converter member {member.name} is a link")
            member.name = rel
            members.append(member)
        dest.mkdir(parents=True)
        tar.extractall(dest, members=members, filter="data")
    if not (dest / "convert_hf_to_gguf.py").is_file():
        raise InputError(f"{sdist.name} holds no {_VENDOR}/convert_hf_to_gguf.py")


def convert_model(
    checkpoint: Path,
    *,
    quantize: str,
    work: Path,
    known: Mapping[str, str] | None = None,
    eval_python: Path | None = None,
    say: Say = lambda _: None,
) -> ConvertedModel:
    """``checkpoint`` (a Hugging Face folder of safetensors) as a GGUF of type ``quantize``
    in ``work``, with its provenance (module docstring, steps 3 to 6). ``known`` are sha256 of
    checkpoint files already verified (a hub model's)."""
    if quantize not in GGUF_TYPES:
        raise InputError(f"unknown quantisation type {quantize!r}; one of {sorted(GGUF_TYPES)}")
    inputs = _input_hashes(checkpoint, known or {})
    converter = prepare_converter(say=say)
    work.mkdir(parents=True, exist_ok=True)
    name = checkpoint.name or "model"
    reference_type = "F16" if quantize in QUANT_TYPES else quantize
    reference = work / f"{name}-{reference_type}.gguf"
    say(f"converting {checkpoint} to GGUF {reference_type} with convert_hf_to_gguf.py")
    _run(
        [
            str(converter.python),
            str(converter.source / "convert_hf_to_gguf.py"),
            str(checkpoint),
            "--outfile",
            str(reference),
            "--outtype",
            CONVERTED_TYPES[reference_type],
        ],
        what=f"converting {checkpoint}",
        timeout=CONVERT_TIMEOUT_S,
        env={"PYTHONPATH": str(converter.source / "gguf-py"), "HF_HUB_OFFLINE": "1"},
    )
    output, kl = reference, None
    if quantize in QUANT_TYPES:
        output = work / f"{name}-{quantize}.gguf"
        say(f"quantising to {quantize} with llama_cpp.llama_model_quantize")
        _run(
            [
                sys.executable,
                "-m",
                "builder.quality",
                "quantize",
                str(reference),
                str(output),
                str(QUANT_TYPES[quantize]),
            ],
            what=f"quantising to {quantize}",
            timeout=CONVERT_TIMEOUT_S,
            env={"PYTHONPATH": _our_root()},
        )
        say(f"measuring the KL-divergence of {quantize} from F16")
        kl = measure_kl(reference, output, python=eval_python)
    pipeline = ModelPipeline(
        converter=f"{CONVERTER_SDIST.name}=={CONVERTER_SDIST.version}",
        converter_sha256=CONVERTER_SDIST.sha256,
        quantize=quantize,
        inputs=tuple(sorted(inputs.items())),
        output_sha256=sha256_file(output),
        kl_nanonats=None if kl is None else kl.nanonats,
        kl_tokens=None if kl is None else kl.tokens,
    )
    return ConvertedModel(output, pipeline)


def _input_hashes(checkpoint: Path, known: Mapping[str, str]) -> dict[str, str]:
    if not checkpoint.is_dir():
        raise InputError(f"model {checkpoint}: quantize needs a Hugging Face checkpoint folder")
    hashes = {}
    for path in sorted(checkpoint.rglob("*")):
        if path.is_symlink():
            raise InputError(f"model directory holds a symbolic link: {path}")
        if path.is_file():
            rel = path.relative_to(checkpoint).as_posix()
            hashes[rel] = known.get(rel) or sha256_file(path)
    if not any(p.endswith(".safetensors") for p in hashes):
        raise InputError(f"model {checkpoint}: no .safetensors file to convert")
    return hashes


def _our_root() -> str:
    """The directory that holds our packages, for a child's ``python -m builder.quality``."""
    return str(Path(__file__).resolve().parent.parent)


def _run(
    argv: list[str], *, what: str, timeout: float, env: Mapping[str, str] | None = None
) -> None:
    full_env = dict(os.environ) | dict(env or {})
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=full_env, check=False
        )
    except subprocess.TimeoutExpired:
        raise ModelError(f"{what}: no result after {timeout:.0f} s") from None
    except OSError as exc:
        raise ModelError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {result.returncode}"
        raise ModelError(f"{what} failed: {one_line(last)}")
