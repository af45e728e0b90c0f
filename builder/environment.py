"""From a recipe's ``[environment]`` and ``[model]`` to the payload files of a bundle.

This is the orchestration behind ``appliance-builder lock`` and ``build`` (docs/adr/0007):

1. the lock: read the committed lock (``build`` refuses an environment without one unless
   ``--lock`` is given, which makes it first);
2. select the artifacts for the *target* platform and Python (builder.pipread and
   builder.wheels, builder.condaenv);
3. fetch them by hash into the content-addressed cache (builder.fetch, builder.cache);
4. build the allowed sdists into wheels on the builder (pip only, builder.sdist), for the
   target (builder.llamabuild), cached by sdist hash and effective build settings so that a
   rebuild does not compile again;
5. write the install list the host installs from, and describe everything for the manifest
   (``EnvironmentSpec``) and the SBOM.

Hub models are fetched here too (builder.hub), so that ``build`` sees one local directory.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from builder.artifacts import Artifact
from builder.cache import Cache
from builder.condaenv import conda_install_list, load_conda_artifacts, lock_conda
from builder.fetch import fetch_all
from builder.hub import fetch_hub_model
from builder.pack import PayloadFile
from builder.piplock import lock_pip
from builder.pipread import load_pip_lock
from builder.recipe import CondaEnvironment, PipEnvironment, Recipe, RequiresSection
from builder.sdist import build_wheels
from builder.wheels import pip_install_list, select_pip_artifacts
from signing.errors import LockError, RecipeError
from signing.manifest import EnvironmentSpec, ModelPipeline, ModelSource

ENV_DIR = "env"
LOCK_DIR = f"{ENV_DIR}/lock"
WHEELS_DIR = f"{ENV_DIR}/wheels"
CONDA_DIR = f"{ENV_DIR}/conda"
PIP_INSTALL_LIST = f"{ENV_DIR}/requirements.txt"
CONDA_INSTALL_LIST = f"{ENV_DIR}/conda-explicit.txt"

Say = Callable[[str], None]


@dataclass
class PreparedEnvironment:
    spec: EnvironmentSpec
    files: list[PayloadFile] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)
    lock_path: Path | None = None


def lock_environment(recipe_path: Path, recipe: Recipe) -> Path:
    """``appliance-builder lock``: solve the recipe's environment for its target; the lock."""
    env = recipe.environment
    if env is None:
        raise RecipeError(f"recipe {recipe_path} has no [environment] to lock")
    if isinstance(env, PipEnvironment):
        return lock_pip(recipe_path, env)
    return lock_conda(recipe_path, env, glibc=env.glibc, cuda=env.cuda)


def prepare_environment(
    recipe_path: Path,
    recipe: Recipe,
    *,
    work: Path,
    lock: bool = False,
    jobs: int = 8,
    progress: bool | None = None,
    say: Say = lambda _: None,
) -> PreparedEnvironment | None:
    """Lock (if asked), select, fetch and build the recipe's environment; None without one."""
    env = recipe.environment
    if env is None:
        return None
    lock_path = env.lock_path(recipe_path)
    if not lock_path.is_file():
        if not lock:
            raise LockError(
                f"the environment of {recipe_path} is not locked: no {lock_path}; run "
                f"'appliance-builder lock {recipe_path}' and commit the lock, or build with --lock"
            )
        say(f"locking the environment for {env.platform} / Python {env.python}")
        lock_path = lock_environment(recipe_path, recipe)
    cache = Cache()
    if isinstance(env, PipEnvironment):
        prepared = _prepare_pip(
            env,
            lock_path,
            cache,
            work,
            requires=recipe.requires,
            jobs=jobs,
            progress=progress,
            say=say,
        )
    else:
        prepared = _prepare_conda(
            env, lock_path, cache, work, jobs=jobs, progress=progress, say=say
        )
    prepared.lock_path = lock_path
    prepared.files.append(PayloadFile(f"{LOCK_DIR}/{lock_path.name}", lock_path, "lock"))
    prepared.files.sort(key=lambda f: f.entry_path)
    return prepared


def _prepare_pip(
    env: PipEnvironment,
    lock_path: Path,
    cache: Cache,
    work: Path,
    *,
    requires: RequiresSection,
    jobs: int,
    progress: bool | None,
    say: Say,
) -> PreparedEnvironment:
    wheels, sdists = select_pip_artifacts(load_pip_lock(lock_path, env), env)
    say(
        f"fetching {len(wheels)} wheel(s) and {len(sdists)} sdist(s) for {env.platform} / "
        f"Python {env.python}, checked against {lock_path.name}"
    )
    fetched = fetch_all([*wheels, *sdists], cache, jobs=jobs, progress=progress)
    if sdists:
        names = ", ".join(f"{a.name} {a.version}" for a in sdists)
        say(f"building from sdist on this machine (or from the build cache): {names}")
    built = build_wheels(
        [(sdist, fetched[sdist.sha256]) for sdist in sdists],
        env,
        work,
        isolation=env.build_isolation,
        requires=requires,
        cache=cache,
        say=say,
    )
    artifacts = sorted([*wheels, *(a for a, _ in built)], key=lambda a: a.filename)
    paths = {a.sha256: fetched[a.sha256] for a in wheels} | {a.sha256: p for a, p in built}
    install_list = work / "requirements.txt"
    install_list.write_bytes(pip_install_list(artifacts))
    files = [
        PayloadFile(f"{WHEELS_DIR}/{a.filename}", paths[a.sha256], "package", a.sha256)
        for a in artifacts
    ]
    files.append(PayloadFile(PIP_INSTALL_LIST, install_list, "lock"))
    spec = _spec(env, "pip", install_list=PIP_INSTALL_LIST, packages=WHEELS_DIR)
    return PreparedEnvironment(spec=spec, files=files, artifacts=artifacts)


def _prepare_conda(
    env: CondaEnvironment,
    lock_path: Path,
    cache: Cache,
    work: Path,
    *,
    jobs: int,
    progress: bool | None,
    say: Say,
) -> PreparedEnvironment:
    artifacts = sorted(
        load_conda_artifacts(lock_path, env), key=lambda a: (a.subdir or "", a.filename)
    )
    say(
        f"fetching {len(artifacts)} conda package(s) for {env.platform}, checked against "
        f"{lock_path.name}"
    )
    fetched = fetch_all(artifacts, cache, jobs=jobs, progress=progress)
    install_list = work / "conda-explicit.txt"
    install_list.write_bytes(conda_install_list(artifacts))
    files = [
        PayloadFile(
            f"{CONDA_DIR}/{a.subdir or 'noarch'}/{a.filename}",
            fetched[a.sha256],
            "package",
            a.sha256,
        )
        for a in artifacts
    ]
    files.append(PayloadFile(CONDA_INSTALL_LIST, install_list, "lock"))
    files += _channel_index(artifacts, fetched, work / "channel")
    spec = _spec(env, "conda", install_list=CONDA_INSTALL_LIST, packages=CONDA_DIR)
    return PreparedEnvironment(spec=spec, files=files, artifacts=artifacts)


def _channel_index(
    artifacts: list[Artifact], fetched: dict[str, Path], channel: Path
) -> list[PayloadFile]:
    """``repodata.json`` of the bundle's own channel, one per subdir that has packages.

    Made here, online, by ``rattler.index.index_fs``, so that the host gets the records ready
    and installs with plain ``rattler.install`` instead of reading every package's
    ``info/index.json`` first. The time of indexing is removed from the records (the bundle
    must not depend on when it was built); the keys are sorted. The host still checks every
    record's sha256 against the one the signed manifest pins for that file.
    """
    import asyncio  # noqa: PLC0415 - only conda builds index a channel

    import rattler.index  # noqa: PLC0415

    subdirs = sorted({a.subdir or "noarch" for a in artifacts})
    for artifact in artifacts:
        target = channel / (artifact.subdir or "noarch") / artifact.filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fetched[artifact.sha256], target)
    (channel / "noarch").mkdir(parents=True, exist_ok=True)
    asyncio.run(rattler.index.index_fs(channel, write_zst=False, write_shards=False))
    files = []
    for subdir in subdirs:
        path = channel / subdir / "repodata.json"
        repodata = json.loads(path.read_bytes())
        for table in ("packages", "packages.conda"):
            for record in repodata.get(table, {}).values():
                record.pop("indexed_timestamp", None)
        path.write_text(json.dumps(repodata, sort_keys=True, separators=(",", ":")) + "\n")
        files.append(PayloadFile(f"{CONDA_DIR}/{subdir}/repodata.json", path, "lock"))
    return files


def _spec(
    env: PipEnvironment | CondaEnvironment, kind: str, *, install_list: str, packages: str
) -> EnvironmentSpec:
    """What the signed manifest says about the environment (docs/bundle-format.md)."""
    return EnvironmentSpec(
        type=kind,
        platform=env.platform,
        python=env.python,
        install_list=install_list,
        packages=packages,
        smoke_imports=tuple(env.smoke_imports),
    )


# -- the model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedModel:
    """Where the model's files lie on the builder, and where they came from."""

    source_path: Path
    source: ModelSource | None
    # sha256 of each file (relative to source_path) that is known already: checked against
    # the hub's hashes when fetched, so the build need not hash it again.
    digests: Mapping[str, str] = field(default_factory=dict)
    # How a checkpoint became the GGUF at source_path (builder.convert), when it did.
    pipeline: ModelPipeline | None = None


def resolve_model(
    recipe: Recipe,
    *,
    work: Path | None = None,
    eval_python: Path | None = None,
    say: Say = lambda _: None,
) -> ResolvedModel:
    """A local ``path`` as it is (anchored at the recipe by load_recipe); a hub ``repo_id``
    fetched at its revision's commit; with ``quantize``, either converted to a GGUF of that
    type in ``work`` (builder.convert)."""
    model = recipe.model
    if model.path is not None:
        resolved = ResolvedModel(Path(model.path), None)
    else:
        fetched = fetch_hub_model(model)
        if fetched.resolved:
            say(f"model {fetched.repo_id}: revision {model.revision} resolved to {fetched.commit}")
        resolved = ResolvedModel(
            fetched.directory,
            ModelSource(fetched.repo_id, fetched.commit),
            {f.path: f.sha256 for f in fetched.files},
        )
    if model.quantize is None:
        return resolved
    from builder.convert import convert_model  # noqa: PLC0415 - only a pipeline needs it

    if work is None:
        raise RecipeError("a model with 'quantize' needs a work directory to convert in")
    converted = convert_model(
        resolved.source_path,
        quantize=model.quantize,
        work=work / "model",
        known=resolved.digests,
        eval_python=eval_python,
        say=say,
    )
    return ResolvedModel(converted.path, resolved.source, {}, converted.pipeline)
