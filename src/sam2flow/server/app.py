"""FastAPI routes, thin: parse → engine or workflow runner → format.

Model work runs in worker threads (embedding through the micro-batcher), never on the event loop.
Every invalid request gets a 4xx JSON ``{"error": ...}`` naming the problem.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import hmac
import io
import threading
import time
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from .. import __version__
from ..engine.cache import EmbeddingCache
from ..engine.engine import Sam2Engine
from ..engine.pool import EnginePool
from ..engine.prompts import Prompt, PromptBudget, PromptLimitError
from ..engine.store import EmbeddingStore, StoreError
from ..engine.threads import compute_thread
from ..engine.types import AutomaticConfig, ImageEmbedding
from ..formats import mask_to_polygons, mask_to_rle
from ..images import ImageTooLarge, load_wire_image, wire_loader
from ..models.convert import CheckpointError
from ..models.registry import get_spec
from ..workflows.runner import run_workflow, serialize_outputs
from .batching import BatchedEngine, EmbedBatcher, EmbeddingBatcher
from .label_studio import label_studio_router
from .metrics import ServerMetrics
from .page import page_router
from .schemas import EmbedRequest, SegmentRequest, WorkflowRunRequest
from .settings import ServerSettings


class Unauthorized(Exception):
    pass


class ServerState:
    """Models, batcher and caches shared by all requests of one app."""

    batcher: EmbeddingBatcher  # an ``EmbedBatcher``; a Ray Serve replica swaps in its ``ServeEmbedBatcher``

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        checkpoints = {}
        if settings.checkpoint:
            checkpoints[(settings.preload or ["hiera_tiny"])[0]] = settings.checkpoint
        cache = EmbeddingCache(settings.cache_entries, settings.cache_bytes)
        self.pool = EnginePool(
            settings.family,
            settings.device,
            settings.dtype,
            checkpoints,
            settings.max_resident_models,
            settings.max_batch_size,
            cache,
            settings.compile,
            settings.backend,
            EmbeddingStore(settings.store, settings.store_write) if settings.store else None,
            interactive=True,  # clicks are answered while images embed: see engine/encoders.py
        )
        compute_thread().spin_s = settings.click_spin_ms / 1000  # the engines' compute thread, process-wide
        self.metrics = ServerMetrics(cache)
        self.batcher = EmbedBatcher(
            settings.embed_batch_size(), settings.max_wait_ms / 1000, self.metrics.batch_size.observe
        )
        # image_id → embedding, and the last prompts + low-resolution logits per image (click-to-refine).
        self.by_id = EmbeddingCache(settings.cache_entries, settings.cache_bytes)
        self.logits = EmbeddingCache(settings.cache_entries * 4, 1 << 30, size_of=lambda v: v[1].nbytes)
        self.ready = threading.Event()
        self.load_error: str | None = None

    def engine(self, version: str) -> Sam2Engine:
        get_spec(version, self.settings.family)  # unknown version → 400 before anything loads
        engine = self.pool.loaded(version)
        if engine is None:
            start = time.perf_counter()
            engine = self.pool.get(version)
            self.metrics.model_load.labels(version).set(time.perf_counter() - start)
            freeze_heap()
        return engine

    async def engine_async(self, version: str) -> Sam2Engine:
        """``engine`` for a request handler: a resident engine at once, a load on a worker thread."""
        engine = self.pool.loaded(version)
        return engine if engine is not None else await run_in_threadpool(self.engine, version)

    def preload(self) -> None:
        try:
            for version in self.settings.preload:
                self.engine(version)
        except Exception as e:  # reported by /readyz, the process stays up
            self.load_error = f"{type(e).__name__}: {e}"
            return
        self.ready.set()

    def get(self, version: str) -> BatchedEngine:
        """For the workflow runner (an ``EngineProvider``): engines whose embedding goes through the batcher."""
        return BatchedEngine(self.engine(version), self.batcher)


def freeze_heap() -> None:
    """Move every object alive now (libraries, models) out of the garbage collector's sight.

    Python's full collection walks every tracked object: in a server with hiera_tiny loaded,
    ~486,000 of them, 180 ms during which the GIL is held and a click waits. It runs when enough
    objects have survived since the last one, so a long labelling session meets it. Frozen
    (``gc.freeze``) after a model loads, they are never walked again: a full collection then took
    0.01 ms. Each call first thaws and collects everything, so what became garbage since the last
    freeze (an engine the pool evicted for this one, say) is freed, not kept frozen for ever."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _authorize(state: ServerState, request: Request, body_key: str | None) -> None:
    expected = state.settings.api_key
    if not expected:
        return
    auth = request.headers.get("authorization", "")
    given = [
        body_key,
        request.query_params.get("api_key"),
        request.headers.get("x-api-key"),
        auth[7:] if auth.lower().startswith("bearer ") else None,
        _basic_password(auth),  # what Label Studio sends: the key as basic auth's password
    ]
    if not any(g and hmac.compare_digest(g.encode(), expected.encode()) for g in given):
        raise Unauthorized()


def _basic_password(auth: str) -> str | None:
    if not auth.lower().startswith("basic "):
        return None
    try:
        return base64.b64decode(auth[6:].strip(), validate=True).decode().partition(":")[2]
    except (binascii.Error, UnicodeDecodeError):
        return None


class BodyLimit:
    """Pure ASGI middleware: refuse bodies over ``max_bytes`` with 413, declared or streamed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _error(413, f"request body over {self.max_bytes} bytes")(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _error(413, f"request body over {self.max_bytes} bytes")(scope, receive, send)


class Observe:
    """Pure ASGI middleware: count each HTTP request by route and status, and time it.

    Pure ASGI, not ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` runs the rest of
    the app in a task group and hands the response over a memory stream, per request."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500  # 500 unless a response starts

        async def watched(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)


class _TooLarge(Exception):
    pass


def _prompts(request: SegmentRequest, budget: PromptBudget) -> list[Prompt] | None:
    items = request.prompts
    if not items:
        return None
    budget.take([len(items)], "prompts")
    prompts = []
    for p in items:
        points = [[q.x, q.y] for q in p.points] if p.points else None
        labels = [int(q.positive) for q in p.points] if p.points else None
        prompts.append(Prompt(box=p.box.xyxy() if p.box else None, points=points, labels=labels))
    return prompts


def _signature(p: Prompt) -> tuple:
    return (tuple(p.box) if p.box else None, tuple(map(tuple, p.points or ())), tuple(p.labels or ()))


def _with_cached_logits(prompts: list[Prompt], cached) -> list[Prompt]:
    """Give each prompt the previous logits of the prompt it extends (same box, more clicks)."""
    if cached is None:
        return prompts
    old_signatures, logits = cached
    out = []
    for i, p in enumerate(prompts):
        sig = _signature(p)
        old = old_signatures[i] if i < len(old_signatures) else None
        extends = (
            old is not None and old[0] == sig[0] and sig[1][: len(old[1])] == old[1] and sig[2][: len(old[2])] == old[2]
        )
        out.append(Prompt(p.box, p.points, p.labels, logits[i]) if extends else p)
    return out


def _format_predictions(masks: np.ndarray, scores: np.ndarray, fmt: str) -> list[dict]:
    if fmt == "rle":
        return [{"masks": mask_to_rle(m), "confidence": float(s), "format": "rle"} for m, s in zip(masks, scores)]
    return [
        {"masks": [poly.tolist() for poly in mask_to_polygons(m)], "confidence": float(s), "format": "polygon"}
        for m, s in zip(masks, scores)
    ]


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    state = ServerState(settings)
    limits = settings.image_limits()  # what any image of any request may be

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=state.preload, name="sam2flow-preload", daemon=True).start()
        yield
        state.batcher.close()

    app = FastAPI(
        title="sam2flow",
        version=__version__,
        lifespan=lifespan,
        description="Segment Anything 2 inference server (inference-sdk compatible API).",
    )
    app.state.sam2flow = state

    app.add_middleware(Observe, metrics=state.metrics)

    @app.exception_handler(Unauthorized)
    async def _unauthorized(request, exc):
        return _error(401, "missing or wrong API key")

    @app.exception_handler(ImageTooLarge)
    @app.exception_handler(PromptLimitError)
    async def _too_large(request, exc):
        return _error(413, str(exc))

    @app.exception_handler(CheckpointError)
    async def _no_model(request, exc):
        return _error(503, f"model unavailable: {exc}")

    @app.exception_handler(StoreError)
    async def _bad_store(request, exc):  # the server's files, not the request, are at fault
        return _error(500, str(exc))

    @app.exception_handler(ValueError)
    async def _bad_value(request, exc):
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(
                422, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})"
            )
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return _error(422, f"{where}: {message}")

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        return _error(500, f"internal error: {type(exc).__name__}")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if state.ready.is_set():
            return {"status": "ready", "models": state.pool.resident}
        return JSONResponse(
            {"status": "failed" if state.load_error else "loading", "error": state.load_error}, status_code=503
        )

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/info")
    async def info():
        return {
            "name": "sam2flow",
            "version": __version__,
            "family": settings.family,
            "device": settings.device,
            "dtype": settings.dtype,
            "models": state.pool.resident,
            "backends": {v: state.pool.get(v).backend for v in state.pool.resident},
            "max_batch_size": settings.embed_batch_size(),
            "max_prompts": settings.max_prompts,
            "url_images": settings.allow_url_images,
        }

    async def embedding_for(version: str, image_ref, image_id: str | None) -> tuple[Sam2Engine, ImageEmbedding]:
        engine = await state.engine_async(version)
        if image_ref is None:
            cached = state.by_id.get((version, image_id)) if image_id else None
            if cached is None:
                raise ValueError(
                    "no image given and no cached embedding for that image_id"
                    if image_id
                    else "the request has no image"
                )
            return engine, cached
        image = await run_in_threadpool(load_wire_image, image_ref.model_dump(), "image", limits)
        emb = await asyncio.wrap_future(state.batcher.submit(engine, image))
        state.by_id.put((version, image_id or emb.image_id), emb)
        return engine, emb

    @app.post("/sam2/embed_image")
    async def embed_image(body: EmbedRequest, request: Request):
        _authorize(state, request, body.api_key)
        start = time.perf_counter()
        _, emb = await embedding_for(body.sam2_version_id, body.image, body.image_id)
        return {"image_id": body.image_id or emb.image_id, "time": time.perf_counter() - start}

    @app.post("/sam2/segment_image")
    async def segment_image(body: SegmentRequest, request: Request):
        _authorize(state, request, body.api_key)
        start = time.perf_counter()
        prompts = _prompts(body, settings.prompt_budget())
        engine, emb = await embedding_for(body.sam2_version_id, body.image, body.image_id)
        if prompts is None:
            config = AutomaticConfig(points_per_side=settings.automatic_points_per_side)
            result = await run_in_threadpool(engine.automatic, emb, config)
            masks, scores, logits = result.masks, result.scores, None
        else:
            key = (body.sam2_version_id, emb.key)
            if body.load_logits_from_cache:
                prompts = _with_cached_logits(prompts, state.logits.get(key))
            result = await asyncio.wrap_future(
                engine.submit_click(
                    engine.predict_prompts,
                    emb,
                    prompts,
                    body.multimask_output,
                    body.max_hole_area,
                    body.max_sprinkle_area,
                )
            )
            masks, scores, logits = result.masks, result.scores, result.low_res_logits
            if body.save_logits_to_cache:
                state.logits.put(key, ([_signature(p) for p in prompts], logits))
        if body.format == "binary":
            buf = io.BytesIO()
            arrays = {"masks": masks, "scores": scores}
            if logits is not None:
                arrays["low_res_logits"] = logits
            np.savez_compressed(buf, **arrays)
            return Response(buf.getvalue(), media_type="application/octet-stream")
        predictions = await run_in_threadpool(_format_predictions, masks, scores, body.format)
        return {"predictions": predictions, "time": time.perf_counter() - start}

    @app.post("/workflows/run")
    async def workflows_run(body: WorkflowRunRequest, request: Request):
        _authorize(state, request, body.api_key)
        start = time.perf_counter()

        def run():
            results = serialize_outputs(
                run_workflow(
                    body.specification,
                    body.inputs,
                    state,
                    image_loader=wire_loader(limits),
                    budget=settings.prompt_budget(),
                )
            )
            excluded = set(body.excluded_fields or ())
            return [{k: v for k, v in r.items() if k not in excluded} for r in results]

        outputs = await run_in_threadpool(run)
        return {"outputs": outputs, "profiler_trace": [], "time": time.perf_counter() - start}

    app.include_router(page_router(state, lambda request, key: _authorize(state, request, key)))
    app.include_router(label_studio_router(settings, state, lambda request: _authorize(state, request, None)))
    if settings.max_body_bytes:
        app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app
