"""Label Studio's ML backend routes at the server's root, thin over ``integrations.label_studio``.

``GET /health`` (open, as LS polls it with a 1 s timeout), ``POST /setup``, ``POST /predict``,
``POST /webhook`` (training events: accepted and ignored). With an API key set, the last three need it,
in any form the server takes; Label Studio sends it as basic auth (its ML backend settings: "Basic
Authentication", any user name, the key as password). Images are fetched as the settings say:
``label_studio_url`` / ``label_studio_api_key`` (``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY``), the
server's image limits and URL setting. The engine is the first preloaded version's (else
``hiera_tiny``), embedding through the server's batcher and cache.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ..engine.types import AutomaticConfig
from ..integrations.label_studio import LabelStudioBackend, SdkMissing, TaskImages
from .settings import ServerSettings


async def _json(request: Request):
    try:
        return await request.json()
    except ValueError:
        raise ValueError("the request body is not valid JSON") from None


def label_studio_router(settings: ServerSettings, engines, authorize: Callable[[Request], None]) -> APIRouter:
    """The routes, on ``engines`` (an ``EngineProvider``: the server's state) and ``authorize(request)``
    (raises when the request lacks the API key). Without label-studio-sdk, brush projects get 503
    naming it (at ``/setup`` already, so Label Studio shows it when the backend is connected)."""
    version = (settings.preload or ["hiera_tiny"])[0]
    backend = LabelStudioBackend(
        engine=lambda: engines.get(version),
        images=TaskImages(settings.label_studio_url, settings.label_studio_api_key, settings.image_limits()),
        model_version=f"sam2flow-{version}",
        automatic=AutomaticConfig(points_per_side=settings.automatic_points_per_side),
    )
    router = APIRouter(tags=["label-studio"])

    @router.get("/health")
    async def health():
        return backend.health()

    @router.post("/setup")
    async def setup(request: Request):
        authorize(request)
        try:
            return backend.setup(await _json(request))
        except SdkMissing as e:
            return JSONResponse({"error": str(e)}, status_code=503)

    @router.post("/predict")
    async def predict(request: Request):
        authorize(request)
        try:
            return await run_in_threadpool(backend.predict, await _json(request))
        except SdkMissing as e:
            return JSONResponse({"error": str(e)}, status_code=503)

    @router.post("/webhook")
    async def webhook(request: Request):
        authorize(request)
        body = await _json(request)
        action = body.get("action") if isinstance(body, dict) else None
        return {"status": "ignored", "action": action}

    return router
