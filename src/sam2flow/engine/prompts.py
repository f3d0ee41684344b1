"""Prompts: validated boxes and clicks for one image, grouped for batched decoding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Prompt:
    """One object to segment: a box (x1, y1, x2, y2 in pixels), clicks, or both.

    ``points`` are (x, y) pixels, ``labels`` 1 (positive) or 0 (negative), one per point.
    ``mask_input`` is optional low-resolution logits (256 × 256) from an earlier prediction.
    """

    box: Sequence[float] | None = None
    points: Sequence[Sequence[float]] | None = None
    labels: Sequence[int] | None = None
    mask_input: np.ndarray | None = None


@dataclass(frozen=True)
class PromptArrays:
    """Validated prompts of one shape: boxes (N, 4) or None, points (N, P, 2) or None, labels (N, P)."""

    boxes: np.ndarray | None
    points: np.ndarray | None
    labels: np.ndarray | None
    mask_input: np.ndarray | None  # (N, 1, 256, 256)

    @property
    def count(self) -> int:
        for a in (self.boxes, self.points, self.mask_input):
            if a is not None:
                return a.shape[0]
        return 0


def _finite(a: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(a).reshape(a.shape[0], -1).all(axis=1)
    if bad.any():
        raise ValueError(f"{what} {int(np.argmax(bad))} has a NaN or infinite coordinate")


def check_boxes(boxes, image_hw: tuple[int, int]) -> np.ndarray:
    """(N, 4) xyxy float32 boxes, clipped to the image; NaN, inverted, empty or outside → ValueError."""
    try:
        b = np.asarray(boxes, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError("boxes must be numbers (x1, y1, x2, y2)") from None
    if b.ndim == 1 and b.size == 4:
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) as x1, y1, x2, y2, got {b.shape}")
    _finite(b, "box")
    h, w = image_hw
    for i, (x1, y1, x2, y2) in enumerate(b):
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"box {i} {[float(v) for v in (x1, y1, x2, y2)]} is inverted or has zero area")
        if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
            raise ValueError(f"box {i} {[float(v) for v in (x1, y1, x2, y2)]} lies outside the {w}x{h} image")
    # Detectors emit boxes that overhang the image; the model only knows the image.
    np.clip(b[:, 0::2], 0, w, out=b[:, 0::2])
    np.clip(b[:, 1::2], 0, h, out=b[:, 1::2])
    return b


def check_points(points, labels) -> tuple[np.ndarray, np.ndarray]:
    """(N, P, 2) float32 points and (N, P) int32 labels; a (P, 2) array is one prompt."""
    if labels is None:
        raise ValueError("points were given without point_labels (1 = positive, 0 = negative)")
    try:
        p = np.asarray(points, dtype=np.float32)
        lab = np.asarray(labels)
    except (TypeError, ValueError):
        raise ValueError("points must be numbers (x, y) and labels integers") from None
    if p.ndim == 2:
        p, lab = p[None], lab[None]
    if p.ndim != 3 or p.shape[2] != 2 or p.shape[1] == 0:
        raise ValueError(f"points must have shape (N, P, 2) or (P, 2) with P >= 1, got {np.shape(points)}")
    if lab.shape != p.shape[:2]:
        raise ValueError(f"point_labels shape {lab.shape} does not match points {p.shape[:2]}")
    _finite(p, "point prompt")
    if not np.isin(lab, (0, 1)).all():
        raise ValueError(f"point labels must be 0 (negative) or 1 (positive), got {sorted(set(lab.ravel().tolist()))}")
    return p, lab.astype(np.int32)


def check_mask_input(mask_input, n: int) -> np.ndarray:
    """(N, 1, 256, 256) float32 low-resolution logits."""
    m = np.asarray(mask_input, dtype=np.float32)
    if m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[1:] != (1, 256, 256) or m.shape[0] != n:
        raise ValueError(f"mask_input must have shape ({n}, 256, 256), got {m.shape}")
    _finite(m, "mask_input")
    return m


def group_prompts(prompts: Sequence[Prompt], image_hw: tuple[int, int]) -> list[tuple[list[int], PromptArrays]]:
    """Validate prompts and group those of the same shape, so that each group is one decoder call.

    Prompts with different numbers of points cannot share a call without padding tokens that
    change the result, so they are decoded in separate calls. Returns (indices, arrays) pairs.
    """
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        n_points = 0 if p.points is None else len(p.points)
        if p.box is None and n_points == 0:  # points=[] is no prompt either
            raise ValueError(f"prompt {i} has neither a box nor points")
        groups.setdefault((p.box is not None, n_points, p.mask_input is not None), []).append(i)
    out = []
    for (has_box, n_points, has_mask), idx in groups.items():
        sel = [prompts[i] for i in idx]
        boxes = check_boxes([p.box for p in sel], image_hw) if has_box else None
        points = labels = None
        if n_points:
            if any(p.labels is None for p in sel):
                raise ValueError(f"prompt {idx[[p.labels is None for p in sel].index(True)]} has points without labels")
            points, labels = check_points([p.points for p in sel], [p.labels for p in sel])
        masks = check_mask_input(np.stack([np.asarray(p.mask_input) for p in sel]), len(sel)) if has_mask else None
        out.append((idx, PromptArrays(boxes, points, labels, masks)))
    return out
