"""Request images → RGB arrays, within the server's limits."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import numpy as np

from ..engine.transforms import as_rgb_uint8
from ..workflows.inputs import ImageTooLarge, decode_base64_image, decode_image_bytes
from .settings import ServerSettings


class PayloadTooLarge(ImageTooLarge):
    """Answered with 413."""


def fetch_url(url: str, settings: ServerSettings, where: str) -> bytes:
    """GET an http(s) image with a size limit and a timeout; only when URL images are enabled."""
    if not settings.allow_url_images:
        raise ValueError(f"{where}: URL images are disabled on this server (SAM2FLOW_ALLOW_URL_IMAGES=true enables them)")
    if not url.lower().startswith(("http://", "https://")):
        raise ValueError(f"{where}: only http(s) URLs are allowed, got {url[:40]!r}")
    try:
        with urllib.request.urlopen(url, timeout=settings.url_timeout_s) as response:  # noqa: S310 (scheme checked)
            data = response.read(settings.url_max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ValueError(f"{where}: cannot fetch {url[:80]} ({e})") from None
    if len(data) > settings.url_max_bytes:
        raise PayloadTooLarge(f"{where}: {url[:80]} is over {settings.url_max_bytes} bytes")
    return data


def load_request_image(ref: Any, settings: ServerSettings, where: str = "image") -> np.ndarray:
    """``{"type": "base64"|"numpy"|"url", "value": ...}`` → RGB uint8 (H, W, 3), size-checked."""
    if not isinstance(ref, dict) or "type" not in ref or "value" not in ref:
        raise ValueError(f"{where}: expected {{'type': 'base64'|'numpy'|'url', 'value': ...}}")
    kind, value = ref["type"], ref["value"]
    if kind == "base64":
        if not isinstance(value, str):
            raise ValueError(f"{where}: base64 value must be a string")
        image = decode_base64_image(value, where, settings.max_image_pixels)
    elif kind == "url":
        if not isinstance(value, str):
            raise ValueError(f"{where}: url value must be a string")
        image = decode_image_bytes(fetch_url(value, settings, where), where, settings.max_image_pixels)
    elif kind == "numpy":
        try:
            array = np.asarray(value)
        except (ValueError, TypeError):
            raise ValueError(f"{where}: numpy value is not a rectangular array") from None
        if array.ndim >= 2 and array.shape[0] * array.shape[1] > settings.max_image_pixels:
            raise ImageTooLarge(f"{where}: image over the limit of {settings.max_image_pixels} pixels")
        image = as_rgb_uint8(array, where)
    else:
        raise ValueError(f"{where}: image type {kind!r} is not supported (base64, numpy or url)")
    h, w = image.shape[:2]
    if min(h, w) < settings.min_image_side:
        raise ValueError(f"{where}: image of {w}x{h} pixels is smaller than {settings.min_image_side} pixels a side")
    return image


def resolve_workflow_images(value: Any, settings: ServerSettings, where: str) -> Any:
    """Decode image references inside workflow inputs (``{"type", "value"}`` dicts, or lists of them)."""
    if isinstance(value, dict) and value.get("type") in ("base64", "numpy", "url") and "value" in value:
        return load_request_image(value, settings, where)
    if isinstance(value, list) and value and all(isinstance(v, dict) and v.get("type") in ("base64", "numpy", "url")
                                                 for v in value):
        return [load_request_image(v, settings, f"{where}[{i}]") for i, v in enumerate(value)]
    return value
