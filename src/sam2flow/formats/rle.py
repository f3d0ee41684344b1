"""COCO run-length encoding of one ``(H, W)`` mask: ``{"size": [H, W], "counts": str}``.

Encoding and decoding are pycocotools' (``pycocotools.mask.encode``, ``decode``, ``frPyObjects``
for uncompressed counts). What pycocotools does not do is check its input, and its C code trusts
it (cocoapi ``common/maskApi.c``): ``rleFrString`` reads on past the end of a string that stops in
the middle of a number, and ``rleDecode`` writes every run into the ``H * W`` mask buffer without
checking that the runs fit, so counts that cover more pixels than ``size`` write past the buffer.
Requests and files are untrusted, so ``rle_to_mask`` first parses the runs itself
(``parse_compressed_counts``: the format of maskApi's ``rleToString``) and checks that they are
whole numbers, non-negative, and cover exactly ``H * W`` pixels; only then does pycocotools decode.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils

from ._checks import check_hw, is_int
from .masks import as_mask


def mask_to_rle(mask: np.ndarray) -> dict:
    """Encode one ``(H, W)`` mask (bool, or numbers where non-zero is True) as COCO RLE.

    Returns ``{"size": [H, W], "counts": str}``: exactly ``pycocotools.mask.encode``
    of the Fortran-ordered uint8 mask, with ``counts`` decoded from ASCII bytes.
    """
    arr = as_mask(mask, "mask")
    rle = mask_utils.encode(np.asfortranarray(arr.astype(np.uint8)))
    return {"size": [int(arr.shape[0]), int(arr.shape[1])], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode a COCO RLE dict to a bool ``(H, W)`` mask, ``(H, W) == rle["size"]``.

    ``counts`` may be the compressed string (``str`` or ASCII ``bytes``, as
    pycocotools writes it) or an uncompressed list of run lengths. The runs are
    checked to cover exactly ``H * W`` pixels before pycocotools decodes them
    (pycocotools itself does not check: see the module's docstring).
    """
    height, width = rle_size(rle)
    runs, compressed = _rle_runs(rle.get("counts"))
    if any(r < 0 for r in runs):
        raise ValueError("rle 'counts' has a negative run length")
    if sum(runs) != height * width:
        raise ValueError(f"rle 'counts' covers {sum(runs)} pixels but 'size' [{height}, {width}] has {height * width}")
    if not compressed:
        compressed = mask_utils.frPyObjects({"size": [height, width], "counts": runs}, height, width)["counts"]
    decoded = mask_utils.decode({"size": [height, width], "counts": compressed})
    return decoded.astype(bool)


def rle_size(rle: Any) -> tuple[int, int]:
    if not isinstance(rle, Mapping):
        raise ValueError(f"rle must be a dict, got {type(rle).__name__}")
    return check_hw(rle.get("size"), "rle 'size'")


def _rle_runs(counts: Any) -> tuple[list[int], bytes | None]:
    """Run lengths of ``counts`` and, when compressed, its ASCII bytes."""
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("rle 'counts' string must be ASCII") from None
    if isinstance(counts, bytes):
        return parse_compressed_counts(counts), counts
    if isinstance(counts, (list, tuple)) and all(is_int(v) for v in counts):
        return [int(v) for v in counts], None
    raise ValueError(f"rle 'counts' must be a str (compressed) or a list of ints, got {type(counts).__name__}")


def parse_compressed_counts(data: bytes) -> list[int]:
    """Parse COCO's compressed counts string into run lengths (``ValueError`` if malformed).

    Format (cocoapi ``maskApi.c``, ``rleToString``): each number is written in 5-bit groups, low first, as
    characters ``48 + group``; bit 0x20 means "more groups follow" and, in the
    last group, bit 0x10 is the sign. From the fourth number on, the value stored
    is the difference to the number two places earlier.
    """
    runs: list[int] = []
    value, shift = 0, 0
    for char in data:
        group = char - 48
        if not 0 <= group < 64:
            raise ValueError(f"rle 'counts' has an invalid character {chr(char)!r}")
        value |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:
            continue
        if group & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value, shift = 0, 0
    if shift:
        raise ValueError("rle 'counts' ends in the middle of a number")
    return runs
