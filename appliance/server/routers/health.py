"""``GET /healthz`` (liveness: the process answers; no key) and ``GET /readyz`` (a model is up)."""

from __future__ import annotations

from typing import Any, Final

from fastapi import APIRouter

from appliance.server.deps import EngineDep, KeyName

router = APIRouter(tags=["health"])

PUBLIC_PATHS: Final = frozenset({"/healthz"})  # for the key middleware: no key, ever


@router.get("/healthz", summary="Liveness (no API key needed)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: a model is loaded and can take requests")
async def readyz(engine: EngineDep, _key: KeyName) -> dict[str, Any]:
    return {"status": "ready", "model": engine.model_id()}
