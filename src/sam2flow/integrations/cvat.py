"""CVAT serverless functions (nuclio): SAM2 as an interactor and as a detector.

CVAT's lambda manager calls a nuclio function with a JSON body and passes its JSON answer on.
``CvatFunction`` speaks that protocol with any ``SegmentingEngine`` (``Sam2Engine``, or
``RemoteEngine`` forwarding to a running ``sam2flow serve``); ``init_context`` and ``handler`` are
the nuclio entry points (``deploy/cvat/sam2/main.py`` only wires nuclio to them).

**Interactor** (``type: interactor``). Request ``{"image": base64 frame, "pos_points": [[x, y], ...],
"neg_points": [[x, y], ...], "obj_bbox": null | [[x1, y1], [x2, y2]], "threshold"?: t}``; points and
box corners are image pixels of the frame (x right, y down, 0 at the top-left corner of the image).
Answer ``{"mask": rows, "bounds": [x_min, y_min, x_max, y_max]}``: the mask cropped to its bounding
box (inclusive pixel columns and rows), one list of 0/255 per row, as CVAT's own SAM hands it to
the UI. Clicks go to SAM2 positives first, then negatives. A frame is embedded once (the engine's
cache is keyed by image content), so later clicks on it only decode; when a request's clicks extend
the previous request's on the same frame (same box, earlier clicks kept in order, more added), the
previous low-resolution logits are the new prompt's ``mask_input``, as SAM's click-to-refine does.

**Detector** (``type: detector``). Request ``{"image": base64 frame, "threshold"?: t}``; answer a
list of CVAT mask shapes ``{"type": "mask", "label": name, "confidence": score, "mask": [v, ...,
x_min, y_min, x_max, y_max], "points": [x1, y1, x2, y2, ...]}`` from unprompted mode: ``mask`` is
the shape cropped to its inclusive bounding box, flattened row by row as 0/1, with the box appended
(the lambda manager run-length encodes it into CVAT's stored form); ``points`` is its largest outline
(pixel indices), used when the user has CVAT convert masks to polygons.

``threshold`` (optional for both; CVAT's UI sends it to detectors only) is the least predicted IoU
of an answered mask. Bad requests get ``{"error": message}`` with a 4xx status (400, or 413 for an
image over the pixel limit, 422 when a valid prompt finds no object); ``handler`` never raises
(500 for an internal failure, 502 when the forwarding server fails).

Where the protocol was read (github.com/cvat-ai/cvat, the stored copy of each file at the commit
given; reference only, no code taken):

- ``cvat/apps/lambda_manager/views.py`` (e4c12a27d406; older releases 024777ef335b):
  ``LambdaFunction.__init__`` reads the annotations ``type``, ``spec``, ``name``, ``version``,
  ``min_pos_points``, ``min_neg_points``, ``startswith_box``, ``help_message``, ``animated_gif`` and
  ``spec.description``; ``invoke`` builds the bodies above (``obj_bbox`` from the UI's request, or in
  older releases the first two ``pos_points`` of a ``startswith_box`` function; ``threshold`` only
  when set); ``_call_detector`` reads ``label``, ``type``, ``mask`` (its last four values the box)
  and ``points``; ``return_response``: a function's 4xx/5xx reaches the user as its status and
  reason phrase (``requests``' ``HTTPError`` text), not as the message body, which therefore also
  goes to the function's log.
- ``cvat-ui/src/components/annotation-page/standard-workspace/controls-side-bar/tools-control.tsx``
  (298b6166636d): an interactor answers ``{mask: number[][], bounds?, points?}``; the rows go
  through ``mask2Rle`` (``cvat-core/src/object-utils.ts``, 4c1ed218b738: runs of equal values, the
  first a run of zeros), ``bounds`` is appended (``[0, 0, width - 1, height - 1]`` when absent), the
  polygon is traced from the mask when ``points`` is absent; interactors need ``version`` >= 2. Its
  detector path reads ``mask`` (box last) and ``points`` the same way as the lambda manager.
- ``cvat-ui/plugins/sam/src/ts/index.tsx`` (be396074c427): CVAT's SAM answers ``{mask: rows of 0/255,
  bounds: [xtl, ytl, xbr, ybr]}``, orders clicks positives first, and feeds the previous
  low-resolution mask back when the new clicks are the previous ones plus one.
- ``serverless/pytorch/saic-vul/hrnet/nuclio/main.py`` (2207427270e3),
  ``serverless/pytorch/shiyinzhang/iog/nuclio/{main.py,function.yaml}`` (7187bb3e1eb7) and its
  ``model_handler.py`` (cc89f3e33ed1: ``obj_bbox`` is ``[[x1, y1], [x2, y2]]``),
  ``serverless/pytorch/facebookresearch/sam/nuclio/function.yaml`` (037b07d29fe7).
- ``serverless/openvino/omz/public/mask_rcnn_inception_resnet_v2_atrous_coco/nuclio/model_handler.py``
  (496f865faa0a): detector mask shapes (``to_cvat_mask``: ``mask[ytl:ybr + 1, xtl:xbr + 1]``
  flattened, the box appended); ``datumaro/util/mask_tools.py`` of ``cvat-ai/datumaro``
  (02ca61d87b2b): ``mask_to_rle``, which the lambda manager applies to those values.
"""

from __future__ import annotations

import json
import math
import os
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..engine.cache import EmbeddingCache, content_hash
from ..engine.prompts import Prompt
from ..engine.types import SegmentingEngine
from ..formats import mask_to_polygons
from ..images import ImageLimits, ImageTooLarge, decode_base64_image  # the project's one image decoder
from ..workflows.remote import RemoteStepError

KINDS = ("interactor", "detector")
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_LABEL = "object"
HISTORY_FRAMES = 64  # frames whose last interactor prompt and logits are kept for click-to-refine


class CvatRequestError(ValueError):
    """A request CVAT's user must fix; ``status`` is the HTTP status it is answered with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class InteractorRequest:
    """One interactor call: ``image`` (H, W, 3) uint8 RGB; ``positive`` (P, 2) and ``negative``
    (Q, 2) float32 clicks (x, y pixels); ``box`` (4,) float32 x1, y1, x2, y2 pixels or None."""

    image: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    box: np.ndarray | None
    threshold: float | None

    def prompt(self, mask_input: np.ndarray | None = None) -> Prompt:
        points = np.concatenate([self.positive, self.negative])
        labels = [1] * len(self.positive) + [0] * len(self.negative)
        return Prompt(
            box=self.box,
            points=points if len(points) else None,
            labels=labels if len(points) else None,
            mask_input=mask_input,
        )

    @property
    def multimask_output(self) -> bool:
        """SAM's advice: three candidates for an ambiguous prompt (one click, or a box with at most one)."""
        return len(self.positive) + len(self.negative) <= 1

    def signature(self) -> tuple:
        """The prompt as plain tuples, to tell whether a later request extends this one."""
        as_tuples = lambda a: tuple(map(tuple, a.tolist()))  # noqa: E731
        box = None if self.box is None else tuple(self.box.tolist())
        return box, as_tuples(self.positive), as_tuples(self.negative)


def request_body(body: Any) -> dict:
    """The JSON object of a request: nuclio hands a dict for ``application/json``, else raw bytes."""
    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            raise CvatRequestError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise CvatRequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def read_image(body: Mapping, max_pixels: int) -> np.ndarray:
    """The frame of ``body["image"]`` (base64 PNG/JPEG/...) → (H, W, 3) uint8 RGB."""
    text = body.get("image")
    if text is None:
        raise CvatRequestError("missing field 'image' (the frame, base64)")
    if not isinstance(text, str):
        raise CvatRequestError(f"field 'image' must be a base64 string, got {type(text).__name__}")
    try:
        return decode_base64_image(text, "image", ImageLimits(max_pixels=max_pixels))
    except ImageTooLarge as e:
        raise CvatRequestError(str(e), 413) from None
    except ValueError as e:
        raise CvatRequestError(str(e)) from None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_points(value: Any, name: str, hw: tuple[int, int]) -> np.ndarray:
    """``[[x, y], ...]`` → (P, 2) float32; each point must lie on the image (0 <= x <= W, 0 <= y <= H)."""
    if value is None:
        raise CvatRequestError(f"missing field '{name}' (a list of [x, y] points, possibly empty)")
    if not isinstance(value, list):
        raise CvatRequestError(f"field '{name}' must be a list of [x, y] points")
    h, w = hw
    for i, p in enumerate(value):
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(_number(c) for c in p)):
            raise CvatRequestError(f"{name}[{i}] must be [x, y] (two finite numbers), got {p!r}")
        if not (0 <= p[0] <= w and 0 <= p[1] <= h):
            raise CvatRequestError(f"{name}[{i}] {list(p)} lies outside the {w}x{h} image")
    return np.array(value, np.float32).reshape(-1, 2)


def read_box(value: Any) -> np.ndarray | None:
    """``obj_bbox``: ``[[x1, y1], [x2, y2]]`` (two opposite corners, any order) or ``[x1, y1, x2, y2]``
    → (4,) float32 x_min, y_min, x_max, y_max; None when absent."""
    if value is None:
        return None
    flat = value
    if isinstance(value, list) and len(value) == 2 and all(isinstance(c, (list, tuple)) for c in value):
        flat = [*value[0], *value[1]]
    if not (isinstance(flat, (list, tuple)) and len(flat) == 4 and all(_number(c) for c in flat)):
        raise CvatRequestError(f"obj_bbox must be [[x1, y1], [x2, y2]], got {value!r}")
    xs, ys = sorted(flat[0::2]), sorted(flat[1::2])
    return np.array([xs[0], ys[0], xs[1], ys[1]], np.float32)


def read_threshold(body: Mapping) -> float | None:
    value = body.get("threshold")
    if value is None:
        return None
    if not _number(value) or not 0 <= value <= 1:
        raise CvatRequestError(f"threshold must be a number within [0, 1], got {value!r}")
    return float(value)


def parse_interactor_request(body: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> InteractorRequest:
    """Validate an interactor request: an error names the field and what is wrong with it."""
    body = request_body(body)
    image = read_image(body, max_pixels)
    hw = image.shape[:2]
    positive = read_points(body.get("pos_points"), "pos_points", hw)
    negative = read_points(body.get("neg_points"), "neg_points", hw)
    box = read_box(body.get("obj_bbox"))
    if box is None and len(positive) == 0:
        raise CvatRequestError("no positive points: click at least once inside the object (or draw its box)")
    return InteractorRequest(image, positive, negative, box, read_threshold(body))


# ---- answers -------------------------------------------------------------------------------


def mask_bounds(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive ``x_min, y_min, x_max, y_max`` pixel indices of a (H, W) mask; None when empty."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if len(cols) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def interactor_answer(mask: np.ndarray) -> dict:
    """A non-empty (H, W) bool mask → ``{"mask": rows of 0/255 inside its box, "bounds": [x_min, y_min,
    x_max, y_max]}`` (inclusive pixel indices)."""
    x0, y0, x1, y1 = mask_bounds(mask)
    crop = mask[y0 : y1 + 1, x0 : x1 + 1].astype(np.uint8) * 255
    return {"mask": crop.tolist(), "bounds": [x0, y0, x1, y1]}


def detector_shape(mask: np.ndarray, score: float, label: str) -> dict:
    """A non-empty (H, W) bool mask → one CVAT mask shape (see the module docstring)."""
    x0, y0, x1, y1 = mask_bounds(mask)
    values = mask[y0 : y1 + 1, x0 : x1 + 1].astype(np.uint8).ravel().tolist()
    shape = {"type": "mask", "label": label, "confidence": float(score), "mask": values + [x0, y0, x1, y1]}
    outlines = mask_to_polygons(mask)
    if outlines:
        shape["points"] = outlines[0].ravel().tolist()
    return shape


def _paste(values: np.ndarray, bounds: Sequence[Any], hw: tuple[int, int], where: str) -> np.ndarray:
    if len(bounds) != 4 or not all(isinstance(b, int) for b in bounds):
        raise ValueError(f"{where}: bounds must be four integers, got {bounds!r}")
    x0, y0, x1, y1 = bounds
    h, w = hw
    if not (0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h):
        raise ValueError(f"{where}: bounds {list(bounds)} do not fit a {w}x{h} image")
    if values.size != (x1 - x0 + 1) * (y1 - y0 + 1):
        raise ValueError(f"{where}: {values.size} values for a {x1 - x0 + 1}x{y1 - y0 + 1} box")
    mask = np.zeros(hw, bool)
    mask[y0 : y1 + 1, x0 : x1 + 1] = values.reshape(y1 - y0 + 1, x1 - x0 + 1) > 0
    return mask


def mask_from_interactor_answer(answer: Mapping, hw: tuple[int, int]) -> np.ndarray:
    """Inverse of ``interactor_answer``: ``{"mask": rows, "bounds"?}`` → (H, W) bool; without
    ``bounds`` the rows cover the whole image, as CVAT's UI reads them."""
    rows = np.asarray(answer["mask"])
    if rows.ndim != 2:
        raise ValueError(f"interactor mask must be a list of rows, got shape {rows.shape}")
    bounds = answer.get("bounds", [0, 0, rows.shape[1] - 1, rows.shape[0] - 1])
    return _paste(rows, bounds, hw, "interactor mask")


def mask_from_detector_shape(shape: Mapping, hw: tuple[int, int]) -> np.ndarray:
    """Inverse of ``detector_shape``: a CVAT mask shape's ``mask`` (values, then the box) → (H, W) bool."""
    values = list(shape["mask"])
    if len(values) < 5:
        raise ValueError("a mask shape holds its values and then its four box coordinates")
    return _paste(np.asarray(values[:-4]), values[-4:], hw, "mask shape")


# ---- the function --------------------------------------------------------------------------


@dataclass(frozen=True)
class _LastPrompt:
    signature: tuple
    mask_input: np.ndarray | None  # what that request was decoded with
    logits: np.ndarray  # (256, 256) its answer's low-resolution logits

    @property
    def nbytes(self) -> int:
        return self.logits.nbytes + (0 if self.mask_input is None else self.mask_input.nbytes)


def _extends(old: tuple, new: tuple) -> bool:
    """Same box, the old clicks are the first ones of each kind, and there are more now."""
    (old_box, old_pos, old_neg), (box, pos, neg) = old, new
    return (
        old_box == box
        and pos[: len(old_pos)] == old_pos
        and neg[: len(old_neg)] == old_neg
        and len(pos) + len(neg) > len(old_pos) + len(old_neg)
    )


class CvatFunction:
    """CVAT's interactor or detector protocol on a ``SegmentingEngine``: ``function(body)`` →
    ``(status, JSON-ready answer)``.

    ``label``: the detector's label name (it must be in the function's ``spec`` annotation).
    ``automatic_config``: unprompted-mode settings for the detector (None: the engine's defaults, or
    the server's in remote mode). ``reuse_logits``: feed the previous logits back on extended clicks
    (the engine must take ``mask_input``; a remote server keeps its own). Safe to share between threads.
    """

    def __init__(
        self,
        engine: SegmentingEngine,
        kind: str = "interactor",
        label: str = DEFAULT_LABEL,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        automatic_config: Any = None,
        reuse_logits: bool = True,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.engine, self.kind, self.label = engine, kind, label
        self.max_pixels, self.automatic_config, self.reuse_logits = max_pixels, automatic_config, reuse_logits
        self._history: EmbeddingCache[_LastPrompt] = EmbeddingCache(HISTORY_FRAMES, 1 << 28)  # thread-safe LRU

    def __call__(self, body: Any) -> tuple[int, Any]:
        try:
            return 200, (self.interact(body) if self.kind == "interactor" else self.detect(body))
        except CvatRequestError as e:
            return e.status, {"error": str(e)}

    def interact(self, body: Any) -> dict:
        request = parse_interactor_request(body, self.max_pixels)
        frame = content_hash(request.image)
        signature = request.signature()
        mask_input = self._mask_input(frame, signature)
        embedding = self.engine.embed([request.image])[0]
        try:
            result = self.engine.predict_prompts(embedding, [request.prompt(mask_input)], request.multimask_output)
        except ValueError as e:  # the engine names prompt problems (a box outside the image, ...)
            raise CvatRequestError(str(e)) from None
        if self.reuse_logits:
            self._history.put(frame, _LastPrompt(signature, mask_input, result.low_res_logits[0]))
        score = float(result.scores[0])
        if request.threshold is not None and score < request.threshold:
            raise CvatRequestError(f"the mask's predicted IoU {score:.3f} is below threshold {request.threshold}", 422)
        if not result.masks[0].any():
            raise CvatRequestError("no object found at these points: move or add points", 422)
        return interactor_answer(result.masks[0])

    def _mask_input(self, frame: str, signature: tuple) -> np.ndarray | None:
        """The logits to refine from: the previous answer's when this request extends it (or the
        same mask input again when it repeats it, so a repeated request gets the same answer)."""
        if not self.reuse_logits:
            return None
        last = self._history.get(frame)
        if last is None:
            return None
        if last.signature == signature:
            return last.mask_input
        return last.logits if _extends(last.signature, signature) else None

    def detect(self, body: Any) -> list[dict]:
        body = request_body(body)
        image = read_image(body, self.max_pixels)
        threshold = read_threshold(body)
        embedding = self.engine.embed([image])[0]
        found = self.engine.automatic(embedding, self.automatic_config)
        return [
            detector_shape(m, s, self.label)
            for m, s in zip(found.masks, found.scores)
            if m.any() and (threshold is None or s >= threshold)
        ]


# ---- configuration and nuclio entry points -------------------------------------------------


def _env_int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"${name} must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class FunctionConfig:
    """A function's settings, from ``SAM2FLOW_*`` environment variables (``from_env``):

    ``SAM2FLOW_CVAT_KIND`` interactor | detector; ``SAM2FLOW_CVAT_LABEL`` the detector's label;
    ``SAM2FLOW_VERSION``, ``SAM2FLOW_FAMILY``, ``SAM2FLOW_CHECKPOINT`` (else ``SAM2FLOW_WEIGHTS_DIR``,
    the Hugging Face cache, the Hub), ``SAM2FLOW_DEVICE``, ``SAM2FLOW_DTYPE``, ``SAM2FLOW_CACHE_ENTRIES``
    (embeddings kept, ~16 MB each); or ``SAM2FLOW_REMOTE_URL`` (+ ``SAM2FLOW_API_KEY``) to forward to a
    running ``sam2flow serve`` instead of loading a model; ``SAM2FLOW_MAX_IMAGE_PIXELS``;
    ``SAM2FLOW_AUTOMATIC_POINTS_PER_SIDE`` (detector grid, local model only).
    """

    kind: str = "interactor"
    label: str = DEFAULT_LABEL
    version: str = "hiera_tiny"
    family: str = "sam2.1"
    checkpoint: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    cache_entries: int = 16
    remote_url: str | None = None
    api_key: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    points_per_side: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FunctionConfig:
        env = os.environ if env is None else env
        get = lambda name, default=None: env.get(name, "").strip() or default  # noqa: E731
        config = cls(
            kind=get("SAM2FLOW_CVAT_KIND", "interactor"),
            label=get("SAM2FLOW_CVAT_LABEL", DEFAULT_LABEL),
            version=get("SAM2FLOW_VERSION", "hiera_tiny"),
            family=get("SAM2FLOW_FAMILY", "sam2.1"),
            checkpoint=get("SAM2FLOW_CHECKPOINT"),
            device=get("SAM2FLOW_DEVICE", "auto"),
            dtype=get("SAM2FLOW_DTYPE", "auto"),
            cache_entries=_env_int(env, "SAM2FLOW_CACHE_ENTRIES", 16),
            remote_url=get("SAM2FLOW_REMOTE_URL"),
            api_key=get("SAM2FLOW_API_KEY"),
            max_pixels=_env_int(env, "SAM2FLOW_MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS),
            points_per_side=_env_int(env, "SAM2FLOW_AUTOMATIC_POINTS_PER_SIDE", None),
        )
        if config.kind not in KINDS:
            raise ValueError(f"$SAM2FLOW_CVAT_KIND must be one of {KINDS}, got {config.kind!r}")
        if config.remote_url and config.points_per_side is not None:
            raise ValueError(
                "$SAM2FLOW_AUTOMATIC_POINTS_PER_SIDE applies to a local model; "
                "with $SAM2FLOW_REMOTE_URL set it on the server"
            )
        return config

    def build(self) -> CvatFunction:
        """Load the engine once (or connect to the remote server) and wrap it."""
        if self.remote_url:
            from ..workflows.remote import RemoteEngine

            engine = RemoteEngine(self.remote_url, self.version, self.api_key)
            return CvatFunction(engine, self.kind, self.label, self.max_pixels, reuse_logits=False)
        from ..engine.engine import Sam2Engine
        from ..engine.types import AutomaticConfig

        engine = Sam2Engine.from_pretrained(
            self.version,
            self.family,
            self.checkpoint,
            device=self.device,
            dtype=self.dtype,
            cache=EmbeddingCache(self.cache_entries),
        )
        automatic = AutomaticConfig(points_per_side=self.points_per_side) if self.points_per_side else None
        return CvatFunction(engine, self.kind, self.label, self.max_pixels, automatic)


def init_context(context, env: Mapping[str, str] | None = None) -> None:
    """nuclio's start-up hook: build the function once per worker, kept in ``context.user_data``."""
    config = FunctionConfig.from_env(env)
    source = f"the server at {config.remote_url}" if config.remote_url else f"{config.family} {config.version}"
    context.logger.info(f"sam2flow CVAT {config.kind}: loading {source}")
    context.user_data.function = config.build()
    context.logger.info(f"sam2flow CVAT {config.kind}: ready")


def handler(context, event):
    """nuclio's per-request hook: always a JSON ``context.Response``, 4xx/5xx with ``{"error"}``."""
    try:
        status, answer = context.user_data.function(event.body)
    except RemoteStepError as e:
        status, answer = 502, {"error": str(e)}
    except Exception as e:  # never crash the worker: the traceback goes to the function's log
        context.logger.error(f"sam2flow CVAT function failed:\n{traceback.format_exc()}")
        status, answer = 500, {"error": f"internal error: {type(e).__name__}: {e}"}
    if status >= 400:
        context.logger.warn(f"sam2flow CVAT request answered {status}: {answer['error']}")
    return context.Response(body=json.dumps(answer), headers={}, content_type="application/json", status_code=status)
