"""Predictions: ``sv.Detections`` <-> the JSON prediction dicts (see the package's docstring)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import supervision as sv

from ._checks import check_hw, is_int, is_number
from .boxes import cxcywh_to_xyxy, xyxy_to_cxcywh
from .polygons import as_polygon, mask_to_polygons, polygons_to_mask
from .rle import mask_to_rle, rle_size, rle_to_mask

MASK_FORMATS = ("polygon", "rle")


def detections_to_predictions(detections: sv.Detections, mask_format: str = "polygon") -> list[dict]:
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
    return [_prediction(detections, index, boxes[index], mask_format) for index in range(len(detections))]


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


def _unwrap(predictions: Any, image_hw: tuple[int, int] | None) -> tuple[list, tuple[int, int] | None]:
    """The list of predictions and the image ``(H, W)`` (or None)."""
    if image_hw is not None:
        image_hw = check_hw(image_hw, "image_hw")
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
        raise ValueError(f"'image' must be a dict with width and height, got {type(image).__name__}")
    found = check_hw((image.get("height"), image.get("width")), "image height/width")
    if image_hw is not None and image_hw != found:
        raise ValueError(f"image_hw {image_hw} disagrees with the 'image' size {found}")
    return found


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
    if not is_number(value):
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
    if is_int(value) or (is_number(value) and float(value).is_integer()):
        return int(value)
    raise ValueError(f"prediction {index}: 'class_id' must be an integer, got {value!r}")


def _polygons_field(item: Mapping, index: int) -> list[np.ndarray] | None:
    """Outlines from ``polygons`` (all parts) or ``points`` (one part), else None."""
    if item.get("polygons") is not None:
        polygons = item["polygons"]
        if not isinstance(polygons, (list, tuple)):
            raise ValueError(f"prediction {index}: 'polygons' must be a list of [[x, y], ...]")
        return [as_polygon(p, f"prediction {index}: 'polygons'[{k}]") for k, p in enumerate(polygons)]
    if item.get("points") is not None:
        return [_points(item["points"], index)]
    return None


def _points(points: Any, index: int) -> np.ndarray:
    if not isinstance(points, (list, tuple)):
        raise ValueError(f"prediction {index}: 'points' must be a list of {{'x', 'y'}} dicts")
    coords = []
    for point in points:
        if not isinstance(point, Mapping) or not all(is_number(point.get(k)) for k in ("x", "y")):
            raise ValueError(
                f"prediction {index}: 'points' entries must be {{'x': number, 'y': number}}, got {point!r}"
            )
        coords.append((point["x"], point["y"]))
    return as_polygon(coords, f"prediction {index}: 'points'")


def _first_rle_size(parsed: list[dict]) -> tuple[int, int] | None:
    for p in parsed:
        if p["rle"] is not None:
            try:
                return rle_size(p["rle"])
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
            f"prediction {p['index']}: 'rle' size {list(mask.shape)} differs from the image {list(image_hw)}"
        )
    return mask


def _confidences(parsed: list[dict]) -> np.ndarray | None:
    values = [p["confidence"] for p in parsed]
    if all(v is None for v in values):
        return None
    for p in parsed:
        if p["confidence"] is None:
            raise ValueError(f"prediction {p['index']}: 'confidence' is missing but other predictions have one")
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
        empties = {"keypoints_xy": np.zeros((0, 2), np.float32), "keypoints_confidence": np.zeros(0, np.float32)}
        for key, empty in empties.items():
            array = np.empty(len(parsed), dtype=object)
            array[:] = [p.get(key, empty) for p in parsed]
            data[key] = array
    return data
