"""Engine results → ``sv.Detections``: one detection per prompt that produced a mask.

Pure data shaping (numpy and supervision, no model): the engine gives masks and scores per
prompt; this module keeps the prompts whose mask is non-empty and scores at least the threshold,
in prompt order, and attaches the prompt's class and identity.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

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
    keep = (
        np.flatnonzero((np.asarray(scores) >= threshold) & masks.reshape(n, -1).any(axis=1)) if n else np.zeros(0, int)
    )
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


KEYPOINT_CONFIDENCE = 0.5  # keypoints at least this confident become positive clicks


def prompt_fields(detections: sv.Detections) -> tuple[list[int], list[str], list[str | None]]:
    """Class ids, class names and detection ids of prompting detections (names default to ids)."""
    n = len(detections)
    class_ids = [int(c) for c in detections.class_id] if detections.class_id is not None else list(range(n))
    names = detections.data.get("class_name")
    class_names = [str(names[i]) if names is not None else str(class_ids[i]) for i in range(n)]
    ids = detections.data.get("detection_id")
    parent_ids = [None if ids is None or ids[i] is None else str(ids[i]) for i in range(n)]
    return class_ids, class_names, parent_ids


def keypoint_clicks(detections: sv.Detections, min_confidence: float = KEYPOINT_CONFIDENCE) -> list[np.ndarray]:
    """Per detection, its keypoints with confidence >= ``min_confidence`` as (K, 2) pixels."""
    xy = detections.data.get("keypoints_xy")
    if xy is None:
        return [np.zeros((0, 2), np.float32) for _ in range(len(detections))]
    conf = detections.data.get("keypoints_confidence")
    out = []
    for i in range(len(detections)):
        points = np.asarray(xy[i], np.float32).reshape(-1, 2)
        if conf is not None:
            points = points[np.asarray(conf[i], np.float32).reshape(-1) >= min_confidence]
        out.append(points)
    return out


def attach_image_metadata(
    detections: sv.Detections, image_hw: tuple[int, int], image_id: str, prediction_type: str = "instance-segmentation"
) -> sv.Detections:
    """Add the workflow metadata downstream steps rely on, for a full (uncropped) image.

    ``image_dimensions``, ``parent_dimensions``, ``root_parent_dimensions``: (N, 2) as (h, w);
    ``parent_coordinates``, ``root_parent_coordinates``: (N, 2) offsets (0, 0);
    ``root_parent_id`` the image's id; ``parent_id`` the image's id unless a prompting
    detection's id is already there; ``prediction_type``.
    """
    n = len(detections)
    dims = np.tile(np.array(image_hw, dtype=int), (n, 1))
    zeros = np.zeros((n, 2), dtype=int)
    detections.data["image_dimensions"] = dims
    detections.data["parent_dimensions"] = dims.copy()
    detections.data["root_parent_dimensions"] = dims.copy()
    detections.data["parent_coordinates"] = zeros
    detections.data["root_parent_coordinates"] = zeros.copy()
    detections.data["root_parent_id"] = np.array([image_id] * n, dtype=object)
    parents = detections.data.get("parent_id")
    detections.data["parent_id"] = np.array(
        [image_id if parents is None or parents[i] is None else parents[i] for i in range(n)], dtype=object
    )
    detections.data["prediction_type"] = np.array([prediction_type] * n, dtype=object)
    return detections
