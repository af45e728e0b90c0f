"""The frozen ``appliance`` as the Python interpreter of slot environments (ADR 0018).

A host without Python gets ``appliance`` as one PyInstaller folder (``appliance-builder
freeze``), which holds CPython's whole standard library and pip. A slot's pip environment is a
venv made by that program: ``SLOT/env/bin/python`` is a symbolic link to it, beside
``pyvenv.cfg``. Started under a name that begins with ``python``, or with an interpreter option
first (``-m``, ``-c``, ``-P``, ...), the program does what ``python`` would: it finds its venv
the way CPython does (``pyvenv.cfg`` one directory above the executable's), makes that the
prefix, puts the venv's site-packages (and its ``.pth`` lines) before its own packages, and runs
the module, the command or the script. Everything the installer and the server run under an
environment's interpreter is one of these three: pip's runner script, ``-m compileall``, ``-c``
smoke imports, ``-m appliance.runtime.healthcheck`` and ``-m appliance serve``.

It is not a general ``python``: no REPL, and only the options the appliance's own children use
(others are refused with one line and status 2). Outside a frozen program this module is unused:
a venv's interpreter is CPython itself.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Final

# Options without an argument that we accept (and mostly ignore: nothing of the caller's
# environment reaches the frozen interpreter anyway).
_FLAGS: Final = frozenset("BEIOPsSu")
USAGE_STATUS: Final = 2
METADATA_DIR: Final = "_metadata"
# Written by appliance.envsetup.write_host_pth once the env is checked: from then on the
# program's own packages count as installed for the env, as the host's do in a venv.
_HOST_PTH: Final = "_appliance_host.pth"


def wants_interpreter(argv: list[str]) -> bool:
    """Whether ``argv`` asks for the interpreter rather than the ``appliance`` command line."""
    if Path(argv[0]).name.startswith("python"):
        return True
    if len(argv) < 2:
        return False
    first = argv[1]
    return first in ("-m", "-c") or (
        len(first) >= 2 and first[0] == "-" and first[1] != "-" and set(first[1:]) <= _FLAGS
    )


def find_venv(argv0: str) -> Path | None:
    """The venv whose ``bin/`` holds ``argv0`` (not resolved: the link is what names it)."""
    exe = Path(argv0) if os.sep in argv0 else None
    if exe is None:
        import shutil  # noqa: PLC0415

        found = shutil.which(argv0)
        exe = Path(found) if found else None
    if exe is None:
        return None
    exe = Path(os.path.abspath(exe))  # noqa: PTH100 - not resolved: the link names the venv
    venv = exe.parent.parent
    return venv if (venv / "pyvenv.cfg").is_file() else None


def program_metadata() -> Path:
    """Where the frozen program keeps its packages' ``*.dist-info`` (builder/freeze_hooks)."""
    return Path(getattr(sys, "_MEIPASS", Path(sys.executable).parent)) / METADATA_DIR


def _enter_venv(venv: Path, argv0: str) -> None:
    """Make ``venv`` this interpreter's prefix, its site-packages first on ``sys.path``."""
    import site  # noqa: PLC0415

    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site_packages = venv / "lib" / version / "site-packages"
    sys.prefix = sys.exec_prefix = str(venv)
    sys.executable = os.path.abspath(argv0)  # noqa: PTH100 - the link, not what it points to
    if "sysconfig" in sys.modules:  # it read the prefix at import
        sysconfig = sys.modules["sysconfig"]
        sysconfig._PREFIX = sysconfig._EXEC_PREFIX = str(venv)  # type: ignore[attr-defined]
        sysconfig._CONFIG_VARS = None  # type: ignore[attr-defined]
    own = list(sys.path)
    # The frozen standard library stays first (as in a venv); the env's packages come before
    # the program's own, so that the slot's llama_cpp is the one imported.
    stdlib = [p for p in own if p.endswith(("base_library.zip", "lib-dynload"))]
    rest = [p for p in own if p not in stdlib]
    sys.path[:] = []
    site.addsitedir(str(site_packages))
    added = [p for p in sys.path if p not in stdlib and p not in rest]
    sys.path[:] = [*stdlib, *added, *rest]
    if (site_packages / _HOST_PTH).is_file():
        sys.path.append(str(program_metadata()))


def main(argv: list[str]) -> int:
    """Run ``argv`` the way ``python`` would (module docstring); return the exit status."""
    import runpy  # noqa: PLC0415

    args = argv[1:]
    safe_path = False
    while args and args[0].startswith("-") and args[0] not in ("-", "-m", "-c"):
        option = args.pop(0)
        if option == "--":
            break
        letters = option[1:]
        if letters.startswith(("X", "W")):
            if len(letters) == 1 and args:
                args.pop(0)
            continue
        if not set(letters) <= _FLAGS:
            sys.stderr.write(f"appliance (as python): unsupported option {option}\n")
            return USAGE_STATUS
        safe_path = safe_path or "P" in letters or "I" in letters
        if "u" in letters:
            for stream in (sys.stdout, sys.stderr):
                if isinstance(stream, io.TextIOWrapper):
                    stream.reconfigure(write_through=True)
        if "B" in letters:
            sys.dont_write_bytecode = True
    venv = find_venv(argv[0])
    if venv is not None:
        _enter_venv(venv, argv[0])
    else:
        sys.path.append(str(program_metadata()))
    if not args:
        sys.stderr.write("appliance (as python): no interactive mode; give -m, -c or a script\n")
        return USAGE_STATUS
    first = args[0]
    if first in ("-m", "-c") and len(args) < 2:
        sys.stderr.write(f"appliance (as python): {first} needs an argument\n")
        return USAGE_STATUS
    if first == "-m":
        sys.argv = [args[1], *args[2:]]
        if not safe_path:
            sys.path.insert(0, str(Path.cwd()))
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    elif first == "-c":
        sys.argv = ["-c", *args[2:]]
        if not safe_path:
            sys.path.insert(0, "")
        code = compile(args[1], "<string>", "exec")
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102
    else:
        sys.argv = list(args)
        if not safe_path:
            sys.path.insert(0, str(Path(os.path.abspath(first)).parent))  # noqa: PTH100
        # Not runpy.run_path: the frozen importer's path hook claims any path, files included.
        source = Path(first).read_bytes()
        code = compile(source, first, "exec")
        globals_ = {"__name__": "__main__", "__file__": first, "__builtins__": __builtins__}
        exec(code, globals_)  # noqa: S102
    return 0
