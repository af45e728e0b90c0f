"""``GET /healthz`` (liveness: the process answers; no key) and ``GET /readyz`` (a model is up)."""

from __future__ import annotations

from typing import Any, Final

from fastapi import APIRouter

from appliance.server.deps import EngineDep, KeyName
from appliance.server.errors import NotReadyError

router = APIRouter(tags=["health"])

PUBLIC_PATHS: Final = frozenset({"/healthz"})  # for the key middleware: no key, ever


@router.get("/healthz", summary="Liveness (no API key needed)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: a model is loaded and can take requests")
async def readyz(engine: EngineDep, _key: KeyName) -> dict[str, Any]:
    model = engine.model_id()
    backend = engine.holder.get()
    if not getattr(backend, "ready", True):  # the llama.cpp engine is restarting after a crash
        raise NotReadyError(f"the engine of {model} is restarting")
    return {"status": "ready", "model": model}
