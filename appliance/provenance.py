"""What ``appliance status`` shows about where a slot's contents came from.

Read from the slot's verified files: the signed manifest (``bundle/manifest.json``: the
environment, the model's hub source and its memory table) and the payload's CycloneDX SBOM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.slots import SlotPaths
from signing.errors import FormatError
from signing.manifest import BundleManifest, ModelPipeline
from signing.provenance import SBOM_ENTRY, summarize_sbom
from signing.requirements import MemoryEstimate


def slot_provenance(slot: Path) -> dict[str, Any]:
    """``{"environment", "model_source", "model_pipeline", "memory", "sbom"}`` of an installed
    slot (None where absent)."""
    info: dict[str, Any] = dict.fromkeys(
        ("environment", "model_source", "model_pipeline", "memory", "sbom")
    )
    paths = SlotPaths(slot)
    try:
        manifest = BundleManifest.from_bytes(paths.manifest.read_bytes())
    except (OSError, FormatError):
        return info
    if manifest.environment is not None:
        info["environment"] = manifest.environment.to_dict() | {"installed": paths.env.is_dir()}
    if manifest.model_source is not None:
        info["model_source"] = manifest.model_source.to_dict()
    if manifest.model_pipeline is not None:
        info["model_pipeline"] = manifest.model_pipeline.to_dict()
    if manifest.requires is not None and manifest.requires.memory_estimate is not None:
        info["memory"] = manifest.requires.memory_estimate.to_dict()
    sbom = paths.payload / SBOM_ENTRY
    if any(e.path == SBOM_ENTRY for e in manifest.entries) and sbom.is_file():
        info["sbom"] = summarize_sbom(sbom.read_bytes()) | {"path": str(sbom)}
    return info


def describe_provenance(info: dict[str, Any]) -> list[str]:
    """Human lines for :func:`slot_provenance` (indented under the active slot)."""
    lines = []
    env = info.get("environment")
    if env:
        lines.append(
            f"  env      {env['type']} for {env['platform']}, Python {env['python']}"
            + ("" if env["installed"] else " (NOT set up)")
        )
    src = info.get("model_source")
    if src:
        lines.append(f"  model    {src['repo_id']} at commit {src['commit']}")
    pipeline = info.get("model_pipeline")
    if pipeline:
        lines.append(f"  made     {ModelPipeline.from_dict(pipeline).summary()}")
    memory = info.get("memory")
    if memory:
        lines.append(f"  memory   {MemoryEstimate.from_dict(memory).summary()}")
    sbom = info.get("sbom")
    if sbom:
        if "error" in sbom:
            lines.append(f"  sbom     unreadable: {sbom['error']}")
        else:
            built = sum(1 for p in sbom["packages"] if p["built"])
            lines.append(
                f"  sbom     {sbom['spec']}: {len(sbom['packages'])} package(s)"
                + (f", {built} built from sdist" if built else "")
                + f"  ({sbom['path']})"
            )
            lines.extend(f"           {p['name']} {p['version']}" for p in sbom["packages"])
    return lines
