"""``/docs`` with no internet: Swagger UI from files installed with the package.

FastAPI's default page loads Swagger UI from a CDN, which an isolated host cannot reach. The
assets come from the ``fastapi-offline`` distribution (Swagger UI 5, which renders OpenAPI 3.1)
and are served by a route with a fixed list of names rather than a static mount, so that they
sit behind the same API key as the page (unless ``public_docs`` is set).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from appliance.server.deps import require_key_for_docs
from appliance.server.errors import RouteNotFoundError

DocsKey = Annotated[str | None, Depends(require_key_for_docs)]

ASSETS: Final = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon.png": "image/png",
}
ASSET_PREFIX: Final = "/docs/assets/"


def is_docs_path(path: str) -> bool:
    """The page, its assets and the OpenAPI document: what ``public_docs`` makes public."""
    return path in ("/docs", "/openapi.json") or path.startswith(ASSET_PREFIX)


router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def swagger_ui(request: Request, _key: DocsKey) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=f"{request.app.title} API",
        swagger_js_url=ASSET_PREFIX + "swagger-ui-bundle.js",
        swagger_css_url=ASSET_PREFIX + "swagger-ui.css",
        swagger_favicon_url=ASSET_PREFIX + "favicon.png",
        # No validator badge: it would make the browser call validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get(ASSET_PREFIX + "{name}")
async def swagger_asset(name: str, _key: DocsKey) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise RouteNotFoundError(f"no asset {name!r}")
    # An installed wheel is a directory on disk: the resource is a plain file.
    path = Path(str(files("fastapi_offline") / "static" / name))
    return FileResponse(path, media_type=media_type)


@router.get("/openapi.json")
async def openapi(request: Request, _key: DocsKey) -> dict[str, Any]:
    schema: dict[str, Any] = request.app.openapi()
    return schema
