"""The bundle's CycloneDX SBOM (``sbom.cdx.json``), made with cyclonedx-python-lib.

It lists the model (a ``machine-learning-model`` component whose files are sub-components with
their sha256) and every package of the environment (a ``library`` with its package URL, the
sha256 of the exact file in the bundle, and for a wheel the builder compiled from an sdist, the
sdist's hash as a property). The SBOM is part of the deterministic build: no clock, no random
serial number or bom-ref; the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.tool import ToolRepository
from cyclonedx.output.json import JsonV1Dot6
from packageurl import PackageURL

from builder.artifacts import Artifact
from signing.manifest import ModelPipeline, ModelSource
from signing.provenance import PROPERTY_PREFIX

_NAMESPACE = uuid.UUID("5b0c6b0e-2f4e-4d1e-9a53-6a1f4f3c2b10")  # fixed: serials are uuid5


@dataclass(frozen=True)
class FileRecord:
    """A file as it lies in the bundle: its payload path, size and sha256."""

    path: str
    size: int
    sha256: str
    # The sha256 of each 64 MiB piece of a larger file (signing.chunks); not in the SBOM.
    chunks: tuple[str, ...] = ()


def make_sbom(
    *,
    name: str,
    version: str,
    created: datetime,
    model_path: str,
    model_files: Sequence[FileRecord],
    model_source: ModelSource | None,
    environment: tuple[str, str, str] | None,
    artifacts: Sequence[Artifact],
    locks: Sequence[FileRecord],
    model_pipeline: ModelPipeline | None = None,
) -> bytes:
    """CycloneDX 1.6 JSON for a bundle. ``environment`` is ``(type, platform, python)``."""
    bundle = Component(
        type=ComponentType.APPLICATION,
        name=name,
        version=version,
        bom_ref=f"bundle:{name}@{version}",
        properties=[
            Property(name=f"{PROPERTY_PREFIX}:lock", value=f"{f.path} sha256:{f.sha256}")
            for f in locks
        ]
        + (
            [
                Property(name=f"{PROPERTY_PREFIX}:environment.type", value=environment[0]),
                Property(name=f"{PROPERTY_PREFIX}:environment.platform", value=environment[1]),
                Property(name=f"{PROPERTY_PREFIX}:environment.python", value=environment[2]),
            ]
            if environment
            else []
        ),
    )
    components = [_model_component(model_path, model_files, model_source, model_pipeline)]
    components += [
        _package_component(a, environment[0] if environment else "pip") for a in artifacts
    ]
    tools = ToolRepository(
        components=[
            Component(
                type=ComponentType.APPLICATION,
                name="appliance-builder",
                group="airgap-appliance",
                bom_ref="tool:appliance-builder",
            )
        ]
    )
    digest = hashlib.sha256()
    for c in components:
        digest.update(f"{c.bom_ref.value}\0".encode())
        for h in c.hashes:
            digest.update(f"{h.content}\0".encode())
    bom = Bom(
        components=components,
        serial_number=uuid.uuid5(_NAMESPACE, f"{name}@{version}:{digest.hexdigest()}"),
        metadata=BomMetaData(component=bundle, timestamp=created, tools=tools),
    )
    bom.register_dependency(bundle, components)
    text: str = JsonV1Dot6(bom).output_as_string(indent=2)
    return text.encode("utf-8") + b"\n"


def _pipeline_properties(pipeline: ModelPipeline | None) -> list[Property]:
    """How the GGUF was made (builder.convert): converter, type, input and output hashes, KL."""
    if pipeline is None:
        return []
    pairs = [
        ("pipeline.converter", pipeline.converter),
        ("pipeline.converter-sha256", pipeline.converter_sha256),
        ("pipeline.quantize", pipeline.quantize),
        ("pipeline.output-sha256", pipeline.output_sha256),
        *(("pipeline.input", f"{path} sha256:{digest}") for path, digest in pipeline.inputs),
    ]
    if pipeline.kl_nanonats is not None:
        pairs.append(("pipeline.kl-nanonats", str(pipeline.kl_nanonats)))
        pairs.append(("pipeline.kl-tokens", str(pipeline.kl_tokens)))
    return [Property(name=f"{PROPERTY_PREFIX}:{name}", value=value) for name, value in pairs]


def _model_component(
    path: str,
    files: Sequence[FileRecord],
    source: ModelSource | None,
    pipeline: ModelPipeline | None = None,
) -> Component:
    props = _pipeline_properties(pipeline)
    subs = [
        Component(
            type=ComponentType.FILE,
            name=f.path,
            bom_ref=f"file:{f.path}",
            hashes=[HashType(alg=HashAlgorithm.SHA_256, content=f.sha256)],
            properties=[Property(name=f"{PROPERTY_PREFIX}:size", value=str(f.size))],
        )
        for f in files
    ]
    if source is not None:
        purl = PackageURL(type="huggingface", name=source.repo_id, version=source.commit)
        return Component(
            type=ComponentType.MACHINE_LEARNING_MODEL,
            name=source.repo_id,
            version=source.commit,
            purl=purl,
            bom_ref=f"model:{source.repo_id}@{source.commit}",
            components=subs,
            properties=props,
        )
    return Component(
        type=ComponentType.MACHINE_LEARNING_MODEL,
        name=path,
        bom_ref=f"model:{path}",
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=f.sha256) for f in files[:1]]
        if len(files) == 1
        else None,
        components=subs if len(files) > 1 else None,
        properties=props,
    )


def _package_component(artifact: Artifact, kind: str) -> Component:
    props = [Property(name=f"{PROPERTY_PREFIX}:file", value=artifact.filename)]
    if artifact.origin == "built":
        props.append(Property(name=f"{PROPERTY_PREFIX}:origin", value="built-from-sdist"))
        if artifact.source_sha256:
            props.append(
                Property(name=f"{PROPERTY_PREFIX}:sdist-sha256", value=artifact.source_sha256)
            )
        if artifact.cpu_build:  # a llama.cpp build: dispatch, a CPU level, or native
            props.append(Property(name=f"{PROPERTY_PREFIX}:cpu-build", value=artifact.cpu_build))
        if artifact.cuda_architectures:  # a CUDA build: its GPUs and the CUDA it was made with
            props.append(
                Property(
                    name=f"{PROPERTY_PREFIX}:cuda-architectures",
                    value=artifact.cuda_architectures,
                )
            )
        if artifact.cuda_version:
            props.append(
                Property(name=f"{PROPERTY_PREFIX}:cuda-version", value=artifact.cuda_version)
            )
    props.append(Property(name=f"{PROPERTY_PREFIX}:source-url", value=artifact.url))
    hashes = [HashType(alg=HashAlgorithm.SHA_256, content=artifact.sha256)]
    if artifact.md5:
        hashes.append(HashType(alg=HashAlgorithm.MD5, content=artifact.md5))
    if kind == "conda":
        qualifiers = {"subdir": artifact.subdir or "noarch"}
        purl = PackageURL(
            type="conda", name=artifact.name, version=artifact.version, qualifiers=qualifiers
        )
    else:
        purl = PackageURL(type="pypi", name=artifact.name, version=artifact.version)
    return Component(
        type=ComponentType.LIBRARY,
        name=artifact.name,
        version=artifact.version,
        purl=purl,
        bom_ref=f"pkg:{artifact.filename}",
        hashes=hashes,
        properties=props,
    )
