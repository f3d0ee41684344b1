"""Folder mode of the labelling page: the images of one directory, and their objects in one COCO file.

``FolderStore`` lists the images under a directory (read-only: it never writes there, and never
serves a file outside it: every name is resolved, symlinks included, and checked to lie inside),
and keeps each image's objects in a COCO JSON document (``coco_document``), rewritten atomically
(a temporary file in the same directory, then ``os.replace``) after every change, so a closed
browser or a restarted server loses nothing. The COCO format: https://cocodataset.org/#format-data
(object segmentation as RLE with ``counts`` a compressed string, ``bbox`` x, y, width, height).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from ..formats import mask_to_polygons, rle_to_mask

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
MAX_LABEL_CHARS = 100


@dataclass
class LabelledObject:
    """One object of an image: its class name, mask (COCO RLE of the full image), score and prompt.

    ``prompt``: ``{"box": [x1, y1, x2, y2] | None, "points": [[x, y, label], ...]}`` in image pixels.
    """

    label: str
    rle: dict
    score: float | None = None
    prompt: dict | None = None

    @classmethod
    def parse(cls, item: Any, hw: tuple[int, int], where: str) -> LabelledObject:
        """Validate one object as sent by the page; ``ValueError`` naming ``where`` otherwise."""
        if not isinstance(item, dict):
            raise ValueError(f"{where}: an object must be a JSON object")
        label = item.get("label")
        if not isinstance(label, str) or not label.strip() or len(label) > MAX_LABEL_CHARS:
            raise ValueError(f"{where}.label: a class name of 1 to {MAX_LABEL_CHARS} characters is required")
        rle = item.get("rle")
        if not isinstance(rle, dict) or not isinstance(rle.get("counts"), str):
            raise ValueError(f"{where}.rle: a COCO RLE with compressed string counts is required")
        mask = rle_to_mask(rle)  # checks the runs cover size exactly
        if mask.shape != hw:
            raise ValueError(f"{where}.rle: size {list(mask.shape)} is not the image's {list(hw)}")
        score = item.get("score")
        prompt = item.get("prompt")
        return cls(
            label.strip(),
            {"size": list(hw), "counts": rle["counts"]},
            float(score) if isinstance(score, (int, float)) else None,
            prompt if isinstance(prompt, dict) else None,
        )


@dataclass
class LabelledImage:
    """One image and its objects; ``hw`` is (height, width) in pixels."""

    file_name: str
    hw: tuple[int, int]
    objects: list[LabelledObject] = field(default_factory=list)


def category_names(labels: Sequence[str], images: Sequence[LabelledImage]) -> list[str]:
    """The given labels in order, then any other class used by an object, in order of first use."""
    names = list(dict.fromkeys(labels))
    for image in images:
        for obj in image.objects:
            if obj.label not in names:
                names.append(obj.label)
    return names


def coco_document(images: Sequence[LabelledImage], labels: Sequence[str] = (), polygons: bool = False) -> dict:
    """A COCO instance-segmentation document: categories numbered from 1 in ``category_names`` order.

    ``polygons``: segmentation as polygons (``[[x1, y1, x2, y2, ...], ...]``, outlines of the mask)
    instead of RLE; ``area`` and ``bbox`` always come from the mask itself.
    """
    names = category_names(labels, images)
    ids = {name: i + 1 for i, name in enumerate(names)}
    doc: dict[str, Any] = {
        "info": {"description": "sam2flow labelling page"},
        "images": [],
        "annotations": [],
        "categories": [{"id": ids[n], "name": n, "supercategory": ""} for n in names],
    }
    for image_id, image in enumerate(images, start=1):
        h, w = image.hw
        doc["images"].append({"id": image_id, "file_name": image.file_name, "width": w, "height": h})
        for obj in image.objects:
            compressed = {"size": [h, w], "counts": obj.rle["counts"].encode("ascii")}
            ann = {
                "id": len(doc["annotations"]) + 1,
                "image_id": image_id,
                "category_id": ids[obj.label],
                "segmentation": {"size": [h, w], "counts": obj.rle["counts"]},
                "area": int(mask_utils.area(compressed)),
                "bbox": [float(v) for v in mask_utils.toBbox(compressed)],
                "iscrowd": 0,
            }
            if polygons:
                outlines = mask_to_polygons(rle_to_mask(obj.rle))
                ann["segmentation"] = [p.reshape(-1).astype(float).tolist() for p in outlines if len(p) >= 3]
            if obj.score is not None:
                ann["score"] = obj.score
            if obj.prompt is not None:
                ann["sam2flow_prompt"] = obj.prompt
            doc["annotations"].append(ann)
    return doc


def images_from_coco(doc: dict) -> dict[str, LabelledImage]:
    """The inverse of ``coco_document`` (RLE segmentations), keyed by file name."""
    names = {c["id"]: c["name"] for c in doc.get("categories", [])}
    by_id = {
        im["id"]: LabelledImage(im["file_name"], (int(im["height"]), int(im["width"]))) for im in doc.get("images", [])
    }
    for ann in doc.get("annotations", []):
        image = by_id[ann["image_id"]]
        seg = ann["segmentation"]
        if not isinstance(seg, dict):
            raise ValueError(f"annotation {ann.get('id')}: folder mode keeps RLE segmentations only")
        image.objects.append(
            LabelledObject(
                names[ann["category_id"]],
                {"size": list(image.hw), "counts": seg["counts"]},
                ann.get("score"),
                ann.get("sam2flow_prompt"),
            )
        )
    return {im.file_name: im for im in by_id.values()}


def write_json_atomic(path: Path, doc: dict) -> None:
    """Write ``doc`` to ``path`` so that a reader sees the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FolderStore:
    """The images of ``root`` (read-only) and their objects, saved to the COCO file ``annotations``."""

    def __init__(self, root: str | Path, annotations: str | Path, labels: Sequence[str] = ()):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"--images {root}: not a directory")
        self.path = Path(annotations).resolve()
        if self.path.parent == self.root or self.root in self.path.parents:
            raise ValueError(f"--annotations {annotations}: must not be inside --images (it is read-only)")
        self.labels = list(dict.fromkeys(labels))
        self._lock = threading.Lock()
        self._images: dict[str, LabelledImage] = {}
        if self.path.exists():
            try:
                self._images = images_from_coco(json.loads(self.path.read_text()))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"--annotations {annotations}: not a COCO file of this page ({e})") from None

    def names(self) -> list[str]:
        """Image files under the root (hidden ones skipped), as sorted relative POSIX paths."""
        found = []
        for p in self.root.rglob("*"):
            rel = p.relative_to(self.root)
            if p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in rel.parts):
                if self.resolve(rel.as_posix()) is not None:
                    found.append(rel.as_posix())
        return sorted(found)

    def resolve(self, name: str) -> Path | None:
        """The file ``name`` names inside the root, or None: absolute, outside (after symlinks),
        hidden, not an image file, or absent."""
        if not name or name.startswith(("/", "\\")) or "\\" in name or "\x00" in name:
            return None
        path = (self.root / name).resolve()
        if self.root not in path.parents or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            return None
        if any(part.startswith(".") for part in path.relative_to(self.root).parts):
            return None
        return path

    def objects(self, name: str) -> LabelledImage | None:
        with self._lock:
            return self._images.get(name)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {name: len(im.objects) for name, im in self._images.items()}

    def save(self, image: LabelledImage) -> None:
        """Replace one image's objects and rewrite the COCO file (atomically)."""
        with self._lock:
            self._images[image.file_name] = image
            ordered = [self._images[n] for n in sorted(self._images)]
            write_json_atomic(self.path, coco_document(ordered, self.labels))

    def document(self) -> dict:
        with self._lock:
            return coco_document([self._images[n] for n in sorted(self._images)], self.labels)
