"""JSON prediction format for instance-segmentation results (pure data shaping).

One prediction is a JSON-ready dict per detection, compatible with Roboflow's
instance-segmentation output::

    {"x": cx, "y": cy, "width": w, "height": h,   # box centre and size, pixels (float)
     "confidence": float | None, "class": str, "class_id": int,
     "detection_id": str, "parent_id": str,      # parent_id only when known
     "points": [{"x": .., "y": ..}, ...],        # polygon format: largest part's outline
     "polygons": [[[x, y], ...], ...],           # only when the mask has > 1 part
     "rle": {"size": [h, w], "counts": "..."}}   # RLE format, instead of points/polygons

Conventions:

* Images are ``H x W``; masks are ``bool`` arrays of shape ``(H, W)`` (one
  detection) or ``(N, H, W)`` (``sv.Detections.mask``).
* Boxes are pixels: ``xyxy`` is ``(N, 4)`` ``[x1, y1, x2, y2]``; the JSON uses the
  centre and size ``[cx, cy, w, h]``.
* Polygon vertices are pixel *centres*: vertex ``(x, y)`` is the centre of the
  pixel in column ``x``, row ``y`` (the coordinates ``cv2.findContours`` returns).
  A polygon covers every pixel whose centre lies inside or on its outline; it is
  rasterized with ``cv2.fillPoly`` on vertices rounded to the nearest integer, with
  no half-pixel offset. With this convention mask -> polygons -> mask is exact for
  each part's filled outer outline (holes are not represented). Shifting vertices
  by 0.5 px either way costs 3-13 % IoU on 10-200 px shapes.
* COCO RLE is exactly what ``pycocotools.mask.encode`` writes for the
  Fortran-ordered mask, with ``counts`` decoded from bytes to ``str`` and
  ``size`` as ``[h, w]``.

No torch here: this module only reshapes numpy arrays and JSON-ready dicts.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import supervision as sv

__all__ = [
    "MASK_FORMATS",
    "cxcywh_to_xyxy",
    "detections_to_predictions",
    "mask_to_polygons",
    "mask_to_rle",
    "polygons_to_mask",
    "predictions_to_detections",
    "rle_to_mask",
    "xyxy_to_cxcywh",
]

MASK_FORMATS = ("polygon", "rle")
_MIN_POLYGON_POINTS = 3

# ---------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------


def xyxy_to_cxcywh(xyxy: np.ndarray) -> np.ndarray:
    """Convert ``(N, 4)`` ``[x1, y1, x2, y2]`` boxes to ``(N, 4)`` ``[cx, cy, w, h]``.

    Units are unchanged (pixels in, pixels out); the result is float64.
    """
    boxes = _as_boxes(xyxy, "xyxy")
    size = boxes[:, 2:] - boxes[:, :2]
    return np.concatenate([boxes[:, :2] + size / 2.0, size], axis=1)


def cxcywh_to_xyxy(cxcywh: np.ndarray) -> np.ndarray:
    """Convert ``(N, 4)`` ``[cx, cy, w, h]`` boxes to ``(N, 4)`` ``[x1, y1, x2, y2]``.

    Units are unchanged (pixels in, pixels out); the result is float64.
    """
    boxes = _as_boxes(cxcywh, "cxcywh")
    half = boxes[:, 2:] / 2.0
    return np.concatenate([boxes[:, :2] - half, boxes[:, :2] + half], axis=1)


def _as_boxes(boxes: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4), got {arr.shape}")
    return arr


# ---------------------------------------------------------------------------
# COCO RLE
# ---------------------------------------------------------------------------


def mask_to_rle(mask: np.ndarray) -> dict:
    """Encode one ``(H, W)`` mask (bool, or numbers where non-zero is True) as COCO RLE.

    Returns ``{"size": [H, W], "counts": str}``: exactly ``pycocotools.mask.encode``
    of the Fortran-ordered uint8 mask, with ``counts`` decoded from ASCII bytes.
    """
    arr = _as_mask(mask, "mask")
    rle = mask_utils.encode(np.asfortranarray(arr.astype(np.uint8)))
    return {"size": [int(arr.shape[0]), int(arr.shape[1])], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode a COCO RLE dict to a bool ``(H, W)`` mask, ``(H, W) == rle["size"]``.

    ``counts`` may be the compressed string (``str`` or ASCII ``bytes``, as
    pycocotools writes it) or an uncompressed list of run lengths. The runs are
    checked to cover exactly ``H * W`` pixels before pycocotools decodes them
    (pycocotools itself does not check, and reads past its buffer on bad input).
    """
    height, width = _rle_size(rle)
    runs, compressed = _rle_runs(rle.get("counts"))
    if any(r < 0 for r in runs):
        raise ValueError("rle 'counts' has a negative run length")
    if sum(runs) != height * width:
        raise ValueError(
            f"rle 'counts' covers {sum(runs)} pixels but 'size' [{height}, {width}] "
            f"has {height * width}"
        )
    if not compressed:
        compressed = mask_utils.frPyObjects(
            {"size": [height, width], "counts": runs}, height, width
        )["counts"]
    decoded = mask_utils.decode({"size": [height, width], "counts": compressed})
    return decoded.astype(bool)


def _rle_size(rle: Any) -> tuple[int, int]:
    if not isinstance(rle, Mapping):
        raise ValueError(f"rle must be a dict, got {type(rle).__name__}")
    return _check_hw(rle.get("size"), "rle 'size'")


def _rle_runs(counts: Any) -> tuple[list[int], bytes | None]:
    """Run lengths of ``counts`` and, when compressed, its ASCII bytes."""
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("rle 'counts' string must be ASCII") from None
    if isinstance(counts, bytes):
        return _parse_compressed_counts(counts), counts
    if isinstance(counts, (list, tuple)) and all(_is_int(v) for v in counts):
        return [int(v) for v in counts], None
    raise ValueError(
        f"rle 'counts' must be a str (compressed) or a list of ints, got {type(counts).__name__}"
    )


def _parse_compressed_counts(data: bytes) -> list[int]:
    """Parse COCO's compressed counts string into run lengths.

    Format (COCO maskApi): each number is written in 5-bit groups, low first, as
    characters ``48 + group``; bit 0x20 means "more groups follow" and, in the
    last group, bit 0x10 is the sign. From the fourth number on, the value stored
    is the difference to the number two places earlier.
    """
    runs: list[int] = []
    value, shift = 0, 0
    for char in data:
        group = char - 48
        if not 0 <= group < 64:
            raise ValueError(f"rle 'counts' has an invalid character {chr(char)!r}")
        value |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:
            continue
        if group & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value, shift = 0, 0
    if shift:
        raise ValueError("rle 'counts' ends in the middle of a number")
    return runs


# ---------------------------------------------------------------------------
# Polygons
# ---------------------------------------------------------------------------


def mask_to_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Outer outlines of every connected part of one ``(H, W)`` mask.

    Returns a list of ``(K, 2)`` float64 arrays of ``[x, y]`` pixel-centre
    coordinates (every boundary pixel, ``cv2.CHAIN_APPROX_NONE``), largest part
    first (by enclosed area, then by outline length). Parts whose outline has
    fewer than 3 points (1- or 2-pixel specks) are dropped; holes are not
    reported (a part's outline encloses them).
    """
    arr = _as_mask(mask, "mask")
    contours, _ = cv2.findContours(arr.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    kept = [c for c in contours if len(c) >= _MIN_POLYGON_POINTS]
    kept.sort(key=lambda c: (cv2.contourArea(c), len(c)), reverse=True)
    return [c.reshape(-1, 2).astype(np.float64) for c in kept]


def polygons_to_mask(
    polygons: Sequence[np.ndarray | Sequence[Sequence[float]]], height: int, width: int
) -> np.ndarray:
    """Rasterize polygons into one bool ``(height, width)`` mask (their union).

    Each polygon is ``(K, 2)`` ``[x, y]`` pixel-centre coordinates. A pixel is set
    when its centre lies inside or on a polygon's outline (``cv2.fillPoly`` on
    vertices rounded to the nearest pixel, no half-pixel offset). Polygons with
    fewer than 3 vertices are ignored; parts outside the image are clipped.
    """
    if not (_is_int(height) and _is_int(width) and height >= 0 and width >= 0):
        raise ValueError(f"height and width must be non-negative ints, got {height!r}, {width!r}")
    canvas = np.zeros((int(height), int(width)), dtype=np.uint8)
    for index, polygon in enumerate(polygons):
        points = _as_polygon(polygon, f"polygons[{index}]")
        if len(points) >= _MIN_POLYGON_POINTS:
            cv2.fillPoly(canvas, [np.rint(points).astype(np.int32)], color=1)
    return canvas.astype(bool)


def _as_polygon(polygon: Any, name: str) -> np.ndarray:
    try:
        points = np.asarray(polygon, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of [x, y] numbers") from None
    if points.size == 0:
        return points.reshape(0, 2)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"{name} must have shape (K, 2), got {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError(f"{name} has non-finite coordinates")
    return points


def _as_mask(mask: Any, name: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (H, W), got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be bool or numeric, got dtype {arr.dtype}")
    return arr.astype(bool)


# ---------------------------------------------------------------------------
# sv.Detections -> predictions
# ---------------------------------------------------------------------------


def detections_to_predictions(
    detections: sv.Detections, mask_format: str = "polygon"
) -> list[dict]:
    """Shape ``detections`` into one JSON-ready prediction dict per detection.

    Reads ``xyxy`` (``(N, 4)`` pixels), ``mask`` (``(N, H, W)`` bool, dense or
    ``CompactMask``; None -> no ``points``/``polygons``/``rle`` keys),
    ``confidence`` (None -> ``"confidence": None``), ``class_id`` (None -> the
    detection's index) and the optional ``data`` arrays ``class_name`` (else
    ``str(class_id)``), ``detection_id`` (else a new uuid4) and ``parent_id``
    (written only when not None). ``mask_format`` is ``"polygon"`` or ``"rle"``.
    """
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
    boxes = xyxy_to_cxcywh(detections.xyxy)
    return [
        _prediction(detections, index, boxes[index], mask_format)
        for index in range(len(detections))
    ]


def _prediction(detections: sv.Detections, index: int, box: np.ndarray, mask_format: str) -> dict:
    class_id = index if detections.class_id is None else int(detections.class_id[index])
    confidence = None if detections.confidence is None else float(detections.confidence[index])
    class_name = _data_value(detections, "class_name", index)
    detection_id = _data_value(detections, "detection_id", index)
    prediction: dict[str, Any] = {
        "x": float(box[0]),
        "y": float(box[1]),
        "width": float(box[2]),
        "height": float(box[3]),
        "confidence": confidence,
        "class": str(class_id) if class_name is None else str(class_name),
        "class_id": class_id,
        "detection_id": str(uuid.uuid4()) if detection_id is None else str(detection_id),
    }
    parent_id = _data_value(detections, "parent_id", index)
    if parent_id is not None:
        prediction["parent_id"] = str(parent_id)
    if detections.mask is not None:
        prediction.update(_mask_fields(np.asarray(detections.mask[index]), mask_format))
    return prediction


def _data_value(detections: sv.Detections, key: str, index: int) -> Any:
    values = detections.data.get(key)
    return None if values is None else values[index]


def _mask_fields(mask: np.ndarray, mask_format: str) -> dict:
    """The ``points``/``polygons`` or ``rle`` keys for one ``(H, W)`` mask."""
    if mask_format == "rle":
        return {"rle": mask_to_rle(mask)}
    polygons = mask_to_polygons(mask)
    largest = polygons[0] if polygons else np.empty((0, 2))
    fields: dict[str, Any] = {"points": [{"x": float(x), "y": float(y)} for x, y in largest]}
    if len(polygons) > 1:
        fields["polygons"] = [p.tolist() for p in polygons]
    return fields


# ---------------------------------------------------------------------------
# predictions -> sv.Detections
# ---------------------------------------------------------------------------


def predictions_to_detections(
    predictions: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    image_hw: tuple[int, int] | None = None,
) -> sv.Detections:
    """Parse and validate predictions into ``sv.Detections``.

    ``predictions`` is a list of prediction dicts, or a dict enclosing them as
    ``{"predictions": [...]}`` or ``{"image": {"width": W, "height": H},
    "predictions": [...]}``. ``image_hw`` is ``(H, W)`` in pixels; without it the
    enclosing ``image`` or the first ``rle`` ``size`` gives the image size.

    Result: ``xyxy`` ``(N, 4)`` float64 pixels; ``confidence`` ``(N,)`` float64,
    or None when no prediction has one; ``class_id`` ``(N,)`` int (missing -> the
    prediction's index); ``data["class_name"]`` (``class``, missing ->
    ``str(class_id)``), ``data["detection_id"]`` and ``data["parent_id"]`` as
    object arrays of str (None where a prediction lacks one; the key only when
    some prediction has it). ``mask`` ``(N, H, W)`` bool when some prediction has
    ``rle``, ``polygons`` or ``points`` and the image size is known (else None);
    a prediction without any of them gets an empty mask. ``polygons`` wins over
    ``points``.

    Raises ValueError naming the prediction's index and the field for missing
    x/y/width/height, non-numeric or non-finite numbers, negative width/height,
    wrong types and bad masks.
    """
    items, image_hw = _unwrap(predictions, image_hw)
    if not items:
        return _empty_detections()
    parsed = [_parse_prediction(item, index) for index, item in enumerate(items)]
    image_hw = image_hw or _first_rle_size(parsed)
    return sv.Detections(
        xyxy=cxcywh_to_xyxy(np.array([p["box"] for p in parsed], dtype=np.float64)),
        mask=_masks(parsed, image_hw),
        confidence=_confidences(parsed),
        class_id=np.array([p["class_id"] for p in parsed], dtype=int),
        data=_data_arrays(parsed),
    )


def _unwrap(
    predictions: Any, image_hw: tuple[int, int] | None
) -> tuple[list, tuple[int, int] | None]:
    """The list of predictions and the image ``(H, W)`` (or None)."""
    if image_hw is not None:
        image_hw = _check_hw(image_hw, "image_hw")
    if isinstance(predictions, Mapping):
        if "predictions" not in predictions:
            raise ValueError("a dict of predictions needs a 'predictions' list")
        image = predictions.get("image")
        if image is not None:
            image_hw = _image_hw(image, image_hw)
        predictions = predictions["predictions"]
    if not isinstance(predictions, (list, tuple)):
        raise ValueError(f"predictions must be a list, got {type(predictions).__name__}")
    return list(predictions), image_hw


def _image_hw(image: Any, image_hw: tuple[int, int] | None) -> tuple[int, int]:
    if not isinstance(image, Mapping):
        raise ValueError(
            f"'image' must be a dict with width and height, got {type(image).__name__}"
        )
    found = _check_hw((image.get("height"), image.get("width")), "image height/width")
    if image_hw is not None and image_hw != found:
        raise ValueError(f"image_hw {image_hw} disagrees with the 'image' size {found}")
    return found


def _check_hw(hw: Any, name: str) -> tuple[int, int]:
    if (
        not isinstance(hw, (list, tuple))
        or len(hw) != 2
        or not all(_is_int(v) and v >= 0 for v in hw)
    ):
        raise ValueError(f"{name} must be two non-negative ints (height, width), got {hw!r}")
    return int(hw[0]), int(hw[1])


def _empty_detections() -> sv.Detections:
    """Zero detections: ``xyxy`` ``(0, 4)``, mask None, empty ``class_name``."""
    empty = sv.Detections.empty()
    empty.data = {"class_name": np.array([], dtype=object)}
    return empty


def _parse_prediction(item: Any, index: int) -> dict:
    """Validated fields of one prediction (mask sources not yet rasterized)."""
    if not isinstance(item, Mapping):
        raise ValueError(f"prediction {index} must be a dict, got {type(item).__name__}")
    box = [_number(item, key, index) for key in ("x", "y", "width", "height")]
    for key, value in zip(("width", "height"), box[2:], strict=True):
        if value < 0:
            raise ValueError(f"prediction {index}: '{key}' must be >= 0, got {value}")
    class_id = _class_id(item, index)
    class_name = _optional_str(item, "class", index)
    return {
        "index": index,
        "box": box,
        "confidence": _optional_number(item, "confidence", index),
        "class_id": class_id,
        "class_name": str(class_id) if class_name is None else class_name,
        "detection_id": _optional_str(item, "detection_id", index),
        "parent_id": _optional_str(item, "parent_id", index),
        "rle": item.get("rle"),
        "polygons": _polygons_field(item, index),
        **_keypoints_field(item, index),
    }


def _keypoints_field(item: Mapping, index: int) -> dict:
    """Keypoint predictions' ``keypoints`` as ``keypoints_xy`` (K, 2) and ``keypoints_confidence`` (K,)."""
    keypoints = item.get("keypoints")
    if keypoints is None:
        return {}
    if not isinstance(keypoints, Sequence) or isinstance(keypoints, str):
        raise ValueError(f"prediction {index}: 'keypoints' must be a list of {{x, y, confidence}}")
    xy, conf = [], []
    for k, point in enumerate(keypoints):
        if not isinstance(point, Mapping):
            raise ValueError(f"prediction {index}: 'keypoints' {k} must be a dict")
        xy.append([_number(point, "x", index), _number(point, "y", index)])
        c = _optional_number(point, "confidence", index)
        conf.append(1.0 if c is None else c)
    return {
        "keypoints_xy": np.array(xy, dtype=np.float32).reshape(-1, 2),
        "keypoints_confidence": np.array(conf, dtype=np.float32),
    }


def _number(item: Mapping, key: str, index: int) -> float:
    if key not in item:
        raise ValueError(f"prediction {index}: missing '{key}'")
    value = item[key]
    if not _is_number(value):
        raise ValueError(f"prediction {index}: '{key}' must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"prediction {index}: '{key}' must be finite, got {value!r}")
    return float(value)


def _optional_number(item: Mapping, key: str, index: int) -> float | None:
    return None if item.get(key) is None else _number(item, key, index)


def _optional_str(item: Mapping, key: str, index: int) -> str | None:
    value = item.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"prediction {index}: '{key}' must be a string, got {value!r}")
    return value


def _class_id(item: Mapping, index: int) -> int:
    value = item.get("class_id")
    if value is None:
        return index
    if _is_int(value) or (_is_number(value) and float(value).is_integer()):
        return int(value)
    raise ValueError(f"prediction {index}: 'class_id' must be an integer, got {value!r}")


def _polygons_field(item: Mapping, index: int) -> list[np.ndarray] | None:
    """Outlines from ``polygons`` (all parts) or ``points`` (one part), else None."""
    if item.get("polygons") is not None:
        polygons = item["polygons"]
        if not isinstance(polygons, (list, tuple)):
            raise ValueError(f"prediction {index}: 'polygons' must be a list of [[x, y], ...]")
        return [
            _as_polygon(p, f"prediction {index}: 'polygons'[{k}]") for k, p in enumerate(polygons)
        ]
    if item.get("points") is not None:
        return [_points(item["points"], index)]
    return None


def _points(points: Any, index: int) -> np.ndarray:
    if not isinstance(points, (list, tuple)):
        raise ValueError(f"prediction {index}: 'points' must be a list of {{'x', 'y'}} dicts")
    coords = []
    for point in points:
        if not isinstance(point, Mapping) or not all(_is_number(point.get(k)) for k in ("x", "y")):
            raise ValueError(
                f"prediction {index}: 'points' entries must be "
                f"{{'x': number, 'y': number}}, got {point!r}"
            )
        coords.append((point["x"], point["y"]))
    return _as_polygon(coords, f"prediction {index}: 'points'")


def _first_rle_size(parsed: list[dict]) -> tuple[int, int] | None:
    for p in parsed:
        if p["rle"] is not None:
            try:
                return _rle_size(p["rle"])
            except ValueError as error:
                raise ValueError(f"prediction {p['index']}: {error}") from None
    return None


def _masks(parsed: list[dict], image_hw: tuple[int, int] | None) -> np.ndarray | None:
    if image_hw is None or all(p["rle"] is None and p["polygons"] is None for p in parsed):
        return None
    return np.stack([_mask(p, image_hw) for p in parsed])


def _mask(p: dict, image_hw: tuple[int, int]) -> np.ndarray:
    """The ``(H, W)`` bool mask of one parsed prediction."""
    if p["rle"] is None:
        return polygons_to_mask(p["polygons"] or [], *image_hw)
    try:
        mask = rle_to_mask(p["rle"])
    except ValueError as error:
        raise ValueError(f"prediction {p['index']}: 'rle': {error}") from None
    if mask.shape != image_hw:
        raise ValueError(
            f"prediction {p['index']}: 'rle' size {list(mask.shape)} "
            f"differs from the image {list(image_hw)}"
        )
    return mask


def _confidences(parsed: list[dict]) -> np.ndarray | None:
    values = [p["confidence"] for p in parsed]
    if all(v is None for v in values):
        return None
    for p in parsed:
        if p["confidence"] is None:
            raise ValueError(
                f"prediction {p['index']}: 'confidence' is missing but other predictions have one"
            )
    return np.array(values, dtype=np.float64)


def _data_arrays(parsed: list[dict]) -> dict[str, np.ndarray]:
    data = {}
    for key in ("class_name", "detection_id", "parent_id"):
        values = [p[key] for p in parsed]
        if any(v is not None for v in values):
            array = np.empty(len(values), dtype=object)
            array[:] = values
            data[key] = array
    if any("keypoints_xy" in p for p in parsed):
        for key, empty in (("keypoints_xy", np.zeros((0, 2), np.float32)), ("keypoints_confidence", np.zeros(0, np.float32))):
            array = np.empty(len(parsed), dtype=object)
            array[:] = [p.get(key, empty) for p in parsed]
            data[key] = array
    return data


# ---------------------------------------------------------------------------
# Small checks
# ---------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )
