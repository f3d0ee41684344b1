"""The labelling page: ``GET /`` and the small JSON routes it calls, as an ``APIRouter`` of the server app.

The page (``static/``: plain HTML, JS and CSS, nothing fetched from elsewhere) embeds each image once
(``POST /sam2/embed_image``, or ``POST /page/folder/embed`` in folder mode), then every click is one
decode (``POST /page/decode``) answering only what the page draws: the new mask as COCO RLE, its box
and its score. Click-to-refine: the low-resolution logits of every answered prompt are cached under
the prompt itself, so a prompt that adds one point to an earlier one (of any object, after undo too)
gets that prompt's logits as mask input, as SAM's interactive loop does.

Routes (all but ``/``, the static files and ``/page/config`` need the API key when one is set):

- ``GET /page/config``: whether a key is needed, the class list, folder mode, the default version.
- ``POST /page/decode``: ``{"image_id", "box"?: [x1, y1, x2, y2], "points": [[x, y, label], ...],
  "max_hole_area", "max_sprinkle_area", "sam2_version_id"}`` → ``{"rle", "box", "score", "time"}``.
- ``POST /page/export``: objects of one image → COCO (RLE or polygons) or the CLI's prediction JSON.
- Folder mode (``sam2flow serve --images DIR``): ``GET /page/folder`` (the images and their object
  counts), ``GET /page/folder/file/{name}`` (the image's bytes), ``POST /page/folder/embed``,
  ``GET``/``PUT /page/folder/objects/{name}``, ``GET /page/folder/coco``. A name that is not an image
  inside DIR gets 404 and nothing else.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pycocotools import mask as mask_utils
from pydantic import BaseModel, Field, field_validator

from ..engine.prompts import Prompt
from ..formats import detections_to_predictions, mask_to_rle, rle_to_mask
from ..images import read_image_file
from .folder import FolderStore, LabelledImage, LabelledObject, category_names, coco_document

STATIC = {"page.js": "text/javascript", "page.css": "text/css"}
MAX_POINTS = 64  # clicks on one object


def _finite(values: list[float]) -> list[float]:
    if not all(math.isfinite(v) for v in values):
        raise ValueError("coordinates must be finite numbers")
    return values


class DecodeRequest(BaseModel):
    """One object's prompt on an embedded image; coordinates in image pixels."""

    image_id: str = Field(max_length=256)
    sam2_version_id: str = "hiera_tiny"
    box: list[float] | None = Field(default=None, min_length=4, max_length=4)
    points: list[list[float]] = Field(default_factory=list, max_length=MAX_POINTS)  # [x, y, label 1|0]
    max_hole_area: int = Field(default=0, ge=0)
    max_sprinkle_area: int = Field(default=0, ge=0)
    api_key: str | None = None

    @field_validator("box")
    @classmethod
    def _box(cls, v):
        return None if v is None else _finite(v)

    @field_validator("points")
    @classmethod
    def _points(cls, v):
        for p in v:
            if len(p) != 3 or p[2] not in (0, 1):
                raise ValueError("each point is [x, y, label] with label 1 (positive) or 0 (negative)")
            _finite(p)
        return v

    def signature(self, n_points: int | None = None) -> tuple:
        """The prompt (or its first ``n_points`` clicks) as plain tuples: the logits cache key."""
        pts = self.points if n_points is None else self.points[:n_points]
        return (tuple(self.box) if self.box else None, tuple(tuple(p) for p in pts))

    def prompt(self, mask_input: np.ndarray | None) -> Prompt:
        pts = [[p[0], p[1]] for p in self.points] or None
        labels = [int(p[2]) for p in self.points] or None
        return Prompt(box=self.box, points=pts, labels=labels, mask_input=mask_input)

    @property
    def multimask_output(self) -> bool:
        """SAM's advice: three candidates for an ambiguous prompt (one click, or a box with at most one)."""
        return len(self.points) <= 1


class PageObject(BaseModel):
    label: str
    rle: dict
    score: float | None = None
    prompt: dict | None = None


class ObjectsBody(BaseModel):
    objects: list[PageObject] = Field(default_factory=list, max_length=10_000)
    api_key: str | None = None


class ExportRequest(ObjectsBody):
    file_name: str = Field(default="image.png", max_length=1000)
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    labels: list[str] = Field(default_factory=list)
    format: Literal["coco", "coco-polygons", "roboflow"] = "coco"


class FolderEmbedRequest(BaseModel):
    name: str = Field(max_length=4096)
    sam2_version_id: str = "hiera_tiny"
    api_key: str | None = None


def _not_found() -> JSONResponse:
    return JSONResponse({"error": "no such image in the folder"}, status_code=404)


def _parse_objects(objects: list[PageObject], hw: tuple[int, int]) -> list[LabelledObject]:
    return [LabelledObject.parse(o.model_dump(), hw, f"objects.{i}") for i, o in enumerate(objects)]


def roboflow_predictions(image: LabelledImage, labels: list[str]) -> dict:
    """One image's objects as the CLI's prediction JSON (``sam2flow segment``'s output, polygons)."""
    import supervision as sv

    h, w = image.hw
    names = category_names(labels, [image])
    masks = np.stack([rle_to_mask(o.rle) for o in image.objects]) if image.objects else np.zeros((0, h, w), bool)
    xyxy = np.array(
        [
            [x, y, x + bw, y + bh]
            for x, y, bw, bh in (
                mask_utils.toBbox({"size": [h, w], "counts": o.rle["counts"].encode()}) for o in image.objects
            )
        ],
        np.float32,
    ).reshape(-1, 4)
    dets = sv.Detections(
        xyxy=xyxy,
        mask=masks,
        confidence=np.array([o.score or 0.0 for o in image.objects], np.float32),
        class_id=np.array([names.index(o.label) for o in image.objects], int),
        data={"class_name": np.array([o.label for o in image.objects], dtype=object)},
    )
    return {"image": {"width": w, "height": h}, "predictions": detections_to_predictions(dets)}


def page_router(state, authorize: Callable[[Request, str | None], None]) -> APIRouter:
    """The page's routes for one app: ``state`` is its ``ServerState``, ``authorize`` its key check."""
    settings = state.settings
    router = APIRouter()
    logits = _logits_cache(settings)
    folder = (
        FolderStore(settings.images, settings.annotations or _default_annotations(settings.images), settings.labels)
        if settings.images
        else None
    )
    sizes: dict[str, tuple[int, int]] = {}  # folder image → (height, width), from its decode
    default_version = (settings.preload or ["hiera_tiny"])[0]

    @router.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(_static("index.html"))

    @router.get("/page/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in STATIC:
            return JSONResponse({"error": "not found"}, status_code=404)
        return Response(_static(name), media_type=STATIC[name])

    @router.get("/page/config")
    async def config():
        return {
            "auth": bool(settings.api_key),
            "labels": settings.labels,
            "folder": folder is not None,
            "version": default_version,
            "max_body_bytes": settings.max_body_bytes,
            "max_image_pixels": settings.max_image_pixels,
        }

    @router.post("/page/decode")
    async def decode(body: DecodeRequest, request: Request):
        authorize(request, body.api_key)
        start = time.perf_counter()
        if body.box is None and not body.points:
            raise ValueError("a prompt needs a box or at least one point")
        engine = await state.engine_async(body.sam2_version_id)
        emb = state.by_id.get((body.sam2_version_id, body.image_id))
        if emb is None:
            raise ValueError("no cached embedding for that image_id: embed the image first")
        key = (body.sam2_version_id, emb.key)
        previous = logits.get((*key, body.signature(len(body.points) - 1))) if body.points else None

        def run():
            result = engine.predict_prompts(
                emb, [body.prompt(previous)], body.multimask_output, body.max_hole_area, body.max_sprinkle_area
            )
            logits.put((*key, body.signature()), result.low_res_logits[0])
            rle = mask_to_rle(result.masks[0])
            x, y, w, h = mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()})
            box = [float(x), float(y), float(x + w), float(y + h)] if w > 0 else None
            return {"rle": rle, "box": box, "score": float(result.scores[0]), "refined": previous is not None}

        answer = await asyncio.wrap_future(engine.submit_click(run))  # on the compute thread: no worker hop
        return {**answer, "time": time.perf_counter() - start}

    @router.post("/page/export")
    async def export(body: ExportRequest, request: Request):
        authorize(request, body.api_key)
        image = LabelledImage(
            body.file_name, (body.height, body.width), _parse_objects(body.objects, (body.height, body.width))
        )
        if body.format == "roboflow":
            return await run_in_threadpool(roboflow_predictions, image, body.labels)
        return await run_in_threadpool(coco_document, [image], body.labels, body.format == "coco-polygons")

    if folder is None:
        return router

    @router.get("/page/folder")
    async def folder_list(request: Request):
        authorize(request, None)
        counts = folder.counts()
        names = await run_in_threadpool(folder.names)
        return {
            "images": [{"name": n, "objects": counts.get(n, 0), "saved": n in counts} for n in names],
            "labels": folder.labels,
            "annotations": str(folder.path),
        }

    @router.get("/page/folder/file/{name:path}")
    async def folder_file(name: str, request: Request):
        authorize(request, None)
        path = folder.resolve(name)
        return _not_found() if path is None else FileResponse(path)

    @router.post("/page/folder/embed")
    async def folder_embed(body: FolderEmbedRequest, request: Request):
        authorize(request, body.api_key)
        path = folder.resolve(body.name)
        if path is None:
            return _not_found()
        start = time.perf_counter()
        engine = await state.engine_async(body.sam2_version_id)
        image = await run_in_threadpool(read_image_file, path, body.name, settings.image_limits())
        emb = await asyncio.wrap_future(state.batcher.submit(engine, image))
        image_id = emb.key.split("|")[-1]
        state.by_id.put((body.sam2_version_id, image_id), emb)
        sizes[body.name] = image.shape[:2]
        return {
            "image_id": image_id,
            "width": image.shape[1],
            "height": image.shape[0],
            "time": time.perf_counter() - start,
        }

    @router.get("/page/folder/objects/{name:path}")
    async def folder_objects(name: str, request: Request):
        authorize(request, None)
        if folder.resolve(name) is None:
            return _not_found()
        image = folder.objects(name)
        objects = [] if image is None else [vars(o) for o in image.objects]
        return {"name": name, "objects": objects}

    @router.put("/page/folder/objects/{name:path}")
    async def folder_save(name: str, body: ObjectsBody, request: Request):
        authorize(request, body.api_key)
        path = folder.resolve(name)
        if path is None:
            return _not_found()
        if name not in sizes:
            image = await run_in_threadpool(read_image_file, path, name, settings.image_limits())
            sizes[name] = image.shape[:2]
        labelled = LabelledImage(name, sizes[name], _parse_objects(body.objects, sizes[name]))
        await run_in_threadpool(folder.save, labelled)
        return {"name": name, "saved": len(labelled.objects)}

    @router.get("/page/folder/coco")
    async def folder_coco(request: Request):
        authorize(request, None)
        return await run_in_threadpool(folder.document)

    return router


def _default_annotations(images: str) -> str:
    """``--annotations`` default: ``<folder name>.coco.json`` in the current directory."""
    return f"{Path(images).resolve().name or 'images'}.coco.json"


def _logits_cache(settings):
    from ..engine.cache import EmbeddingCache

    return EmbeddingCache(settings.cache_entries * 64, 1 << 30)


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()
