"""Choosing the llama.cpp CPU variant by what this host can execute, not by what CPUID claims.

A runtime built with runtime CPU dispatch (builder.llamabuild, docs/adr/0012) ships its CPU
kernels once per x86 microarchitecture, ``libggml-cpu-<variant>.so`` (x64, sse42, haswell,
skylakex, ..., sapphirerapids), and nothing loads them: llama-cpp-python 0.3.36 never calls
``ggml_backend_load_all``, so ``Llama()`` finds no backend. ggml's own choice
(``ggml_backend_load_all_from_path``) goes by CPUID, and CPUID can lie: on a VM that advertises
AMX but does not let a process use it, ggml picks ``sapphirerapids`` and the process dies with
SIGILL; a static check cannot tell either (``arch_prctl(ARCH_REQ_XCOMP_PERM)`` succeeds there).
So the variant is chosen by running it:

1. Find the variants beside the bindings (:func:`find_runtime`). None: a native or
   explicit-level build, which loads its one CPU backend itself; nothing to do here.
2. Rank them by ggml's own ``ggml_backend_score`` (0: CPUID says no), asked in a child process:
   ``dlopen`` runs a library's constructors, which may already use the instructions.
3. From the best down, a child process loads that variant and the slot's model, evaluates a
   prompt of tens of tokens and decodes one more (so the batched and the single-token kernels
   of the model's own tensor types run); the first that exits 0 wins.
   SIGILL, SIGSEGV, any other failure or the timeout: the next one.
4. Remember the choice in the slot (``SlotPaths.cpu_variant``), keyed by this host's CPU (a hash
   of ``/proc/cpuinfo``'s model name and flags) and the variant file's sha256. A memory that
   does not parse, or is for another CPU or another file, is ignored and the variants are
   probed again. The health check at install (step I7) makes the choice; ``serve`` reuses it.
5. Load the winner, and the non-CPU backends shipped beside it (``libggml-cuda.so``), with
   ``ggml_backend_load`` of the very libggml the bindings loaded: the wheel holds file copies
   (``libggml.so``, ``libggml.so.0``), and a ``CDLL`` of another copy is a second, unrelated
   registry that ``Llama()`` never sees. A GPU backend that does not load (a CUDA build on a
   host without the NVIDIA driver or the CUDA libraries, which the preflight let through for a
   recipe that allows CPU fallback), or loads but finds no device, is logged with the reason;
   the CPU variant serves.

ggml's registry keeps a loaded CPU backend for the life of the process: a process that loads a
second model keeps its variant when that one runs the new model too, else the load is refused
(a hot swap in ``serve`` between slots that share the host's environment).

Children run under ``launcher`` when one is given (``qemu-x86_64 -cpu EPYC-Rome``): qemu-user
emulates one process, and a child it starts runs natively.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import logging
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from appliance.fsutil import atomic_write

LOG: Final = logging.getLogger(__name__)
VARIANT_PREFIX: Final = "libggml-cpu-"
CPU_VARIANT_PREFIX: Final = "llama.cpp CPU variant "  # how every line this module logs begins
BACKEND_PREFIX: Final = "llama.cpp backend "  # ... but those about a GPU backend
# The probe evaluates a prompt of tens of tokens (ggml picks matrix kernels by batch size: the
# batched ones, where AMX and the repacked AVX-512 paths live) and then decodes one token.
PROBE_PROMPT: Final = "The quick brown fox jumps over the lazy dog. " * 6
PROBE_TOKENS: Final = 2
PROBE_CONTEXT: Final = 512
SCORE_TIMEOUT_S: Final = 120.0
PROBE_TIMEOUT_S: Final = 300.0
MEMORY_FORMAT: Final = 1
_APPLIANCE_PARENT: Final = str(Path(__file__).resolve().parents[2])
_CHILD: Final = (
    "import sys; sys.path.insert(0, sys.argv[1]); sys.path.append(sys.argv[2]); "
    "from appliance.runtime.cpuvariant import child_main; sys.exit(child_main(sys.argv[3:]))"
)
# Backends this process has loaded already (ggml's registry is per process, and a hot swap
# between slots of one interpreter loads the same runtime again).
_LOADED: set[str] = set()


@dataclass(frozen=True)
class Runtime:
    """Where the installed bindings are, and the backend libraries of a dispatch build."""

    site: Path  # the directory that holds the llama_cpp package
    variants: dict[str, Path]  # "haswell" -> .../libggml-cpu-haswell.so
    others: tuple[Path, ...] = ()  # non-CPU backends shipped beside them: libggml-cuda.so


@dataclass(frozen=True)
class Choice:
    """The variant this host runs, and why: the better ranked ones it refused, and how."""

    variant: str
    path: Path
    remembered: bool
    refused: tuple[tuple[str, str], ...] = field(default=())

    def describe(self) -> str:
        how = "remembered for this CPU" if self.remembered else "chosen by execution"
        why = "; ".join(f"{name}: {outcome}" for name, outcome in self.refused)
        return f"{CPU_VARIANT_PREFIX}{self.variant} ({how})" + (
            f", after refusing {why}" if why else ""
        )


def find_runtime() -> Runtime | None:
    """The installed llama_cpp's dispatch libraries, found without importing it; None when it
    is not installed or ships no CPU variants."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    package = Path(spec.origin).parent
    variants: dict[str, Path] = {}
    others: list[Path] = []
    for folder in (package / "lib", package.parent / "bin"):
        if not folder.is_dir():
            continue
        found = sorted(folder.glob(f"{VARIANT_PREFIX}*.so"))
        variants |= {p.name.removeprefix(VARIANT_PREFIX).removesuffix(".so"): p for p in found}
        if found:  # a backend folder of a dispatch build: its other backends count too
            others += [
                p
                for p in sorted(folder.glob("libggml-*.so"))
                if not p.name.startswith((VARIANT_PREFIX, "libggml-base", "libggml-cpu."))
            ]
    if not variants:
        return None
    return Runtime(site=package.parent, variants=variants, others=tuple(others))


def cpu_key() -> str:
    """This host's CPU as the memory knows it: a hash of the architecture and the first
    processor's model name and flags in ``/proc/cpuinfo``."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    wanted = {"model name": "", "flags": "", "Features": "", "CPU part": ""}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if not line.strip():
            break  # the first processor only
        if key.strip() in wanted:
            wanted[key.strip()] = " ".join(sorted(value.split()))
    blob = json.dumps([platform.machine(), wanted], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def prepare(
    *,
    model_path: Path,
    memory: Path | None,
    launcher: Sequence[str] = (),
    timeout_s: float = PROBE_TIMEOUT_S,
) -> Choice | None:
    """For a process about to load a model: choose this host's variant (or recall it) and load
    it, with the other backends, into the bindings' registry. None for a build without
    variants (nothing loaded; the build loads its own CPU backend)."""
    runtime = find_runtime()
    if runtime is None:
        return None
    choice = choose(
        runtime, model_path=model_path, memory=memory, launcher=launcher, timeout_s=timeout_s
    )
    loaded = next((Path(p) for p in _LOADED if Path(p).name.startswith(VARIANT_PREFIX)), None)
    if loaded is not None and loaded != choice.path:
        # A hot swap in one process (serve, slots without their own environment): ggml's
        # registry keeps the CPU backend loaded first. It stays if it runs this model too.
        name = loaded.name.removeprefix(VARIANT_PREFIX).removesuffix(".so")
        outcome = _try(runtime, name, model_path, launcher=launcher, timeout_s=timeout_s)
        if outcome is not None:
            from signing.errors import ModelError  # noqa: PLC0415 - the failure path

            raise ModelError(
                f"this process runs llama.cpp CPU variant {name} already, which fails on this "
                f"model ({outcome}); restart serve to load {choice.variant}"
            )
        choice = Choice(name, loaded, remembered=False, refused=choice.refused)
    load_backends([choice.path, *runtime.others])
    LOG.info("%s", choice.describe())
    return choice


def choose(
    runtime: Runtime,
    *,
    model_path: Path,
    memory: Path | None,
    launcher: Sequence[str] = (),
    timeout_s: float = PROBE_TIMEOUT_S,
) -> Choice:
    """The remembered variant when the memory holds for this CPU and file; else the best ranked
    one that loads the model and generates (module docstring, steps 2 to 4). ModelError when
    none does."""
    key = cpu_key()
    if memory is not None and (recalled := _recall(memory, runtime, key)) is not None:
        return recalled
    refused: list[tuple[str, str]] = []
    for name in rank(runtime, launcher=launcher):
        outcome = _try(runtime, name, model_path, launcher=launcher, timeout_s=timeout_s)
        if outcome is None:
            choice = Choice(name, runtime.variants[name], remembered=False, refused=tuple(refused))
            if memory is not None:
                _remember(memory, choice, key)
            return choice
        LOG.warning("%s%s refused: %s", CPU_VARIANT_PREFIX, name, outcome)
        refused.append((name, outcome))
    from signing.errors import ModelError  # noqa: PLC0415 - only on the failure path

    tried = "; ".join(f"{n}: {o}" for n, o in refused) or "none is supported by this CPU"
    raise ModelError(f"no llama.cpp CPU variant runs this model on this host ({tried})")


def rank(runtime: Runtime, *, launcher: Sequence[str] = ()) -> list[str]:
    """The variants this CPU supports by ggml's ``ggml_backend_score``, best first (ties by
    name); a variant whose library cannot even be opened is left out."""
    names = sorted(runtime.variants)
    scores: dict[str, int] = {}
    while names:
        # One child scores them in turn; when a library kills it on load, it is dropped and
        # the rest are scored by the next child.
        args = ["score", *(str(runtime.variants[n]) for n in names)]
        result = _child(runtime, args, launcher=launcher, timeout_s=SCORE_TIMEOUT_S)
        done = 0
        for line in result.stdout.splitlines() if result is not None else ():
            score = line.strip()
            if done < len(names) and score.lstrip("-").isdigit():
                scores[names[done]] = int(score)
                done += 1
        if done < len(names):
            LOG.warning("%s%s: its library does not load", CPU_VARIANT_PREFIX, names[done])
            done += 1
        names = names[done:]
    supported = [n for n, s in scores.items() if s > 0]
    return sorted(supported, key=lambda n: (-scores[n], n))


def gpu_backend_warnings(runtime: Runtime, *, timeout_s: float = SCORE_TIMEOUT_S) -> list[str]:
    """Why the runtime's GPU backends will not serve on this host, one line each (none when
    they will): the libraries are loaded in a child, the way the engine loads them, so that a
    CUDA build on a host without the driver or the CUDA libraries says so before it serves on
    the CPU (the preflight let it through for a recipe that allows CPU fallback)."""
    if not runtime.others:
        return []
    done = _child(runtime, ["gpu", *map(str, runtime.others)], launcher=(), timeout_s=timeout_s)
    if done is None:
        return [f"{BACKEND_PREFIX}check timed out after {timeout_s:.0f} s"]
    return [line for line in done.stdout.splitlines() if line.startswith(BACKEND_PREFIX)]


def load_backends(paths: Sequence[Path]) -> None:
    """``ggml_backend_load`` each library into the registry of the libggml the imported
    bindings use (module docstring, step 5). A CPU variant that does not load is a ModelError;
    another backend (a GPU) that does not is logged, the CPU serves."""
    ggml = _bindings_ggml()
    load = ggml.ggml_backend_load
    load.argtypes = [ctypes.c_char_p]
    load.restype = ctypes.c_void_p
    for path in paths:
        if str(path) in _LOADED:
            continue
        reg = load(os.fsencode(path))
        if not reg:
            if path.name.startswith(VARIANT_PREFIX):
                from signing.errors import ModelError  # noqa: PLC0415 - the failure path

                raise ModelError(f"llama.cpp cannot load its CPU backend {path.name}")
            # A CUDA build on a host without the driver (libcuda.so.1) or the CUDA libraries:
            # the bundle allowed CPU fallback (the preflight said so), and the CPU serves.
            LOG.warning(
                "%s%s not loaded (%s): the CPU runs the model",
                BACKEND_PREFIX,
                path.name,
                _why_not_loaded(path),
            )
            continue
        _LOADED.add(str(path))
        if not path.name.startswith(VARIANT_PREFIX) and _device_count(ggml, reg) == 0:
            # It loaded (the CUDA libraries are there) but CUDA finds no GPU: no driver.
            LOG.warning(
                "%s%s loaded, but finds no device: the CPU runs the model",
                BACKEND_PREFIX,
                path.name,
            )


def _device_count(ggml: ctypes.CDLL, reg: int) -> int:
    count = ggml.ggml_backend_reg_dev_count
    count.argtypes = [ctypes.c_void_p]
    count.restype = ctypes.c_size_t
    return int(count(reg))


def _why_not_loaded(path: Path) -> str:
    """The dynamic loader's reason for a backend ggml would not load (ggml says it only on
    stderr); a library that does load was refused by ggml itself (no entry point, another
    API version)."""
    try:
        ctypes.CDLL(str(path))
    except OSError as exc:
        return str(exc).removeprefix(f"{path}: ")[:200]
    return "ggml refused it"


# -- the memory ---------------------------------------------------------------------------------


def _recall(memory: Path, runtime: Runtime, key: str) -> Choice | None:
    try:
        data = json.loads(memory.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        LOG.warning(
            "%sremembered in %s is unreadable (%s): probing", CPU_VARIANT_PREFIX, memory, exc
        )
        return None
    name = data.get("variant") if isinstance(data, dict) else None
    path = runtime.variants.get(name) if isinstance(name, str) else None
    if (
        not isinstance(data, dict)
        or data.get("format") != MEMORY_FORMAT
        or data.get("cpu") != key
        or path is None
        or data.get("sha256") != _sha256(path)
    ):
        LOG.warning(
            "%sremembered in %s is for another CPU or build: probing", CPU_VARIANT_PREFIX, memory
        )
        return None
    refused = data.get("refused")
    pairs = tuple(
        (str(p[0]), str(p[1]))
        for p in (refused if isinstance(refused, list) else [])
        if isinstance(p, list) and len(p) == 2
    )
    return Choice(str(name), path, remembered=True, refused=pairs)


def _remember(memory: Path, choice: Choice, key: str) -> None:
    record = {
        "format": MEMORY_FORMAT,
        "cpu": key,
        "variant": choice.variant,
        "sha256": _sha256(choice.path),
        "refused": [list(pair) for pair in choice.refused],
    }
    try:
        atomic_write(memory, json.dumps(record, sort_keys=True, indent=1).encode() + b"\n")
    except OSError as exc:  # a read-only slot: the next start probes again
        LOG.warning(
            "%s%s not remembered in %s: %s",
            CPU_VARIANT_PREFIX,
            choice.variant,
            memory,
            exc.strerror,
        )


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# -- the children -------------------------------------------------------------------------------


def _try(
    runtime: Runtime, name: str, model: Path, *, launcher: Sequence[str], timeout_s: float
) -> str | None:
    """None when the variant loads the model and generates in a child; else how it failed."""
    args = ["try", str(runtime.variants[name]), str(model)]
    try:
        result = _child(runtime, args, launcher=launcher, timeout_s=timeout_s, check_timeout=True)
    except subprocess.TimeoutExpired:
        return f"no answer within {timeout_s:.0f} s"
    assert result is not None  # noqa: S101 - _child returns a result when asked to
    if result.returncode == 0:
        return None
    if result.returncode < 0:
        try:
            return f"killed by {signal.Signals(-result.returncode).name}"
        except ValueError:
            return f"killed by signal {-result.returncode}"
    if result.returncode in (128 + signal.SIGILL, 128 + signal.SIGSEGV, 128 + signal.SIGBUS):
        return f"killed by {signal.Signals(result.returncode - 128).name}"  # under a launcher
    lines = [ln.strip() for ln in result.stderr.splitlines() if ln.strip()]
    return f"exit status {result.returncode}" + (f": {lines[-1][:200]}" if lines else "")


def _child(
    runtime: Runtime,
    args: Sequence[str],
    *,
    launcher: Sequence[str],
    timeout_s: float,
    check_timeout: bool = False,
) -> subprocess.CompletedProcess[str] | None:
    """Run :func:`child_main` under this interpreter (and the launcher), importing llama_cpp
    from the same directory as this process would; None on a timeout unless asked to raise."""
    command = [*launcher, sys.executable, "-P", "-c", _CHILD]
    command += [str(runtime.site), _APPLIANCE_PARENT, *args]
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        if check_timeout:
            raise
        return None


def child_main(argv: Sequence[str]) -> int:
    """The children's side: ``score LIB...`` prints each library's ``ggml_backend_score``, one
    a line; ``try LIB MODEL`` loads the variant and the model and generates (docstring, 3)."""
    match list(argv):
        case ["score", *libraries]:
            import llama_cpp  # noqa: PLC0415 - loads libggml-base, which variants need

            for library in libraries:
                score = ctypes.CDLL(library).ggml_backend_score
                score.restype = ctypes.c_int
                sys.stdout.write(f"{score()}\n")
                sys.stdout.flush()
            return 0
        case ["try", library, model]:
            import llama_cpp  # noqa: PLC0415

            load_backends([Path(library)])
            llama = llama_cpp.Llama(
                model_path=model, n_ctx=PROBE_CONTEXT, n_gpu_layers=0, verbose=False
            )
            llama.create_completion(PROBE_PROMPT, max_tokens=PROBE_TOKENS, temperature=0.0)
            return 0
        case ["gpu", *libraries]:
            import llama_cpp  # noqa: PLC0415

            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(message)s"))
            LOG.addHandler(handler)
            LOG.propagate = False
            load_backends([Path(library) for library in libraries])
            return 0
        case _:
            sys.stderr.write("usage: score LIB... | try LIB MODEL | gpu LIB...\n")
            return 2


def _bindings_ggml() -> ctypes.CDLL:
    """The libggml that the imported llama_cpp bindings loaded: the one mapped into this
    process (``/proc/self/maps``), else the bindings' ``lib/libggml.so.0``."""
    import llama_cpp  # noqa: PLC0415 - loads libllama and its libggml

    try:
        maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
    except OSError:
        maps = ""
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if Path(path).name.startswith("libggml.so"):
            return ctypes.CDLL(path)
    return ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml.so.0"))
