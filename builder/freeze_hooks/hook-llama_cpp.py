"""llama-cpp-python: what PyInstaller's analysis cannot see (llama-cpp-python #1475, #1565).

The bindings ``ctypes``-load ``llama_cpp/lib/libllama.so`` and ``libggml*.so`` from beside
their own file; the serving engine is ``llama-server`` in ``site-packages/bin`` with the CPU
variants (``libggml-cpu-<arch>.so``) beside it, and its libraries in ``site-packages/lib``
(appliance.runtime.llamaengine.find_server, appliance.runtime.cpuvariant.find_runtime). The
frozen folder keeps the same layout under ``_internal``: the bindings' ``lib``, and ``bin`` and
``lib`` one level above the package. They go in as data files, byte for byte: binary analysis
would move their dependencies and the loader finds them by ``$ORIGIN`` and by folder.
"""

import re
from pathlib import Path

from PyInstaller.utils.hooks import collect_submodules, get_package_paths

_, _package = get_package_paths("llama_cpp")
_site = Path(_package).parent

hiddenimports = collect_submodules("llama_cpp", filter=lambda name: ".server" not in name)
excludedimports = ["llama_cpp.server"]

# llama-server and what it loads; the other llama.cpp tools are not the appliance's business.
_SERVER = "llama-server"
_KEEP_IMPL = "libllama-server-impl.so"

datas = []
for _file in sorted((Path(_package) / "lib").glob("*.so*")):
    datas.append((str(_file), "llama_cpp/lib"))
_bin = _site / "bin"
if (_bin / _SERVER).is_file():
    datas.append((str(_bin / _SERVER), "bin"))
    for _file in sorted(_bin.glob("libggml-*.so*")):
        datas.append((str(_file), "bin"))
# The server's libraries by the names it asks for (their sonames, ``libllama.so.0``): the
# wheel holds each one three times as file copies (``.so``, ``.so.0``, ``.so.0.5.0``).
_lib = _site / "lib"
for _file in sorted(_lib.glob("lib*.so*")) if _lib.is_dir() else []:
    if _file.name == _KEEP_IMPL or re.search(r"\.so\.[0-9]+$", _file.name):
        datas.append((str(_file), "lib"))
