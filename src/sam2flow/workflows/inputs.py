"""Workflow inputs as users hand them over: images and detections in their usual forms."""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import supervision as sv

from ..engine.transforms import as_rgb_uint8
from ..formats import predictions_to_detections


class ImageTooLarge(ValueError):
    """An image over the pixel limit (a decompression bomb, or just too big to serve)."""


_OBJECT_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def decode_image_bytes(data: bytes, where: str, max_pixels: int | None = None) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) → RGB uint8 (H, W, 3).

    The header is read first: an image of more than ``max_pixels`` is refused before any pixel
    is decoded, so a small file that would inflate to gigabytes costs nothing.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageTooLarge(f"{where}: image of {w}x{h} pixels is over the limit of {max_pixels}")
            return np.asarray(im.convert("RGB")).copy()
    except ImageTooLarge:
        raise
    except UnidentifiedImageError:
        raise ValueError(f"{where}: not a readable image (unknown or corrupt format)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        # Pillow's messages may name an object by address: keep errors the same run to run
        raise ValueError(f"{where}: not a readable image ({_OBJECT_ADDRESS.sub('data', str(e))})") from None


def decode_base64_image(text: str, where: str, max_pixels: int | None = None) -> np.ndarray:
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: not valid base64") from None
    return decode_image_bytes(data, where, max_pixels)


def _is_file(text: str) -> bool:
    try:
        return len(text) < 4096 and Path(text).is_file()
    except OSError:  # a base64 string is no path (too long a name, say)
        return False


def load_image(value: Any, where: str) -> np.ndarray:
    """An image from a numpy array (RGB), a file path, a base64 string or a
    ``{"type": "numpy"|"base64"|"file", "value": ...}`` dict; always RGB uint8 (H, W, 3)."""
    if isinstance(value, np.ndarray):
        return as_rgb_uint8(value, where)
    if isinstance(value, Path):
        value = {"type": "file", "value": str(value)}
    if isinstance(value, str):
        value = {"type": "file" if _is_file(value) else "base64", "value": value}
    if not isinstance(value, dict) or "value" not in value:
        raise ValueError(f"{where}: expected an image (numpy array, path, base64 or {{'type', 'value'}}), "
                         f"got {type(value).__name__}")
    kind, payload = value.get("type"), value["value"]
    if kind == "numpy":
        try:
            array = np.asarray(payload)
        except (ValueError, TypeError):
            raise ValueError(f"{where}: numpy value is not an array") from None
        return as_rgb_uint8(array, where)
    if kind == "base64":
        if not isinstance(payload, str):
            raise ValueError(f"{where}: base64 value must be a string")
        return decode_base64_image(payload, where)
    if kind == "file":
        path = Path(str(payload))
        if not path.is_file():
            raise ValueError(f"{where}: file {path} does not exist")
        return decode_image_bytes(path.read_bytes(), where)
    raise ValueError(f"{where}: image type {kind!r} is not supported (numpy, base64 or file)")


def _is_single_image(value: Any) -> bool:
    return not isinstance(value, (list, tuple))


def image_batch(value: Any, where: str) -> list[np.ndarray]:
    """One image or a list of images → a list of RGB arrays."""
    items = [value] if _is_single_image(value) else list(value)
    if not items:
        raise ValueError(f"{where}: the image batch is empty")
    return [load_image(v, f"{where}[{i}]") for i, v in enumerate(items)]


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
