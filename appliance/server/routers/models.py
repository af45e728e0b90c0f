"""``GET /v1/models`` and ``GET /v1/models/{model_id}``: the model being served (and the
canary beside it, marked with its version)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from appliance.server.deps import EngineDep, KeyName

router = APIRouter(prefix="/v1", tags=["models"])

OWNER = "airgap-appliance"


@router.get("/models", summary="List the served model")
async def list_models(engine: EngineDep, _key: KeyName) -> dict[str, Any]:
    data = [_model(engine.model_id(), engine.holder.loaded_at())]
    canary = engine.canary.model() if engine.canary is not None else None
    if canary is not None:  # the slot answering some keys beside it (appliance.canary)
        model_id, version, created = canary
        data.append({**_model(model_id, created), "canary": True, "version": version})
    return {"object": "list", "data": data}


@router.get("/models/{model_id}", summary="Describe a model")
async def get_model(model_id: str, engine: EngineDep, _key: KeyName) -> dict[str, Any]:
    engine.check_model(model_id)
    return _model(model_id, engine.holder.loaded_at())


def _model(model_id: str, created: float | None) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": int(created or 0), "owned_by": OWNER}
