"""Locking a pip environment for its target with uv: ``appliance-builder lock`` for
``type = "pip"`` (docs/adr/0007-package-environments.md).

:func:`lock_pip` runs ``uv pip compile --generate-hashes --python-platform ... --python-version
...`` against the recipe's indexes and writes a PEP 751 ``pylock.toml`` with the target recorded
in ``[tool.airgap-appliance]`` (builder.pipread reads it back and checks that record). uv is run
with ``--no-config`` and without the ``UV_*`` variables that would make it resolve against
something else than the recipe says; the builder's own Python is passed only to read sdists'
metadata, the resolution is for the target.

Errors are one line: :class:`~signing.errors.FetchError` naming an index uv could not reach
(checked first: uv retries an unreachable index for many seconds), else
:class:`~signing.errors.LockError` with uv's reason. A failure leaves any previous lock as it was.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from builder.cache import write_atomically
from builder.hashedreqs import HTTP_TIMEOUT, check_reachable
from builder.pipread import TOOL_KEY
from builder.recipe import PipEnvironment
from builder.target import parse_target_platform
from signing.errors import FetchError, LockError

# Environment variables that would make uv resolve against something else than the recipe says.
_UV_OVERRIDES = (
    "UV_INDEX",
    "UV_DEFAULT_INDEX",
    "UV_INDEX_URL",
    "UV_EXTRA_INDEX_URL",
    "UV_FIND_LINKS",
    "UV_NO_INDEX",
    "UV_INDEX_STRATEGY",
    "UV_CONSTRAINT",
    "UV_OVERRIDE",
    "UV_BUILD_CONSTRAINT",
    "UV_EXCLUDE_NEWER",
    "UV_PRERELEASE",
    "UV_RESOLUTION",
    "UV_NO_BINARY",
    "UV_ONLY_BINARY",
    "UV_TORCH_BACKEND",
    "UV_CONFIG_FILE",
    "UV_OFFLINE",
)


def uv_python_platform(platform: str) -> str:
    """uv's ``--python-platform`` for a wheel platform tag (``manylinux_2_28_x86_64`` ->
    ``x86_64-manylinux_2_28``); LockError naming the platform when uv has none for it."""
    target = parse_target_platform(platform)
    if target.uv_platform is None:
        raise LockError(
            f"uv cannot resolve for target platform {platform!r} (no --python-platform)"
        )
    return target.uv_platform


def lock_pip(
    recipe_path: Path,
    env: PipEnvironment,
    *,
    out: Path | None = None,
    cache_dir: Path | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> Path:
    """Resolve the environment for its target with uv and write a PEP 751 ``pylock.toml``.

    The requirements are ``env.requirements`` or ``env.requirements_file``. ``env`` is
    anchored at ``recipe_path`` (:meth:`~builder.recipe.PipEnvironment.anchored`; one that
    :func:`~builder.recipe.load_recipe` returned is already), so its relative paths are the
    recipe's. The lock goes to ``out`` or ``env.lock_path(recipe_path)``, through a temporary
    file and a rename. ``cache_dir`` is uv's cache (default: uv's own, or ``$UV_CACHE_DIR``).
    Every index and find-links location is checked for reachability first.
    """
    env = env.anchored(recipe_path)
    target = parse_target_platform(env.platform)
    uv_platform = uv_python_platform(env.platform)
    dest = out if out is not None else env.lock_path(recipe_path)
    for url in (env.index_url, *env.extra_index_urls):
        check_reachable(url, "index", timeout=timeout)
    for url in env.find_links:
        check_reachable(url, "find-links", timeout=timeout)
    uv = _uv_executable()
    with tempfile.TemporaryDirectory(prefix="airgap-lock-") as tmp:
        if env.requirements_file is not None:
            requirements = Path(env.requirements_file)
            if not requirements.is_file():
                raise LockError(f"requirements file {requirements} does not exist")
        elif env.requirements:
            requirements = Path(tmp) / "requirements.in"
            requirements.write_text("".join(f"{r}\n" for r in env.requirements))
        else:
            raise LockError(
                f"the environment of {recipe_path} has no 'requirements' or "
                "'requirements_file' to lock; it can only use its existing 'lock'"
            )
        command = [
            uv,
            "pip",
            "compile",
            str(requirements.absolute()),  # uv runs in the recipe's directory
            "--generate-hashes",
            "--no-header",
            "--no-config",
            "--quiet",
            "--format",
            "pylock.toml",
            "--python-platform",
            uv_platform,
            "--python-version",
            env.python,
            "--python",  # only to read sdists' metadata; the resolution is for the target
            sys.executable,
            "--index-url",
            env.index_url,
        ]
        for url in env.extra_index_urls:
            command += ["--extra-index-url", url]
        for link in env.find_links:
            command += ["--find-links", link]
        run_env = {k: v for k, v in os.environ.items() if k not in _UV_OVERRIDES}
        run_env |= dict(target.uv_env) | {"UV_HTTP_RETRIES": "1", "NO_COLOR": "1"}
        if cache_dir is not None:
            run_env["UV_CACHE_DIR"] = str(cache_dir)
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=run_env,
            cwd=recipe_path.parent,
            check=False,
        )
        if result.returncode != 0:
            _raise_uv_failure(result.stderr, env)
        text = _pylock_text(result.stdout, env)
    write_atomically(dest, text.encode("utf-8"))
    return dest


def _uv_executable() -> str:
    try:
        from uv import find_uv_bin  # noqa: PLC0415  (the builder extra; not on the host)

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise LockError(
                "uv is not installed; install the builder extra: pip install "
                "'airgap-appliance[builder]'"
            ) from None
        return found


_URL_IN_UV_ERROR = re.compile(r"(?:Failed to fetch: |error sending request for url \()(\S+?)\)?$")


def _raise_uv_failure(stderr: str, env: PipEnvironment) -> None:
    """Turn uv's failure into one line: a FetchError when it could not reach a URL, else a
    LockError with uv's error and its first cause (continuation lines joined)."""
    lines = [line.rstrip() for line in stderr.splitlines()]
    for line in lines:
        if match := _URL_IN_UV_ERROR.search(line.strip().removeprefix("cause:").strip()):
            raise FetchError(f"uv could not fetch {match[1]} (index {env.index_url})")
    error, cause = "", list[str]()
    for line in lines:
        text = line.strip()
        if not error:
            if text.lower().startswith("error:"):
                error = text[len("error:") :].strip()
        elif not cause:
            if text.startswith(("cause:", "╰─▶")):
                cause.append(text.removeprefix("cause:").removeprefix("╰─▶").strip())
        elif text and line[:1].isspace() and not text.startswith(("cause:", "╰─▶")):
            cause.append(text)
        else:
            break
    reason = ": ".join(part for part in (error, " ".join(cause)) if part)
    if not reason:
        tail = [line.strip() for line in lines if line.strip()]
        reason = tail[-1] if tail else "uv failed without a message"
    raise LockError(
        f"cannot lock for {env.platform} / Python {env.python}: {' '.join(reason.split())}"
    )


def _pylock_text(uv_output: str, env: PipEnvironment) -> str:
    """uv's pylock.toml with our header and the target recorded; checked to parse back."""
    body = uv_output.strip()
    text = (
        f"# Locked by appliance-builder with uv for {env.platform} / Python {env.python}.\n"
        "# Review changes to this file: every pinned hash decides what goes into a bundle.\n"
        f"{body}\n\n[tool.{TOOL_KEY}]\n"
        f'platform = "{env.platform}"\npython = "{env.python}"\n'
    )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LockError(f"uv wrote a pylock.toml that does not parse: {exc}") from None
    if not str(data.get("lock-version", "")).startswith("1."):
        raise LockError("uv wrote no PEP 751 lock (no lock-version 1.x)")
    return text
