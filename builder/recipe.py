"""The bundle recipe (``bundles/<name>.toml``), documented key by key in docs/recipe.md.

Unknown keys are errors, never ignored: a misspelt ``gpu_layer`` silently doing nothing is
exactly the kind of surprise an operator finds out about on the isolated host, too late.

Paths in a recipe (``model.path``, an environment's ``lock``, ``requirements_file`` and local
``find_links``) are relative to the recipe file. :func:`load_recipe` resolves them once
(:meth:`Recipe.anchored`), so that nothing downstream (the lockers, the lock readers, the
build) joins a path to the recipe's directory on its own.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from builder.evalset import EvaluationSection
from signing.errors import FormatError, RecipeError
from signing.manifest import BundleManifest


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _Anchored(_Section):
    """A section whose relative paths are relative to the recipe file, until :meth:`anchored`
    resolves them (once: anchoring an anchored section again returns it unchanged)."""

    _recipe_path: Path | None = PrivateAttr(default=None)

    def anchored(self, recipe_path: Path) -> Self:
        """This section with its recipe-relative paths resolved against ``recipe_path``."""
        if self._recipe_path is not None:
            return self
        anchored = self.model_copy(update=self._resolved_paths(recipe_path))
        anchored._recipe_path = recipe_path
        return anchored

    def _resolved_paths(self, recipe_path: Path) -> dict[str, Any]:
        raise NotImplementedError


def find_links_entry(link: str, base: Path) -> str:
    """A find-links entry as the lockers use it: URLs unchanged, a local directory made
    absolute against ``base``."""
    if urlsplit(link).scheme in ("http", "https", "file"):
        return link
    return str((base / link).resolve())


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


class ModelSection(_Anchored):
    """A local file or directory (``path``), or files of a model hub repo at a revision."""

    path: str | None = Field(default=None, min_length=1)
    repo_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,190}$")
    revision: str | None = Field(default=None, min_length=1)
    files: list[str] = Field(default_factory=list)
    # A Hugging Face checkpoint converted and quantised by the builder (builder.convert).
    quantize: str | None = None

    @field_validator("quantize")
    @classmethod
    def _gguf_type(cls, value: str | None) -> str | None:
        from builder.convert import GGUF_TYPES  # noqa: PLC0415 - the pipeline's own list

        if value is not None and value not in GGUF_TYPES:
            raise ValueError(
                f"unknown quantisation type {value[:32]!r}; one of {', '.join(sorted(GGUF_TYPES))}"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.path is None) == (self.repo_id is None):
            raise ValueError("give exactly one of 'path' or 'repo_id'")
        if self.repo_id is not None and self.revision is None:
            raise ValueError("'repo_id' needs a pinned 'revision' (a commit sha, tag or branch)")
        if self.path is not None and (self.revision is not None or self.files):
            raise ValueError("'revision' and 'files' go with 'repo_id', not with 'path'")
        return self

    def _resolved_paths(self, recipe_path: Path) -> dict[str, Any]:
        return {} if self.path is None else {"path": str(recipe_path.parent / self.path)}


class ProgramSection(_Anchored):
    """A standalone ``appliance`` (``appliance-builder freeze``'s tar) that the bundle carries
    for the host to switch to with ``appliance self update`` (appliance.selfupdate)."""

    path: str = Field(min_length=1)

    def _resolved_paths(self, recipe_path: Path) -> dict[str, Any]:
        return {"path": str(recipe_path.parent / self.path)}


class AdapterSection(_Anchored):
    """A LoRA adapter in GGUF (``[[adapters]]``), applied to the model when it is served; with
    ``base_sha256``, the build refuses a model whose weights are not that base."""

    path: str = Field(min_length=1)
    base_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    def _resolved_paths(self, recipe_path: Path) -> dict[str, Any]:
        return {"path": str(recipe_path.parent / self.path)}


_MODULE = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
_PYTHON = r"^3\.[0-9]{1,2}$"


class _Environment(_Anchored):
    """What both kinds of environment have: the lock file and the modules to smoke-import."""

    lock: str | None = None
    smoke_imports: list[str] = Field(default_factory=list)

    @field_validator("smoke_imports")
    @classmethod
    def _modules(cls, value: list[str]) -> list[str]:
        for module in value:
            if not re.fullmatch(_MODULE, module):
                raise ValueError(f"{module!r} is not a module name")
        return value

    def lock_path(self, recipe_path: Path) -> Path:
        """Where ``lock`` writes and ``build`` reads: ``lock`` (relative to the recipe), else
        a default name next to the recipe. An anchored environment has it already."""
        if self._recipe_path is not None and self.lock is not None:
            return Path(self.lock)
        lock = self.lock if self.lock is not None else self._default_lock_name(recipe_path)
        return recipe_path.parent / lock

    def _resolved_paths(self, recipe_path: Path) -> dict[str, Any]:
        return {"lock": str(self.lock_path(recipe_path))}

    def _default_lock_name(self, recipe_path: Path) -> str:
        raise NotImplementedError


class PipEnvironment(_Environment):
    """A pip environment for the target host, installed offline into a venv in the slot."""

    type: Literal["pip"]
    platform: str = Field(pattern=r"^[a-z0-9][a-z0-9_.]{0,63}$")  # manylinux_2_28_x86_64
    python: str = Field(pattern=_PYTHON)
    requirements: list[str] = Field(default_factory=list)
    requirements_file: str | None = None
    index_url: str = "https://pypi.org/simple"
    extra_index_urls: list[str] = Field(default_factory=list)
    find_links: list[str] = Field(default_factory=list)
    build_from_source: list[str] = Field(default_factory=list)
    build_env: dict[str, str] = Field(default_factory=dict)
    build_isolation: bool = False

    @model_validator(mode="after")
    def _inputs(self) -> PipEnvironment:
        if self.requirements and self.requirements_file is not None:
            raise ValueError("give 'requirements' or 'requirements_file', not both")
        if not (self.requirements or self.requirements_file or self.lock):
            raise ValueError("give 'requirements', 'requirements_file' or an existing 'lock'")
        return self

    def _default_lock_name(self, recipe_path: Path) -> str:
        """``pylock.<recipe>.toml``: PEP 751 names lock files ``pylock.<name>.toml``, with no
        dots in the name."""
        return f"pylock.{re.sub(r'[^A-Za-z0-9_-]+', '-', recipe_path.stem)}.toml"

    def _resolved_paths(self, recipe_path: Path) -> dict[str, Any]:
        base = recipe_path.parent
        paths = super()._resolved_paths(recipe_path)
        paths["find_links"] = [find_links_entry(link, base) for link in self.find_links]
        if self.requirements_file is not None:
            paths["requirements_file"] = str(base / self.requirements_file)
        return paths


class CondaEnvironment(_Environment):
    """A conda environment for the target host, installed offline into a prefix in the slot."""

    type: Literal["conda"]
    platform: str = Field(pattern=r"^[a-z0-9]+-[a-z0-9_]+$")  # a conda subdir: linux-64
    python: str = Field(pattern=_PYTHON)
    channels: list[str] = Field(default_factory=list)
    specs: list[str] = Field(default_factory=list)
    glibc: str = Field(default="2.28", pattern=r"^[0-9]+\.[0-9]+$")
    cuda: str | None = Field(default=None, pattern=r"^[0-9]+\.[0-9]+$")

    @model_validator(mode="after")
    def _inputs(self) -> CondaEnvironment:
        if not ((self.specs and self.channels) or self.lock):
            raise ValueError("give 'specs' and 'channels', or an existing 'lock'")
        return self

    def _default_lock_name(self, recipe_path: Path) -> str:
        return f"{recipe_path.stem}.conda-lock.yml"


class RuntimeSection(_Section):
    backend: Literal["llama.cpp", "transformers"]
    context_size: int | None = Field(default=None, ge=16)
    gpu_layers: int | None = Field(default=None, ge=-1)
    threads: int | None = Field(default=None, ge=1)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = None


_CPU_FLAG = r"^[a-z0-9][a-z0-9_.]{0,31}$"
_CUDA_ARCH = r"^[1-9][0-9]{1,2}[af]?$"


class RequiresSection(_Section):
    """What the host must offer beyond what the builder derives (docs/recipe.md, [requires]).

    The builder records the rest itself: the architecture from the environment's platform,
    the glibc floor from the wheels' tags and its own glibc for compiled sdists, Python,
    memory and disk (builder.hostreqs).
    """

    cpu_level: Literal["x86-64-v2", "x86-64-v3", "x86-64-v4"] | None = None
    cpu_flags: list[str] = Field(default_factory=list, max_length=64)
    cuda_architectures: list[str] = Field(default_factory=list, max_length=32)
    cuda_version: str | None = Field(default=None, pattern=r"^[1-9][0-9]?\.[0-9]{1,2}$")
    cpu_fallback: bool = False
    memory_mib: int | None = Field(default=None, ge=1, le=1 << 30)
    gpu_memory_mib: int | None = Field(default=None, ge=1, le=1 << 30)
    # The host runs the standalone appliance (appliance-builder freeze) and has no Python:
    # the environment must run under the program's own interpreter (docs/adr/0018).
    standalone: bool = False

    @field_validator("cpu_flags")
    @classmethod
    def _flags(cls, value: list[str]) -> list[str]:
        for flag in value:
            if not re.fullmatch(_CPU_FLAG, flag):
                raise ValueError(f"{flag!r} is not a CPU flag as /proc/cpuinfo names it")
        return value

    @field_validator("cuda_architectures")
    @classmethod
    def _archs(cls, value: list[str]) -> list[str]:
        for arch in value:
            if not re.fullmatch(_CUDA_ARCH, arch):
                raise ValueError(f"{arch!r} is not a CUDA architecture like '86' or '90a'")
        return value

    @model_validator(mode="after")
    def _gpu_keys(self) -> RequiresSection:
        if not self.cuda_architectures and (
            self.cuda_version is not None or self.cpu_fallback or self.gpu_memory_mib is not None
        ):
            raise ValueError(
                "'cuda_version', 'cpu_fallback' and 'gpu_memory_mib' go with 'cuda_architectures'"
            )
        return self


class Recipe(_Anchored):
    bundle: BundleSection
    model: ModelSection
    runtime: RuntimeSection
    requires: RequiresSection = Field(default_factory=RequiresSection)
    environment: PipEnvironment | CondaEnvironment | None = Field(
        default=None, discriminator="type"
    )
    evaluation: EvaluationSection | None = None  # the install's evaluation gate (builder.evalset)
    adapters: list[AdapterSection] = Field(default_factory=list)  # LoRA (builder.adapters)
    program: ProgramSection | None = None  # a new appliance program (appliance self update)

    @model_validator(mode="after")
    def _runs_standalone(self) -> Recipe:
        """A host with no Python runs the environment under the standalone program's own
        interpreter, which is this builder's Python (ADR 0018): refuse what it cannot run."""
        env = self.environment
        if not self.requires.standalone or env is None:
            return self
        embedded = f"{sys.version_info.major}.{sys.version_info.minor}"
        if env.type == "conda":
            raise ValueError(
                "requires.standalone: a conda environment brings its own python, which cannot "
                "run the standalone appliance; use a pip environment (docs/adr/0018)"
            )
        if env.python != embedded:
            raise ValueError(
                f"requires.standalone: the environment targets Python {env.python}, the "
                f"standalone appliance that this builder freezes runs {embedded}"
            )
        return self

    def runtime_settings(self) -> dict[str, Any]:
        """Runtime settings as carried in the signed manifest (unset keys left out)."""
        return self.runtime.model_dump(exclude_none=True)

    def _resolved_paths(self, recipe_path: Path) -> dict[str, Any]:
        env = self.environment
        return {
            "model": self.model.anchored(recipe_path),
            "environment": None if env is None else env.anchored(recipe_path),
            "evaluation": None if (ev := self.evaluation) is None else ev.anchored(recipe_path),
            "adapters": [a.anchored(recipe_path) for a in self.adapters],
            "program": None if (p := self.program) is None else p.anchored(recipe_path),
        }


def load_recipe(path: Path) -> tuple[Recipe, bytes]:
    """Parse and validate a recipe; return it, anchored at ``path`` (its relative paths
    resolved), with its exact bytes (they go into the bundle)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"recipe {path}: not valid TOML: {exc}") from None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = list(first["loc"])
        if loc[:1] == ["environment"] and loc[1:2] in (["pip"], ["conda"]):
            del loc[1]  # the discriminator tag pydantic adds is not a recipe key
        where = ".".join(str(part) for part in loc)
        if first["type"] == "extra_forbidden":
            raise RecipeError(f"recipe {path}: unknown key '{where}'") from None
        if first["type"] == "missing":
            raise RecipeError(f"recipe {path}: missing key '{where}'") from None
        raise RecipeError(f"recipe {path}: '{where}': {first['msg']}") from None
    return recipe.anchored(path), raw
