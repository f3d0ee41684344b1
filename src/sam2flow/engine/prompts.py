"""Prompts: validated boxes and clicks for one image, grouped for batched decoding.

``Prompt`` and ``PromptArrays`` are declared with the engine's other contracts in ``engine/types.py``
(and importable from here as before).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .types import LOW_RES, Prompt, PromptArrays

__all__ = [
    "Prompt",
    "PromptArrays",
    "PromptBudget",
    "PromptLimitError",
    "check_boxes",
    "check_mask_input",
    "check_points",
    "group_prompts",
    "prompt_arrays",
    "prompt_points",
]


def _finite(a: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(a).reshape(len(a), -1).all(axis=1) if a.size else np.zeros(0, bool)
    if bad.any():
        raise ValueError(f"{what} {int(np.argmax(bad))} has a NaN or infinite coordinate")


def check_boxes(boxes, image_hw: tuple[int, int]) -> np.ndarray:
    """(N, 4) xyxy float32 boxes, clipped to the image; NaN, inverted, empty or outside → ValueError."""
    try:
        b = np.array(boxes, dtype=np.float32)  # a copy: the clipping below must not edit the caller's boxes
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
    """(N, 1, 256, 256) float32 low-resolution logits (``LOW_RES`` a side)."""
    m = np.asarray(mask_input, dtype=np.float32)
    if m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[1:] != (1, LOW_RES, LOW_RES) or m.shape[0] != n:
        raise ValueError(f"mask_input must have shape ({n}, {LOW_RES}, {LOW_RES}), got {m.shape}")
    _finite(m, "mask_input")
    return m


def prompt_arrays(boxes, points, point_labels, mask_input, image_hw: tuple[int, int]) -> PromptArrays:
    """N prompts of one image given as arrays, validated: ``boxes`` (N, 4) x1, y1, x2, y2 pixels;
    ``points`` (N, P, 2) x, y pixels (or (P, 2) for one prompt) with ``point_labels`` (N, P) of 1/0;
    both together give each box its clicks; ``mask_input`` (N, 256, 256) low-resolution logits.
    N = 0 (a detector that found nothing) is allowed: ``count`` is then 0."""
    b = check_boxes(boxes, image_hw) if boxes is not None else None
    if points is None and point_labels is not None:
        raise ValueError("point_labels were given without points")
    p, lab = check_points(points, point_labels) if points is not None else (None, None)
    if b is None and p is None:
        raise ValueError("predict() needs boxes, points, or both")
    if b is not None and p is not None and len(b) != len(p):
        raise ValueError(f"{len(b)} boxes but {len(p)} point prompts: they must pair one to one")
    n = len(b) if b is not None else len(p)
    m = check_mask_input(mask_input, n) if mask_input is not None and n else None
    return PromptArrays(b, p, lab, m)


def prompt_points(prompts: PromptArrays) -> tuple[np.ndarray, np.ndarray]:
    """The points the prompt encoder takes: coordinates (N, P, 2) float32 pixels and labels (N, P) int32.

    A box is its two corners labelled 2 and 3, ahead of the clicks (labelled 1 / 0), as in SAM2.
    """
    coords, labels = [], []
    if prompts.boxes is not None:
        coords.append(prompts.boxes.reshape(-1, 2, 2))
        labels.append(np.tile(np.array([[2, 3]], np.int32), (prompts.count, 1)))
    if prompts.points is not None:
        coords.append(prompts.points)
        labels.append(prompts.labels)
    return np.concatenate(coords, 1).astype(np.float32), np.concatenate(labels, 1).astype(np.int32)


def _check_prompt(p: Prompt, image_hw: tuple[int, int]) -> PromptArrays:
    """One prompt as arrays with a leading axis of 1."""
    if p.points is None and p.labels is not None:
        raise ValueError("labels were given without points")
    if p.box is None and (p.points is None or len(p.points) == 0):  # points=[] is no prompt either
        raise ValueError("it has neither a box nor points")
    boxes = check_boxes([p.box], image_hw) if p.box is not None else None
    points = labels = None
    if p.points is not None:
        if p.labels is None:
            raise ValueError("it has points without labels")
        points, labels = check_points([p.points], [p.labels])
    masks = check_mask_input(np.asarray(p.mask_input)[None], 1) if p.mask_input is not None else None
    return PromptArrays(boxes, points, labels, masks)


def _stack(parts: list[PromptArrays]) -> PromptArrays:
    def cat(name):
        arrays = [getattr(a, name) for a in parts]
        return None if arrays[0] is None else np.concatenate(arrays)

    return PromptArrays(cat("boxes"), cat("points"), cat("labels"), cat("mask_input"))


def group_prompts(prompts: Sequence[Prompt], image_hw: tuple[int, int]) -> list[tuple[list[int], PromptArrays]]:
    """Validate prompts and group those of the same shape, so that each group is one decoder call.

    Prompts with different numbers of points cannot share a call without padding tokens that
    change the result, so they are decoded in separate calls. Returns (indices, arrays) pairs.
    Errors name the prompt's index in ``prompts``.
    """
    groups: dict[tuple, list[int]] = {}
    checked: list[PromptArrays] = []
    for i, p in enumerate(prompts):
        try:
            a = _check_prompt(p, image_hw)
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None
        checked.append(a)
        n_points = 0 if a.points is None else a.points.shape[1]
        groups.setdefault((a.boxes is not None, n_points, a.mask_input is not None), []).append(i)
    return [(idx, _stack([checked[i] for i in idx])) for idx in groups.values()]


class PromptLimitError(ValueError):
    """More prompts than a server allows (answered with 413, naming the limit)."""


@dataclass
class PromptBudget:
    """How many prompts one request may decode: ``per_image`` for any one image, ``per_request``
    for all images and steps together (``None``: no limit). ``take`` counts and refuses."""

    per_image: int | None = None
    per_request: int | None = None
    used: int = 0

    def take(self, counts: Sequence[int], where: str = "request") -> None:
        """Count the prompts of a batch of images (one count per image), or raise naming the limit."""
        for i, n in enumerate(counts):
            if self.per_image is not None and n > self.per_image:
                image = f" image {i}" if len(counts) > 1 else ""
                raise PromptLimitError(
                    f"{where}:{image} {n} prompts is more than this server's limit of "
                    f"{self.per_image} per image (SAM2FLOW_MAX_PROMPTS)"
                )
        total = self.used + sum(counts)
        if self.per_request is not None and total > self.per_request:
            raise PromptLimitError(
                f"{where}: {total} prompts in one request is more than this server's limit of "
                f"{self.per_request} (SAM2FLOW_MAX_REQUEST_PROMPTS)"
            )
        self.used = total
