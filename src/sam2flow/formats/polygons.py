"""Polygons: the outer outlines of a mask's parts, and their rasterisation (OpenCV).

Vertices are pixel centres: ``(x, y)`` is the centre of the pixel in column ``x``, row ``y`` (what
``cv2.findContours`` returns); a polygon covers every pixel whose centre lies inside or on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from ._checks import is_int
from .masks import as_mask

MIN_POLYGON_POINTS = 3


def mask_to_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Outer outlines of every connected part of one ``(H, W)`` mask.

    Returns a list of ``(K, 2)`` float64 arrays of ``[x, y]`` pixel-centre
    coordinates (every boundary pixel, ``cv2.CHAIN_APPROX_NONE``), largest part
    first (by enclosed area, then by outline length). Parts whose outline has
    fewer than 3 points (1- or 2-pixel specks) are dropped; holes are not
    reported (a part's outline encloses them).
    """
    arr = as_mask(mask, "mask")
    contours, _ = cv2.findContours(arr.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    kept = [c for c in contours if len(c) >= MIN_POLYGON_POINTS]
    kept.sort(key=lambda c: (cv2.contourArea(c), len(c)), reverse=True)
    return [c.reshape(-1, 2).astype(np.float64) for c in kept]


def polygons_to_mask(polygons: Sequence[np.ndarray | Sequence[Sequence[float]]], height: int, width: int) -> np.ndarray:
    """Rasterize polygons into one bool ``(height, width)`` mask (their union).

    Each polygon is ``(K, 2)`` ``[x, y]`` pixel-centre coordinates. A pixel is set
    when its centre lies inside or on a polygon's outline (``cv2.fillPoly`` on
    vertices rounded to the nearest pixel, no half-pixel offset). Polygons with
    fewer than 3 vertices are ignored; parts outside the image are clipped.
    """
    if not (is_int(height) and is_int(width) and height >= 0 and width >= 0):
        raise ValueError(f"height and width must be non-negative ints, got {height!r}, {width!r}")
    canvas = np.zeros((int(height), int(width)), dtype=np.uint8)
    for index, polygon in enumerate(polygons):
        points = as_polygon(polygon, f"polygons[{index}]")
        if len(points) >= MIN_POLYGON_POINTS:
            cv2.fillPoly(canvas, [np.rint(points).astype(np.int32)], color=1)
    return canvas.astype(bool)


def as_polygon(polygon: Any, name: str) -> np.ndarray:
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
