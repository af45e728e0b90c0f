"""LoRA adapters on the builder: ``[[adapters]]`` of a recipe, bound to the model's weights.

Each adapter is a GGUF LoRA file (llama.cpp's ``convert_lora_to_gguf.py`` makes one from a PEFT
folder: builder.lora). The bundle carries it as ``adapters/<file>`` and the manifest binds it to
the sha256 of the model it was trained on (``model.adapters``, docs/bundle-format.md, section
2.6), so that no host ever applies it to other weights: the manifest is refused if the binding
does not hold, and ``serve`` passes each adapter to llama-server (``--lora``). An adapter-only
update is a delta (``build --base``): the weights stay on the host, only the adapter travels.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final

from builder.pack import PayloadFile
from builder.recipe import Recipe
from builder.sbom import FileRecord
from signing.errors import RecipeError
from signing.manifest import ModelAdapter

ADAPTER_DIR: Final = "adapters"
_GGUF_MAGIC: Final = b"GGUF"


def adapter_files(recipe: Recipe, model_path: str) -> list[PayloadFile]:
    """The recipe's adapter files as payload, after the checks that need no hashing."""
    if not recipe.adapters:
        return []
    if recipe.runtime.backend != "llama.cpp":
        raise RecipeError(
            "[[adapters]] are LoRA adapters for llama.cpp: runtime.backend must be 'llama.cpp'"
        )
    if not model_path.endswith(".gguf"):
        raise RecipeError(f"[[adapters]] need a model that is one GGUF file, not {model_path!r}")
    files: list[PayloadFile] = []
    for adapter in recipe.adapters:
        source = Path(adapter.path)
        try:
            with source.open("rb") as fh:
                magic = fh.read(len(_GGUF_MAGIC))
        except OSError as exc:
            raise RecipeError(f"adapter {source}: {exc.strerror}") from None
        if magic != _GGUF_MAGIC:
            raise RecipeError(
                f"adapter {source} is not a GGUF file; convert a PEFT adapter with "
                "convert_lora_to_gguf.py first"
            )
        entry = f"{ADAPTER_DIR}/{source.name}"
        if any(f.entry_path == entry for f in files):
            raise RecipeError(f"two adapters are named {source.name!r}")
        files.append(PayloadFile(entry, source, "model"))
    return files


def bind_adapters(
    recipe: Recipe, files: list[PayloadFile], records: Mapping[str, FileRecord], model_path: str
) -> tuple[ModelAdapter, ...]:
    """Bind every adapter to the model's sha256; refuse one the recipe pins to other weights."""
    if not recipe.adapters:
        return ()
    weights = records[model_path].sha256
    bound = []
    for adapter, f in zip(recipe.adapters, files, strict=True):
        if adapter.base_sha256 is not None and adapter.base_sha256 != weights:
            raise RecipeError(
                f"adapter {Path(adapter.path).name} is for base weights sha256 "
                f"{adapter.base_sha256[:16]}..., the recipe's model {model_path} is "
                f"{weights[:16]}..."
            )
        bound.append(ModelAdapter(path=f.entry_path, base_sha256=weights))
    return tuple(sorted(bound, key=lambda a: a.path))
