"""``appliance-builder export constructor``: a recipe's conda environment for conda/constructor.

A site that standardises on constructor installers builds one from the same pinned packages as
the bundle: this module writes ``construct.yaml`` and ``<name>.explicit.txt``, an ``@EXPLICIT``
list with one full package URL per line pinned by ``#sha256:<hex>``, read from the recipe's
committed conda lock (builder.condaenv.load_conda_artifacts, which refuses a package without
sha256). ``construct.yaml`` names the list as its ``environment_file``, so constructor does not
solve: conda creates the environment from exactly these files.

Only keys that constructor documents (``CONSTRUCT.md`` in conda/constructor) are written; the
set is :data:`CONSTRUCT_KEYS`, and the test checks the emitted file against it. What
constructor's own installer checks at install time is weaker than the appliance's (its shell
header checks the md5 of its appended payload, and a mismatch is a warning): docs/recipe.md
says so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from builder.artifacts import Artifact
from builder.condaenv import load_conda_artifacts
from builder.recipe import CondaEnvironment, load_recipe
from signing.errors import InputError

# The top-level keys of construct.yaml that constructor documents (CONSTRUCT.md).
CONSTRUCT_KEYS: Final = frozenset(
    {
        "name", "version", "channels", "channels_remap", "specs", "user_requested_specs",
        "exclude", "menu_packages", "ignore_duplicate_files", "install_in_dependency_order",
        "environment", "environment_file", "transmute_file_type", "conda_default_channels",
        "conda_channel_alias", "extra_envs", "installer_filename", "installer_type",
        "license_file", "keep_pkgs", "batch_mode", "signing_identity_name",
        "notarization_identity_name", "attempt_hardlinks", "write_condarc", "condarc",
        "company", "reverse_domain_identifier", "uninstall_name", "pre_install",
        "post_install", "post_install_desc", "pre_uninstall", "default_prefix",
        "default_prefix_domain_user", "default_prefix_all_users", "default_location_pkg",
    }
)  # fmt: skip
REQUIRED_KEYS: Final = frozenset({"name", "version"})
# constructor: letters, numbers, "_", "-" and ".", not beginning or ending with "-" or ".".
_NAME_OR_VERSION: Final = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
EXPLICIT_HEADER: Final = "# airgap-appliance export for conda/constructor"


def explicit_list(artifacts: Sequence[Artifact], platform: str) -> str:
    """The ``@EXPLICIT`` list: full URLs, each pinned by sha256, sorted (same input, same
    bytes)."""
    lines = sorted(f"{a.url}#sha256:{a.sha256.lower()}" for a in artifacts)
    header = [
        EXPLICIT_HEADER,
        "# every package is pinned by sha256; conda create --file reads it without solving",
        f"# platform: {platform}",
        "@EXPLICIT",
    ]
    return "\n".join([*header, *lines]) + "\n"


def construct_yaml(
    *, name: str, version: str, channels: Sequence[str], environment_file: str
) -> str:
    """``construct.yaml`` for a shell installer of one environment made from the list. Every
    value is written as a JSON string, which is a YAML string."""
    lines = [
        "# Written by appliance-builder export constructor; keys as in constructor's CONSTRUCT.md.",
        f"name: {json.dumps(name)}",
        f"version: {json.dumps(version)}",
        "channels:",
        *(f"  - {json.dumps(channel)}" for channel in channels),
        f"environment_file: {json.dumps(environment_file)}",
        'installer_type: "sh"',
    ]
    return "\n".join(lines) + "\n"


def export_constructor(recipe_path: Path, output: Path) -> list[Path]:
    """Write ``construct.yaml`` and the explicit list for the recipe's conda environment into
    ``output``; return the paths written."""
    recipe, _ = load_recipe(recipe_path)
    env = recipe.environment
    if not isinstance(env, CondaEnvironment):
        raise InputError(
            f"recipe {recipe_path} has no conda environment: constructor installs conda packages"
        )
    lock = env.lock_path(recipe_path)
    if not lock.is_file():
        raise InputError(f"no lock {lock}: run 'appliance-builder lock {recipe_path}' first")
    artifacts = load_conda_artifacts(lock, env)
    if not any(a.name == "python" for a in artifacts):
        # constructor: "The created environment MUST include python" (environment_file).
        raise InputError(f"lock {lock} has no python package; constructor needs one")
    for what, value in (("name", recipe.bundle.name), ("version", recipe.bundle.version)):
        if not _NAME_OR_VERSION.match(value):
            raise InputError(f"recipe {what} {value!r} is not one that constructor accepts")
    channels = list(env.channels) or sorted({_channel_of(a.url) for a in artifacts})
    explicit_name = f"{recipe.bundle.name}.explicit.txt"
    output.mkdir(parents=True, exist_ok=True)
    explicit = output / explicit_name
    explicit.write_text(explicit_list(artifacts, env.platform), encoding="utf-8")
    construct = output / "construct.yaml"
    construct.write_text(
        construct_yaml(
            name=recipe.bundle.name,
            version=recipe.bundle.version,
            channels=channels,
            environment_file=explicit_name,
        ),
        encoding="utf-8",
    )
    return [construct, explicit]


def _channel_of(url: str) -> str:
    """The channel URL of a package URL (``.../<channel>/<subdir>/<file>``)."""
    return url.rsplit("/", 2)[0]
