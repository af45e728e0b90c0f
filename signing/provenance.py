"""A short reading of a bundle's CycloneDX SBOM, for ``inspect`` and ``status``.

Both halves show provenance, and the host must not need cyclonedx-python-lib to do it, so this
reads the JSON directly. It is a summary, never a verification: the SBOM's bytes were verified
against the signed manifest like every other payload file.
"""

from __future__ import annotations

import json
from typing import Any

from signing.bounded import MAX_QUOTED, clip

SBOM_ENTRY = "sbom.cdx.json"  # the SBOM's path in the payload (docs/adr/0007)
PROPERTY_PREFIX = "airgap-appliance"  # of the CycloneDX properties the builder writes


def summarize_sbom(data: bytes) -> dict[str, Any]:
    """``{"spec", "serial", "model", "packages": [{"name", "version", "purl", "built"}]}``;
    ``{"error": ...}`` for an SBOM that cannot be read.

    Total: the SBOM is a payload file, verified but written by whoever built the bundle, so
    every field's type is checked before use (a list where a name was meant would otherwise be
    a TypeError in ``appliance status``), and texts are clipped to one short line each.
    """
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return {"error": "not valid JSON"}
    if not isinstance(doc, dict) or doc.get("bomFormat") != "CycloneDX":
        return {"error": "not a CycloneDX document"}
    model: dict[str, Any] | None = None
    packages = []
    for comp in _objects(doc.get("components")):
        props = {
            p["name"]: p.get("value")
            for p in _objects(comp.get("properties"))
            if isinstance(p.get("name"), str)
        }
        if comp.get("type") == "machine-learning-model":
            files = comp.get("components")
            model = {
                "name": _text(comp.get("name")),
                "version": _text(comp.get("version")),
                "purl": _text(comp.get("purl")),
                "files": len(files) if isinstance(files, list) and files else 1,
            }
        elif comp.get("type") == "library":
            packages.append(
                {
                    "name": _text(comp.get("name")),
                    "version": _text(comp.get("version")),
                    "purl": _text(comp.get("purl")),
                    "built": props.get(f"{PROPERTY_PREFIX}:origin") == "built-from-sdist",
                }
            )
    packages.sort(key=lambda p: (str(p["name"]), str(p["version"])))
    return {
        "spec": f"CycloneDX {_text(doc.get('specVersion')) or '?'}",
        "serial": _text(doc.get("serialNumber")),
        "model": model,
        "packages": packages,
    }


def _objects(value: object) -> list[dict[str, Any]]:
    """The JSON objects in ``value`` when it is a list; nothing otherwise."""
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]


def _text(value: object) -> str | None:
    """A string field, clipped; None when absent or not a string.

    json.loads lets lone surrogates (``"\\ud800"``) through, and no terminal or JSON
    encoder can write them: they are shown escaped.
    """
    if not isinstance(value, str):
        return None
    return clip(value.encode("utf-8", "backslashreplace").decode("utf-8"), MAX_QUOTED)
