"""Draw detections on an image with supervision's annotators."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import supervision as sv


def annotate(image: np.ndarray, detections: sv.Detections) -> np.ndarray:
    """RGB image (H, W, 3) → RGB copy with masks, boxes and class labels drawn."""
    scene = np.ascontiguousarray(image[:, :, ::-1])  # supervision draws on BGR arrays
    labels = (
        [f"{name} {conf:.2f}" for name, conf in zip(detections.data.get("class_name", []), detections.confidence)]
        if detections.confidence is not None
        else None
    )
    scene = sv.MaskAnnotator(opacity=0.45).annotate(scene, detections)
    scene = sv.BoxAnnotator(thickness=2).annotate(scene, detections)
    if len(detections):
        scene = sv.LabelAnnotator(text_scale=0.5).annotate(scene, detections, labels=labels)
    return scene[:, :, ::-1]


def write_annotated(image: np.ndarray, detections: sv.Detections, path: str | Path) -> None:
    """Write the annotated image (format from the suffix, e.g. ``.png``)."""
    bgr = np.ascontiguousarray(annotate(image, detections)[:, :, ::-1])
    if not cv2.imwrite(str(path), bgr):
        raise ValueError(f"cannot write annotated image to {path}")
