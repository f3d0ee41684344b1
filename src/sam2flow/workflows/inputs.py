"""Workflow inputs as users hand them over: images and detections in their usual forms."""

from __future__ import annotations

from typing import Any

import numpy as np
import supervision as sv

from ..formats import predictions_to_detections
from ..images import ImageLoader, local_loader


def _is_single_image(value: Any) -> bool:
    return not isinstance(value, (list, tuple))


def image_batch(value: Any, where: str, load: ImageLoader | None = None) -> list[np.ndarray]:
    """One image or a list of images → a list of RGB arrays, each decoded by ``load``.

    ``load`` defaults to ``sam2flow.images.load_image`` (every local form); the server passes its
    wire loader, which accepts only ``{"type": "base64"|"numpy"|"url", "value"}``.
    """
    load = load or local_loader()
    items = [value] if _is_single_image(value) else list(value)
    if not items:
        raise ValueError(f"{where}: the image batch is empty")
    return [load(v, f"{where}[{i}]") for i, v in enumerate(items)]


def _is_single_detections(value: Any) -> bool:
    if isinstance(value, (sv.Detections, dict)):
        return True
    # A flat list of prediction dicts is one image's predictions; a list of anything else a batch.
    return isinstance(value, list) and (not value or (isinstance(value[0], dict) and "x" in value[0]))


def detections_batch(value: Any, image_sizes: list[tuple[int, int]], where: str) -> list[sv.Detections]:
    """Detections for each image: ``sv.Detections`` or the JSON prediction format, one or a batch."""
    items = [value] if _is_single_detections(value) else list(value)
    if len(items) == 1 and len(image_sizes) > 1:
        raise ValueError(f"{where}: one set of detections for {len(image_sizes)} images; give one per image")
    if len(items) != len(image_sizes):
        raise ValueError(f"{where}: {len(items)} sets of detections for {len(image_sizes)} images")
    out = []
    for i, (item, hw) in enumerate(zip(items, image_sizes)):
        if isinstance(item, sv.Detections):
            out.append(item)
            continue
        try:
            out.append(predictions_to_detections(item, hw))
        except ValueError as e:
            raise ValueError(f"{where}[{i}]: {e}") from None
    return out
