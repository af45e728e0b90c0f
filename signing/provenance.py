"""A short reading of a bundle's CycloneDX SBOM, for ``inspect`` and ``status``.

Both halves show provenance, and the host must not need cyclonedx-python-lib to do it, so this
reads the JSON directly. It is a summary, never a verification: the SBOM's bytes were verified
against the signed manifest like every other payload file.
"""

from __future__ import annotations

import json
from typing import Any

SBOM_ENTRY = "sbom.cdx.json"  # the SBOM's path in the payload (docs/adr/0007)
PROPERTY_PREFIX = "airgap-appliance"  # of the CycloneDX properties the builder writes


def summarize_sbom(data: bytes) -> dict[str, Any]:
    """``{"spec", "serial", "model", "packages": [{"name", "version", "purl", "built"}]}``;
    ``{"error": ...}`` for an SBOM that cannot be read."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {"error": "not valid JSON"}
    if not isinstance(doc, dict) or doc.get("bomFormat") != "CycloneDX":
        return {"error": "not a CycloneDX document"}
    model: dict[str, Any] | None = None
    packages = []
    for comp in doc.get("components", []):
        if not isinstance(comp, dict):
            continue
        props = {
            p.get("name"): p.get("value") for p in comp.get("properties", []) if isinstance(p, dict)
        }
        if comp.get("type") == "machine-learning-model":
            model = {
                "name": comp.get("name"),
                "version": comp.get("version"),
                "purl": comp.get("purl"),
                "files": len(comp.get("components", [])) or 1,
            }
        elif comp.get("type") == "library":
            packages.append(
                {
                    "name": comp.get("name"),
                    "version": comp.get("version"),
                    "purl": comp.get("purl"),
                    "built": props.get(f"{PROPERTY_PREFIX}:origin") == "built-from-sdist",
                }
            )
    packages.sort(key=lambda p: (str(p["name"]), str(p["version"])))
    return {
        "spec": f"CycloneDX {doc.get('specVersion', '?')}",
        "serial": doc.get("serialNumber"),
        "model": model,
        "packages": packages,
    }
