"""Synthetic scenes with exact instance masks, for tests, demos, benchmarks and the fixture model.

``make_scene(seed, size=(H, W))`` draws 3–6 shapes (ellipses, rotated rectangles, irregular
star-shaped polygons), each a solid colour plus per-pixel texture noise, on a background that is
a linear two-colour gradient plus noise. Shapes are painted in order, so later shapes occlude
earlier ones; each returned mask is what stays *visible* of its shape after everything painted
above it. A shape whose visible part is smaller than ``min_area`` pixels (default 0.2 % of the
image, at least 64 pixels) is dropped: it is neither in ``masks`` nor in ``boxes`` (its pixels
stay painted in the image, hidden under the later shapes).

Everything is drawn from ``numpy.random.default_rng(seed)`` in a fixed order, so a seed gives the
same scene on every run and machine (numpy's ``Generator`` streams are stable across platforms; a
last-bit difference of a platform's sin/cos would almost never survive the rounding to uint8
pixels and pixel-centre tests; ``tests/test_scenes.py`` pins a fingerprint). Geometry is
rasterised on pixel centres: pixel (x, y) belongs to a shape iff its centre ``(x + 0.5, y + 0.5)``
does (polygons: OpenCV's ``fillPoly`` with sub-pixel vertices). The image is painted from the same
rasters, so a mask pixel always carries its shape's colour.

Colours are kept apart so that every boundary is visible: a shape's base colour differs by at
least ``_MIN_CONTRAST`` (Euclidean RGB) from the background colour under the shape's centre and
from every earlier shape's colour.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

KINDS = ("ellipse", "rectangle", "polygon")
_MIN_CONTRAST = 60.0
_POLY_SHIFT = 4  # fillPoly fixed-point bits: vertices at 1/16 pixel


@dataclass(frozen=True)
class Scene:
    """One synthetic image and its visible instances, in painting order (back to front).

    ``image``: (H, W, 3) uint8 RGB. ``masks``: (K, H, W) bool, the visible part of each kept
    shape; masks never overlap. ``boxes``: (K, 4) float32 ``x_min, y_min, x_max, y_max`` of each
    mask: first and last pixel column and row, inclusive (as ``supervision.mask_to_xyxy``).
    ``kinds``: the shape kind of each mask. ``seed``: the seed that made it.
    ``shapes``: (N, H, W) bool, the whole raster of every shape drawn (N >= K, painting order,
    dropped ones included, before occlusion); ``shape_index``: (K,) which of them each mask is.
    """

    image: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    kinds: tuple[str, ...]
    seed: int
    shapes: np.ndarray
    shape_index: np.ndarray

    def __len__(self) -> int:
        return len(self.masks)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool → float32 ``x_min, y_min, x_max, y_max`` (inclusive); zeros for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return np.zeros(4, np.float32)
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    noise = rng.uniform(3, 12)
    ys, xs = np.mgrid[0:h, 0:w]
    proj = (xs + 0.5) / w * np.cos(angle) + (ys + 0.5) / h * np.sin(angle)
    t = (proj - proj.min()) / max(proj.max() - proj.min(), 1e-9)
    bg = c0[None, None] + (c1 - c0)[None, None] * t[..., None]
    return bg + rng.normal(0, noise, (h, w, 3))


def _raster(rng: np.random.Generator, kind: str, h: int, w: int) -> tuple[np.ndarray, tuple[float, float]]:
    side = min(h, w)
    cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
    r = rng.uniform(0.07, 0.22) * side  # the shape's half-extent
    theta = rng.uniform(0, np.pi)
    if kind == "polygon":
        n = int(rng.integers(5, 10))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = r * rng.uniform(0.45, 1.0, n)
        pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
        # fillPoly samples pixel (x, y) at its integer coordinates: shift by half a pixel so the
        # test point is the pixel centre, as for the analytic shapes.
        fixed = np.round((pts - 0.5) * (1 << _POLY_SHIFT)).astype(np.int32)
        mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(mask, [fixed], 1, lineType=cv2.LINE_8, shift=_POLY_SHIFT)
        return mask.astype(bool), (cx, cy)
    aspect = rng.uniform(0.35, 1.0)
    a, b = r, r * aspect
    ys, xs = np.mgrid[0:h, 0:w]
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    if kind == "ellipse":
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0, (cx, cy)
    return (np.abs(u) <= a) & (np.abs(v) <= b), (cx, cy)


def _colour(rng: np.random.Generator, avoid: list[np.ndarray]) -> np.ndarray:
    """A random RGB colour at least ``_MIN_CONTRAST`` from every colour in ``avoid`` (best of 50 tries)."""
    best, best_d = None, -1.0
    for _ in range(50):
        c = rng.uniform(0, 255, 3)
        d = min((float(np.linalg.norm(c - o)) for o in avoid), default=np.inf)
        if d >= _MIN_CONTRAST:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def make_scene(
    seed: int,
    size: tuple[int, int] = (512, 512),
    num_shapes: tuple[int, int] = (3, 6),
    min_area: int | None = None,
) -> Scene:
    """The scene of ``seed``: ``num_shapes`` (inclusive range) shapes on a gradient background.

    ``size`` is (H, W). ``min_area`` (pixels) drops shapes that occlusion leaves smaller; by
    default 0.2 % of the image, at least 64 pixels.
    """
    h, w = int(size[0]), int(size[1])
    if h < 16 or w < 16:
        raise ValueError(f"scene size must be at least 16 × 16, got {size}")
    lo, hi = num_shapes
    if not 1 <= lo <= hi:
        raise ValueError(f"num_shapes must be (low, high) with 1 <= low <= high, got {num_shapes}")
    if min_area is None:
        min_area = max(64, int(0.002 * h * w))
    rng = np.random.default_rng(seed)
    canvas = _background(rng, h, w)
    k = int(rng.integers(lo, hi + 1))
    rasters, kinds, colours = [], [], []
    for _ in range(k):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        raster, (cx, cy) = _raster(rng, kind, h, w)
        under = canvas[min(h - 1, int(cy)), min(w - 1, int(cx))]
        colour = _colour(rng, [under, *colours])
        texture = rng.uniform(2, 10)
        noise = rng.normal(0, texture, (h, w, 3))
        canvas[raster] = colour + noise[raster]
        rasters.append(raster)
        kinds.append(kind)
        colours.append(colour)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)

    covered = np.zeros((h, w), bool)  # painted by a later shape
    visible: list[np.ndarray] = []
    kept_kinds: list[str] = []
    kept_index: list[int] = []
    for i in reversed(range(k)):
        vis = rasters[i] & ~covered
        covered |= rasters[i]
        if vis.sum() >= min_area:
            visible.append(vis)
            kept_kinds.append(kinds[i])
            kept_index.append(i)
    visible.reverse()
    kept_kinds.reverse()
    kept_index.reverse()
    masks = np.stack(visible) if visible else np.zeros((0, h, w), bool)
    boxes = np.stack([mask_to_box(m) for m in masks]) if visible else np.zeros((0, 4), np.float32)
    return Scene(
        image=image,
        masks=masks,
        boxes=boxes,
        kinds=tuple(kept_kinds),
        seed=int(seed),
        shapes=np.stack(rasters),
        shape_index=np.asarray(kept_index, np.int64),
    )
