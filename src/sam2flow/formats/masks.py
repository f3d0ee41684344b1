"""Masks: validation of one ``(H, W)`` mask, and the intersection over union of masks."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_mask(mask: Any, name: str) -> np.ndarray:
    """``mask`` as a bool ``(H, W)`` array (non-zero is True); ``ValueError`` naming ``name`` otherwise."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (H, W), got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be bool or numeric, got dtype {arr.dtype}")
    return arr.astype(bool)


def mask_iou(a: Any, b: Any) -> Any:
    """Intersection over union of masks ``(..., H, W)``, over the last two axes: ``(...)``.

    Leading axes broadcast (``(N, H, W)`` against ``(N, H, W)`` gives ``(N,)``, against ``(H, W)``
    each of N against one). Two empty masks have IoU 1. numpy input of any dtype counts non-zero as
    True and gives float64 (a ``numpy.float64``, a ``float``, for two ``(H, W)`` masks); bool torch tensors work as they
    are and give a float32 tensor (the training tool's case).
    """
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) or not hasattr(a, "sum"):
        a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    inter = (a & b).sum((-1, -2))
    union = (a | b).sum((-1, -2))
    empty = union == 0
    return (inter + empty) / (union + empty)  # both empty: 1 / 1
