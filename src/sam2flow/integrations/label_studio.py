"""Label Studio's ML backend protocol on a ``SegmentingEngine``: interactive and batch pre-annotation.

Label Studio (LS) calls an ML backend over HTTP with JSON (the server's routes: ``server/label_studio.py``):

- ``GET /health`` → ``{"status": "UP", "model_class": name}``; ``POST /setup`` ``{"project", "schema",
  "hostname", "access_token", "extra_params"}`` → ``{"model_version": v}`` (LS calls both when a backend
  is connected and before each batch of predictions);
- ``POST /predict`` ``{"tasks": [...], "project": "<id>.<created>", "label_config": XML, "params":
  {"login", "password", "context"}}`` → ``{"results": [prediction, ...]}``, one prediction per task,
  in task order; a prediction is ``{"result": [region, ...], "score", "model_version"}``;
- ``POST /webhook`` ``{"action", "project", ...}``: training events, accepted and ignored here.

**Interactive** (``params.context.result`` is set): the smart regions the user just drew, in LS's
percent coordinates (0..100 of the image's width and height, origin at its top-left corner):
``keypointlabels`` clicks (``is_positive`` false for a negative click, alt-click in LS's UI),
``rectanglelabels`` boxes (``x``, ``y`` the top-left corner, ``width``, ``height``, ``rotation`` in
degrees about that corner), each with ``original_width``/``original_height`` in pixels. Every click
and the last box form one prompt; the answer is one region of the project's output control, labelled
with the prompt's label. **Batch** ("Retrieve predictions", no context): a task whose latest annotation
(else latest prediction) holds ``rectanglelabels`` boxes gets one mask per box with that box's label;
a task without boxes gets the engine's unprompted masks, labelled with the output control's first label.

Output regions: ``BrushLabels`` (preferred when the config has both) as LS's brush RLE, made by
``label-studio-sdk``'s ``converter.brush.mask2rle`` (the RLE of the mask's RGBA pixels, 0 or 255 in
every channel); or ``PolygonLabels``: one region per connected part of the mask, its outline's pixel
centres as percent points. Every region carries its label and the mask's predicted IoU as ``score``.

Images: a task's image value is a URL. One relative to LS (``/data/upload/...``,
``/data/local-files/?d=...``) or on LS's own host is fetched from ``label_studio_url`` with
``label_studio_api_key`` (a legacy token, or a personal access token: see ``TaskImages``); another
http(s) URL only when the server's URL images are enabled (``ImageLimits.allow_urls``), without the
key; ``data:`` URLs are decoded. All within the server's image limits (``sam2flow.images``). An
image is embedded once: the engine caches by content.

Where the protocol was read (reference only, no code taken): ``HumanSignal/label-studio-ml-backend``
at d02cedf35d0e (``label_studio_ml/api.py``: routes, request and answer bodies, basic auth;
``label_studio_ml/examples/segment_anything_2_image/model.py``: context results and brush regions);
``label-studio`` 1.23.2 as installed (``label_studio/ml/api_connector.py``: what LS sends to
``/predict``, ``/setup``, ``/health``, ``/webhook``, and basic auth as its only credentials;
``ml/models.py``: ``interactive_annotating`` takes ``results[0]``, ``predict_tasks`` one prediction
per task or a list per task; its UI bundle ``web/dist/apps/labelstudio/358.js``: a smart keypoint
serialises ``is_positive = !negative``); Label Studio's tag docs (labelstud.io/tags: ``KeyPointLabels``,
``RectangleLabels``, ``BrushLabels``, ``PolygonLabels`` result fields).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urljoin, urlsplit

import numpy as np

from ..engine.prompts import Prompt
from ..engine.types import ScoredMasks, SegmentingEngine
from ..formats import mask_to_polygons
from ..images import ImageLimits, decode_base64_image, decode_image_bytes, fetch_url

OUTPUT_TAGS = ("BrushLabels", "PolygonLabels")  # what is answered, in order of preference
DEFAULT_LABEL = "object"  # an output control without labels
MODEL_CLASS = "Sam2flow"  # what /health names


# ---- the label config ----------------------------------------------------------------------


@dataclass(frozen=True)
class Control:
    """One control tag of a label config: ``tag`` (e.g. ``BrushLabels``), ``name`` (the results'
    ``from_name``), ``to_name`` (the Image tag it labels) and its ``labels`` (``<Label value>``)."""

    tag: str
    name: str
    to_name: str
    labels: tuple[str, ...]

    @property
    def type(self) -> str:
        """The ``type`` of its results (``brushlabels``, ...)."""
        return self.tag.lower()

    def label_for(self, label: str | None) -> str:
        """The label an answer carries: the prompt's, which must be one of ours when we have any."""
        if label is None:
            return self.labels[0] if self.labels else DEFAULT_LABEL
        if self.labels and label not in self.labels:
            raise ValueError(f"label {label!r} is not one of {self.tag} {self.name!r}'s labels {list(self.labels)}")
        return label


@dataclass(frozen=True)
class LabelConfig:
    """What sam2flow needs of a project's label config: the output control (brush or polygons), the
    Image tag it labels (``image_name``) and the task data key of that image (``image_key``)."""

    output: Control
    image_name: str
    image_key: str


def _tag(element: ET.Element) -> str:
    return element.tag.lower()


def parse_label_config(xml: str) -> LabelConfig:
    """A project's label config (LS's XML) → ``LabelConfig``; ``ValueError`` naming what is missing.

    Tag names are matched without regard to case, as LS does. Documents with a DTD or entities are
    refused (nothing in a label config needs them, and entity expansion is a denial of service).
    """
    if not isinstance(xml, str) or not xml.strip():
        raise ValueError("label_config: missing (the project's labeling configuration, XML)")
    if "<!DOCTYPE" in xml.upper() or "<!ENTITY" in xml.upper():
        raise ValueError("label_config: a DTD or entity declaration is not allowed")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ValueError(f"label_config: not well-formed XML ({e})") from None
    images = {
        e.get("name"): e.get("value", "").lstrip("$") for e in root.iter() if _tag(e) == "image" and e.get("name")
    }
    for tag in OUTPUT_TAGS:
        for e in root.iter():
            to_name = e.get("toName") or e.get("toname")
            if _tag(e) == tag.lower() and e.get("name") and to_name in images:
                labels = tuple(c.get("value") for c in e if _tag(c) == "label" and c.get("value"))
                control = Control(tag, e.get("name"), to_name, labels)
                if not images[to_name]:
                    raise ValueError(f'label_config: Image {to_name!r} has no value (e.g. value="$image")')
                return LabelConfig(control, to_name, images[to_name])
    raise ValueError(
        f"label_config: no {' or '.join(OUTPUT_TAGS)} tag labels an Image tag (toName naming an <Image name>)"
    )


# ---- prompts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """One prompt in pixels, read from LS results: the ``Prompt`` and its label (None: unlabelled)."""

    prompt: Prompt
    label: str | None


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _label(value: Mapping, kind: str) -> str | None:
    labels = value.get(kind) or value.get("labels") or []
    return str(labels[0]) if isinstance(labels, list) and labels else None


def box_pixels(value: Mapping, hw: tuple[int, int], where: str) -> list[float]:
    """A ``rectanglelabels`` value (percent; ``rotation`` degrees clockwise about its top-left corner)
    → ``[x1, y1, x2, y2]`` pixels: the rectangle's axis-aligned bounds."""
    h, w = hw
    x, y = _number(value.get("x"), f"{where}.x") * w / 100, _number(value.get("y"), f"{where}.y") * h / 100
    bw = _number(value.get("width"), f"{where}.width") * w / 100
    bh = _number(value.get("height"), f"{where}.height") * h / 100
    angle = math.radians(_number(value.get("rotation", 0), f"{where}.rotation"))
    cos, sin = math.cos(angle), math.sin(angle)
    xs = [x + dx * cos - dy * sin for dx, dy in ((0, 0), (bw, 0), (0, bh), (bw, bh))]
    ys = [y + dx * sin + dy * cos for dx, dy in ((0, 0), (bw, 0), (0, bh), (bw, bh))]
    return [min(xs), min(ys), max(xs), max(ys)]


def point_pixels(value: Mapping, hw: tuple[int, int], where: str) -> list[float]:
    """A ``keypointlabels`` value (``x``, ``y`` percent) → ``[x, y]`` pixels."""
    h, w = hw
    return [_number(value.get("x"), f"{where}.x") * w / 100, _number(value.get("y"), f"{where}.y") * h / 100]


def _results_on(results: Any, image_name: str, where: str) -> list[tuple[str, Mapping]]:
    if not isinstance(results, list):
        raise ValueError(f"{where} must be a list of results")
    out = []
    for i, item in enumerate(results):
        if not isinstance(item, Mapping) or not isinstance(item.get("value"), Mapping):
            raise ValueError(f"{where}[{i}] must be a result with a 'value' object")
        if item.get("to_name", image_name) == image_name:
            out.append((f"{where}[{i}]", item))
    return out


def interactive_region(results: Any, image_name: str, hw: tuple[int, int]) -> Region:
    """``context.result`` (LS's smart regions on the image) → one prompt: every click, the last box.

    Clicks are ``keypointlabels`` (or ``keypoint``) with ``is_positive`` (absent: positive); boxes
    ``rectanglelabels`` (or ``rectangle``). The label is the last labelled region's. Percentages are of
    the fetched image's size ``hw`` (H, W), whatever ``original_width``/``original_height`` say.
    """
    points, labels, box, label = [], [], None, None
    for where, item in _results_on(results, image_name, "context.result"):
        kind, value = str(item.get("type", "")), item["value"]
        if kind in ("keypointlabels", "keypoint"):
            points.append(point_pixels(value, hw, f"{where}.value"))
            labels.append(0 if item.get("is_positive", True) is False else 1)
        elif kind in ("rectanglelabels", "rectangle"):
            box = box_pixels(value, hw, f"{where}.value")
        else:
            continue
        label = _label(value, kind) or label
    if box is None and 1 not in labels:
        raise ValueError("context.result: no box and no positive click on the image")
    return Region(Prompt(box=box, points=points or None, labels=labels or None), label)


def task_boxes(task: Mapping, image_name: str, hw: tuple[int, int]) -> list[Region]:
    """The boxes a task already holds, in pixels of its image (``hw``: H, W): the ``rectanglelabels``
    of its latest annotation that has any (cancelled ones skipped), else of its latest prediction
    that has any; [] when none."""
    for source in ("annotations", "predictions"):
        items = task.get(source) or []
        for k in range(len(items) - 1, -1, -1):
            item = items[k]
            if not isinstance(item, Mapping) or item.get("was_cancelled"):
                continue
            regions = []
            for where, r in _results_on(item.get("result") or [], image_name, f"task.{source}[{k}].result"):
                if r.get("type") in ("rectanglelabels", "rectangle"):
                    prompt = Prompt(box=box_pixels(r["value"], hw, f"{where}.value"))
                    regions.append(Region(prompt, _label(r["value"], str(r["type"]))))
            if regions:
                return regions
    return []


# ---- answers -------------------------------------------------------------------------------


class SdkMissing(RuntimeError):
    """label-studio-sdk is not installed, and a project wants brush masks (the server answers 503)."""


def _mask2rle() -> Callable[[np.ndarray], list[int]]:
    try:
        from label_studio_sdk.converter.brush import mask2rle
    except ImportError:
        raise SdkMissing(
            "Label Studio brush masks need label-studio-sdk on the server: pip install 'sam2flow[label-studio]'"
        ) from None
    return mask2rle


def brush_rle(mask: np.ndarray) -> list[int]:
    """An (H, W) bool mask → LS's brush RLE (label-studio-sdk's encoder, 255 in every RGBA channel)."""
    return [int(v) for v in _mask2rle()(mask.astype(np.uint8) * 255)]


def mask_from_brush_rle(rle: Sequence[int], hw: tuple[int, int]) -> np.ndarray:
    """Inverse of ``brush_rle`` with label-studio-sdk's decoder: → (H, W) bool (alpha > 0)."""
    from label_studio_sdk.converter.brush import decode_rle

    h, w = hw
    return decode_rle(list(rle)).reshape(h, w, 4)[:, :, 3] > 0


def polygon_percent(mask: np.ndarray) -> list[list[list[float]]]:
    """An (H, W) mask → each connected part's outline as ``[[x, y], ...]`` percent of the image.

    A vertex is a boundary pixel's centre (column ``c`` → ``(c + 0.5) / W * 100``), as LS draws in
    continuous coordinates; largest part first (``formats.mask_to_polygons``).
    """
    h, w = mask.shape
    scale = np.array([100.0 / w, 100.0 / h])
    return [((poly + 0.5) * scale).tolist() for poly in mask_to_polygons(mask)]


def regions_for(mask: np.ndarray, score: float, label: str, config: LabelConfig) -> list[dict]:
    """One mask → the LS result regions of the output control (one brush, or one polygon per part)."""
    h, w = mask.shape
    control = config.output
    base = {
        "from_name": control.name,
        "to_name": config.image_name,
        "type": control.type,
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "score": float(score),
        "readonly": False,
    }
    if control.tag == "BrushLabels":
        value = {"format": "rle", "rle": brush_rle(mask), control.type: [label]}
        return [{"id": uuid.uuid4().hex[:10], **base, "value": value}]
    return [
        {"id": uuid.uuid4().hex[:10], **base, "value": {"points": points, "closed": True, control.type: [label]}}
        for points in polygon_percent(mask)
    ]


def prediction(regions: list[dict], scores: Sequence[float], model_version: str) -> dict:
    """One task's prediction: its regions, the mean score of its masks, the model version."""
    score = float(np.mean(scores)) if len(scores) else 0.0
    return {"result": regions, "score": score, "model_version": model_version}


# ---- images --------------------------------------------------------------------------------


class TaskImages:
    """Fetches task images: from Label Studio at ``url`` with its ``api_key``, other URLs only when
    ``limits.allow_urls``; every image within ``limits``. Safe to share between threads.

    The key is a legacy token (sent as ``Authorization: Token <key>``) or a personal access token (a
    JWT, the newer kind of LS key), which is exchanged at ``/api/token/refresh/`` for a short-lived access
    token sent as ``Authorization: Bearer ...`` and kept until a minute before it expires.
    """

    def __init__(self, url: str | None, api_key: str | None, limits: ImageLimits, fetch: Callable = fetch_url):
        self.url, self.api_key, self.limits, self.fetch = url, api_key, limits, fetch
        self._access: tuple[str, float] | None = None  # (access token, when to renew it: time.time())
        self._lock = threading.Lock()

    def load(self, ref: Any, where: str = "task image") -> np.ndarray:
        """A task's image value (a URL, relative to LS or not, or a ``data:`` URL) → RGB (H, W, 3)."""
        if not isinstance(ref, str) or not ref:
            raise ValueError(f"{where}: expected the image's URL, got {type(ref).__name__}")
        if ref.startswith("data:"):
            return decode_base64_image(ref, where, self.limits)
        if not urlsplit(ref).scheme:
            if not self.url:
                raise ValueError(
                    f"{where}: {ref[:80]!r} is relative to Label Studio: set LABEL_STUDIO_URL "
                    "(and LABEL_STUDIO_API_KEY)"
                )
            ref = urljoin(self.url.rstrip("/") + "/", ref.lstrip("/"))
        if self.url and urlsplit(ref).netloc == urlsplit(self.url).netloc:
            host = urlsplit(ref).hostname or ""
            limits = replace(self.limits, allow_urls=True, url_hosts=(*(self.limits.url_hosts or ()), host))
            return decode_image_bytes(self.fetch(ref, where, limits, self._headers()), where, limits)
        if not self.limits.allow_urls:
            raise ValueError(
                f"{where}: {ref[:80]!r} is not on Label Studio's host; URL images are disabled on this server "
                "(SAM2FLOW_ALLOW_URL_IMAGES=true enables them)"
            )
        return decode_image_bytes(self.fetch(ref, where, self.limits), where, self.limits)

    def _headers(self) -> dict[str, str] | None:
        if not self.api_key:
            return None
        if self.api_key.count(".") != 2:  # a legacy token
            return {"Authorization": f"Token {self.api_key}"}
        with self._lock:
            if self._access is None or time.time() >= self._access[1]:
                self._access = self._refresh()
            return {"Authorization": f"Bearer {self._access[0]}"}

    def _refresh(self) -> tuple[str, float]:
        """The personal access token → (access token, renewal time)."""
        import requests

        url = urljoin(self.url.rstrip("/") + "/", "api/token/refresh/")
        try:
            r = requests.post(url, json={"refresh": self.api_key}, timeout=self.limits.url_timeout_s)
            access = r.json().get("access") if r.status_code == 200 else None
        except (requests.RequestException, ValueError):
            raise ValueError(f"Label Studio at {self.url} cannot be reached to renew the API token") from None
        if not isinstance(access, str):
            raise ValueError(f"Label Studio refused LABEL_STUDIO_API_KEY (HTTP {r.status_code} from {url})")
        return access, _expiry(access) - 60


def _expiry(jwt: str) -> float:
    """A JWT's ``exp`` (seconds since the epoch), read without checking its signature (LS checks it);
    now when it has none, so the token is renewed each time."""
    try:
        payload = jwt.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError, binascii.Error):
        return time.time()


# ---- the backend ---------------------------------------------------------------------------


class LabelStudioBackend:
    """LS's ``/predict`` and ``/setup`` on an engine: ``engine()`` hands out the ``SegmentingEngine``
    (loaded on first use), ``automatic`` configures unprompted masks (``None``: the engine's default).
    Safe to share between threads."""

    def __init__(
        self,
        engine: Callable[[], SegmentingEngine],
        images: TaskImages,
        model_version: str,
        automatic: Any = None,
    ):
        self.engine, self.images, self.model_version, self.automatic = engine, images, model_version, automatic

    def health(self) -> dict:
        return {"status": "UP", "model_class": MODEL_CLASS}

    def setup(self, body: Any) -> dict:
        """``/setup``: check the project's config (``schema``) now, and that brush masks can be encoded,
        so LS shows what is wrong when the backend is connected."""
        if not isinstance(body, Mapping):
            raise ValueError("the request body must be a JSON object")
        if body.get("schema") and parse_label_config(body["schema"]).output.tag == "BrushLabels":
            _mask2rle()
        return {"model_version": self.model_version}

    def predict(self, body: Any) -> dict:
        """``/predict`` → ``{"results": [one prediction per task]}`` (see the module docstring)."""
        if not isinstance(body, Mapping):
            raise ValueError("the request body must be a JSON object")
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, Mapping) for t in tasks):
            raise ValueError("tasks: expected a list of task objects")
        config = parse_label_config(body.get("label_config"))
        params = body.get("params") or {}
        context = params.get("context") if isinstance(params, Mapping) else None
        if isinstance(context, Mapping) and context.get("result"):
            if len(tasks) != 1:
                raise ValueError(f"an interactive request holds one task, got {len(tasks)}")
            return {"results": [self._interactive(tasks[0], context["result"], config)]}
        return {"results": [self._batch(task, config, f"tasks[{i}]") for i, task in enumerate(tasks)]}

    def _image(self, task: Mapping, config: LabelConfig, where: str) -> np.ndarray:
        data = task.get("data")
        if not isinstance(data, Mapping) or config.image_key not in data:
            raise ValueError(f"{where}.data has no {config.image_key!r} (the Image tag's value)")
        return self.images.load(data[config.image_key], f"{where}.data.{config.image_key}")

    def _interactive(self, task: Mapping, results: Any, config: LabelConfig) -> dict:
        image = self._image(task, config, "tasks[0]")
        region = interactive_region(results, config.image_name, image.shape[:2])
        label = config.output.label_for(region.label)
        engine = self.engine()
        embedding = engine.embed([image])[0]
        found = engine.predict_prompts(embedding, [region.prompt], multimask_output=_ambiguous(region.prompt))
        return prediction(regions_for(found.masks[0], found.scores[0], label, config), found.scores, self.model_version)

    def _batch(self, task: Mapping, config: LabelConfig, where: str) -> dict:
        image = self._image(task, config, where)
        boxes = task_boxes(task, config.image_name, image.shape[:2])
        engine = self.engine()
        embedding = engine.embed([image])[0]
        if boxes:
            found: ScoredMasks = engine.predict_prompts(embedding, [b.prompt for b in boxes], multimask_output=False)
            labels = [config.output.label_for(b.label) for b in boxes]
        else:
            found = engine.automatic(embedding, self.automatic)
            labels = [config.output.label_for(None)] * len(found.scores)
        kept = [(m, s, label) for m, s, label in zip(found.masks, found.scores, labels) if m.any()]
        regions = [r for m, s, label in kept for r in regions_for(m, s, label, config)]
        return prediction(regions, [float(s) for s in found.scores], self.model_version)


def _ambiguous(prompt: Prompt) -> bool:
    """SAM's advice: three candidates for an ambiguous prompt (one click alone)."""
    return prompt.box is None and len(prompt.points or ()) == 1
