"""Images in, RGB arrays out: the one place where images are decoded, fetched and checked.

Every entry point decodes through this module: the Python API and workflow inputs
(``load_image``), the CLI and batch jobs (``read_image_file``) and the HTTP server
(``load_wire_image``). The accepted forms, the pixel limit and the minimum side live here.

Two sets of forms:

- **local** (Python API, CLI, batch): a numpy array (RGB), a path (``str`` naming an existing
  file, or ``pathlib.Path``), a base64 string, or ``{"type": "numpy"|"base64"|"file"|"url", "value"}``.
  These callers already own the machine's files.
- **wire** (anything that arrived over HTTP): only ``{"type": "base64"|"numpy"|"url", "value"}``,
  and ``url`` only when the operator enabled it (``ImageLimits.allow_urls``). Paths, ``file``
  references and bare strings are refused with one message that does not depend on the value, so a
  client can neither read the server's files nor learn whether a path exists.

Encoded images are checked from their header: one over ``max_pixels`` is refused before any
pixel is decoded (a 140 KB PNG can inflate to gigabytes).
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import numpy as np

from .engine.transforms import as_rgb_uint8

WIRE_TYPES = ("base64", "numpy", "url")
LOCAL_TYPES = ("numpy", "base64", "file", "url")
WIRE_FORM = '{"type": "base64" | "numpy" | "url", "value": ...}'
_MAX_REDIRECTS = 3
_OBJECT_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


class ImageTooLarge(ValueError):
    """An image or download over a limit (a decompression bomb, or just too big): HTTP 413."""


@dataclass(frozen=True)
class ImageLimits:
    """What an entry point accepts.

    ``max_pixels``: width × height above which an image is refused from its header (``None``:
    Pillow's own decompression-bomb limit). ``min_side``: the shortest side allowed, in pixels.
    ``allow_urls``: whether ``{"type": "url"}`` images are fetched (http and https only);
    ``url_max_bytes`` and ``url_timeout_s`` bound each download (the timeout is for the whole
    transfer, not per read). ``url_hosts``: host names or IP addresses that may be fetched even
    when they resolve to loopback or private addresses, which are otherwise refused so that an
    enabled URL feature cannot reach the operator's internal services; ``None``: any host.
    """

    max_pixels: int | None = None
    min_side: int = 1
    allow_urls: bool = False
    url_max_bytes: int = 20 << 20
    url_timeout_s: float = 10.0
    url_hosts: tuple[str, ...] | None = ()

    def __post_init__(self):
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError("max_pixels must be >= 1 (or None)")
        if self.min_side < 1:
            raise ValueError("min_side must be >= 1")


# The Python API, the CLI and batch jobs: the user's own machine and network.
LOCAL = ImageLimits(allow_urls=True, url_hosts=None)


# ---- decoding --------------------------------------------------------------------------------


def decode_image_bytes(data: bytes, where: str, limits: ImageLimits = LOCAL) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) → RGB uint8 (H, W, 3), size-checked from the header."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise ValueError(f"{where}: not a readable image (unknown or corrupt format)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise _unreadable(where, e) from None
    with im:
        _check_size(im.size[1], im.size[0], where, limits)
        try:
            return np.asarray(im.convert("RGB")).copy()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise _unreadable(where, e) from None


def _unreadable(where: str, error: Exception) -> ValueError:
    # Pillow's messages may name an object by address: keep errors the same run to run
    return ValueError(f"{where}: not a readable image ({_OBJECT_ADDRESS.sub('data', str(error))})")


def decode_base64_image(text: str, where: str, limits: ImageLimits = LOCAL) -> np.ndarray:
    """Base64 text (optionally a ``data:`` URL) → RGB uint8 (H, W, 3)."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: not valid base64") from None
    return decode_image_bytes(data, where, limits)


def decode_array(value: Any, where: str, limits: ImageLimits = LOCAL) -> np.ndarray:
    """A numpy array or nested lists (H, W[, C]) of 0..255 integers → RGB uint8 (H, W, 3)."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise ValueError(f"{where}: numpy value is not a rectangular array") from None
    if array.dtype == object:
        raise ValueError(f"{where}: numpy value is not a rectangular array of numbers")
    image = as_rgb_uint8(array, where)
    _check_size(*image.shape[:2], where, limits)
    return image


def read_image_file(path: str | Path, where: str | None = None, limits: ImageLimits = LOCAL) -> np.ndarray:
    """An image file → RGB uint8 (H, W, 3); ``ValueError`` naming the file when it cannot be read."""
    path = Path(path)
    where = where or str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{where}: file {path} does not exist") from None
    except OSError as e:
        raise ValueError(f"{where}: cannot read {path} ({e.strerror or e})") from None
    return decode_image_bytes(data, where, limits)


def _check_size(h: int, w: int, where: str, limits: ImageLimits) -> None:
    if limits.max_pixels is not None and w * h > limits.max_pixels:
        raise ImageTooLarge(f"{where}: image of {w}x{h} pixels is over the limit of {limits.max_pixels} pixels")
    if min(h, w) < limits.min_side:
        raise ValueError(f"{where}: image of {w}x{h} pixels is smaller than {limits.min_side} pixels a side")


# ---- URLs ------------------------------------------------------------------------------------


def fetch_url(url: str, where: str, limits: ImageLimits, headers: Mapping[str, str] | None = None) -> bytes:
    """GET an http(s) URL within ``limits``: size, whole-transfer timeout, redirects re-checked.

    Needs urllib3 2 (``read1``). Each hop (at most 3 redirects) must be http or https and its
    host must resolve to public addresses only, unless it is one of ``limits.url_hosts``. Name resolution and connection
    are separate steps, so a host that changes its DNS answer in between (rebinding) is not caught:
    operators who need that guarantee put the server behind an egress proxy. ``headers`` (credentials,
    say) go only to the first URL's origin (scheme, host and port), never to a redirect elsewhere.
    """
    import requests

    if not limits.allow_urls:
        raise ValueError(
            f"{where}: URL images are disabled on this server (SAM2FLOW_ALLOW_URL_IMAGES=true enables them)"
        )
    deadline = time.monotonic() + limits.url_timeout_s
    origin = _origin(url)
    for _ in range(_MAX_REDIRECTS + 1):
        _check_url(url, where, limits)
        try:
            sent = headers if headers and _origin(url) == origin else None
            with requests.get(url, headers=sent, stream=True, allow_redirects=False, timeout=limits.url_timeout_s) as r:
                if r.is_redirect:
                    url = urljoin(url, r.headers.get("location", ""))
                    continue
                if r.status_code != 200:
                    raise ValueError(f"{where}: {_short(url)} answered HTTP {r.status_code}")
                declared = r.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limits.url_max_bytes:
                    raise ImageTooLarge(f"{where}: {_short(url)} is over the limit of {limits.url_max_bytes} bytes")
                return _read_body(r, url, where, limits, deadline)
        except requests.RequestException as e:
            raise ValueError(f"{where}: cannot fetch {_short(url)} ({type(e).__name__})") from None
    raise ValueError(f"{where}: {_short(url)}: more than {_MAX_REDIRECTS} redirects")


def _read_body(r, url: str, where: str, limits: ImageLimits, deadline: float) -> bytes:
    """Read what has arrived, one socket read at a time (urllib3's ``read1``), so a body that
    trickles in is stopped at the deadline: at most ``url_timeout_s`` plus one read's timeout."""
    body = bytearray()
    while chunk := r.raw.read1(64 << 10, decode_content=True):
        body += chunk
        if len(body) > limits.url_max_bytes:
            raise ImageTooLarge(f"{where}: {_short(url)} is over the limit of {limits.url_max_bytes} bytes")
        if time.monotonic() > deadline:
            raise ValueError(f"{where}: {_short(url)} took longer than {limits.url_timeout_s:g} s")
    return bytes(body)


def _check_url(url: str, where: str, limits: ImageLimits) -> None:
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{where}: only http(s) URLs are allowed, got {_short(url)}")
    host = parts.hostname
    if limits.url_hosts is None or host in limits.url_hosts:
        return
    try:
        infos = socket.getaddrinfo(host, parts.port or 80, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise ValueError(f"{where}: cannot resolve the host of {_short(url)}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global:
            raise ValueError(
                f"{where}: {_short(url)} is a local or private address; the operator can allow its "
                f"host with SAM2FLOW_URL_HOSTS"
            )


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.hostname, parts.port


def _short(url: str) -> str:
    return repr(url[:80] + ("..." if len(url) > 80 else ""))


# ---- the two sets of forms -------------------------------------------------------------------


def _decode_typed(kind: Any, value: Any, where: str, limits: ImageLimits, fetch: Callable) -> np.ndarray:
    if kind == "numpy":
        return decode_array(value, where, limits)
    if not isinstance(value, str):
        raise ValueError(f"{where}: a {kind} image value must be a string")
    if kind == "base64":
        return decode_base64_image(value, where, limits)
    if kind == "url":
        return decode_image_bytes(fetch(value, where, limits), where, limits)
    return read_image_file(value, where, limits)  # "file": local callers only


def load_wire_image(value: Any, where: str, limits: ImageLimits, fetch: Callable = fetch_url) -> np.ndarray:
    """An image that arrived over HTTP: only ``{"type": "base64"|"numpy"|"url", "value"}``.

    Anything else (a path, a ``file`` reference, a bare string, another type) gets the same
    message, whatever its value: nothing is read and nothing is revealed.
    """
    if not isinstance(value, dict) or value.get("type") not in WIRE_TYPES or "value" not in value:
        raise ValueError(f"{where}: an image must be {WIRE_FORM}")
    return _decode_typed(value["type"], value["value"], where, limits, fetch)


def load_image(value: Any, where: str = "image", limits: ImageLimits = LOCAL) -> np.ndarray:
    """An image in any local form (see the module docstring) → RGB uint8 (H, W, 3).

    A string names a file when one exists at that path, else it is read as base64.
    """
    if isinstance(value, np.ndarray):
        return decode_array(value, where, limits)
    if isinstance(value, Path):
        return read_image_file(value, where, limits)
    if isinstance(value, str):
        if _is_file(value):
            return read_image_file(value, where, limits)
        return decode_base64_image(value, where, limits)
    if isinstance(value, dict) and value.get("type") in LOCAL_TYPES and "value" in value:
        return _decode_typed(value["type"], value["value"], where, limits, fetch_url)
    raise ValueError(
        f"{where}: expected an image (numpy array, path, base64 or "
        f'{{"type": "numpy" | "base64" | "file" | "url", "value": ...}}), got {type(value).__name__}'
    )


def _is_file(text: str) -> bool:
    try:
        return len(text) < 4096 and Path(text).is_file()
    except (OSError, ValueError):  # a base64 string is no path (too long a name, say)
        return False


ImageLoader = Callable[[Any, str], np.ndarray]


def wire_loader(limits: ImageLimits, fetch: Callable = fetch_url) -> ImageLoader:
    """``load_wire_image`` bound to ``limits``: the loader the server hands to the workflow runner."""
    return lambda value, where: load_wire_image(value, where, limits, fetch)


def local_loader(limits: ImageLimits = LOCAL) -> ImageLoader:
    return lambda value, where: load_image(value, where, limits)
