"""Engine results → ``sv.Detections``: one detection per prompt that produced a mask.

Pure data shaping (numpy and supervision, no model): the engine gives masks and scores per
prompt; this module keeps the prompts whose mask is non-empty and scores at least the threshold,
in prompt order, and attaches the prompt's class and identity.
"""

from __future__ import annotations

import uuid
from typing import Sequence

import numpy as np
import supervision as sv


def masks_to_detections(
    masks: np.ndarray,
    scores: np.ndarray,
    class_ids: Sequence[int],
    class_names: Sequence[str],
    parent_ids: Sequence[str | None] | None = None,
    threshold: float = 0.0,
) -> sv.Detections:
    """Build detections from per-prompt masks (N, H, W) bool and scores (N,).

    ``xyxy`` is each mask's bounding box; a prompt whose mask is empty or whose score is below
    ``threshold`` yields no detection. ``data`` holds ``class_name``, a new unique
    ``detection_id`` and, when given, the prompting detection's id as ``parent_id``.
    """
    n = len(scores)
    if not (len(masks) == len(class_ids) == len(class_names) == n) or (parent_ids is not None and len(parent_ids) != n):
        raise ValueError("masks, scores, class ids, class names and parent ids must have one entry per prompt")
    keep = np.flatnonzero((np.asarray(scores) >= threshold) & masks.reshape(n, -1).any(axis=1)) if n else np.zeros(0, int)
    if len(keep) == 0:
        h, w = masks.shape[1:] if masks.ndim == 3 else (0, 0)
        empty = sv.Detections(
            xyxy=np.zeros((0, 4), np.float32),
            mask=np.zeros((0, h, w), bool),
            confidence=np.zeros(0, np.float32),
            class_id=np.zeros(0, int),
        )
        empty.data = {"class_name": np.array([], dtype=object), "detection_id": np.array([], dtype=object)}
        if parent_ids is not None:
            empty.data["parent_id"] = np.array([], dtype=object)
        return empty
    kept_masks = masks[keep]
    data = {
        "class_name": np.array([str(class_names[i]) for i in keep], dtype=object),
        "detection_id": np.array([str(uuid.uuid4()) for _ in keep], dtype=object),
    }
    if parent_ids is not None:
        data["parent_id"] = np.array([parent_ids[i] for i in keep], dtype=object)
    return sv.Detections(
        xyxy=sv.mask_to_xyxy(kept_masks).astype(np.float32),
        mask=kept_masks,
        confidence=np.asarray(scores, np.float32)[keep],
        class_id=np.asarray(class_ids, int)[keep],
        data=data,
    )
