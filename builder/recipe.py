"""The bundle recipe (``bundles/<name>.toml``), documented key by key in docs/recipe.md.

Unknown keys are errors, never ignored: a misspelt ``gpu_layer`` silently doing nothing is
exactly the kind of surprise an operator finds out about on the isolated host, too late.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from signing.errors import FormatError, RecipeError
from signing.manifest import BundleManifest


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class BundleSection(_Section):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    version: str
    description: str = ""
    valid_days: int = Field(default=365, ge=1, le=3650)

    @field_validator("version")
    @classmethod
    def _pep440(cls, value: str) -> str:
        try:
            BundleManifest.parse_version(value)
        except FormatError as exc:  # pydantic reports ValueError, naming the recipe key
            raise ValueError(exc.diagnostics()) from None
        return value


class ModelSection(_Section):
    path: str = Field(min_length=1)


class RuntimeSection(_Section):
    backend: Literal["llama.cpp", "transformers"]
    context_size: int | None = Field(default=None, ge=16)
    gpu_layers: int | None = Field(default=None, ge=-1)
    threads: int | None = Field(default=None, ge=1)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = None


class Recipe(_Section):
    bundle: BundleSection
    model: ModelSection
    runtime: RuntimeSection

    def runtime_settings(self) -> dict[str, Any]:
        """Runtime settings as carried in the signed manifest (unset keys left out)."""
        return self.runtime.model_dump(exclude_none=True)


def load_recipe(path: Path) -> tuple[Recipe, bytes]:
    """Parse and validate a recipe; return it with its exact bytes (they go into the bundle)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"recipe {path}: not valid TOML: {exc}") from None
    try:
        return Recipe.model_validate(data), raw
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            raise RecipeError(f"recipe {path}: unknown key '{where}'") from None
        if first["type"] == "missing":
            raise RecipeError(f"recipe {path}: missing key '{where}'") from None
        raise RecipeError(f"recipe {path}: '{where}': {first['msg']}") from None
