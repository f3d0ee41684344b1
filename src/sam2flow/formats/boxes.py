"""Boxes: corners ``[x1, y1, x2, y2]`` and centre-size ``[cx, cy, w, h]``, pixels, shape ``(N, 4)``."""

from __future__ import annotations

import numpy as np


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
