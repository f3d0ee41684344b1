"""All coordinate and image maths in one place, matching Meta's ``SAM2Transforms``.

Images: RGB uint8 (H, W, 3) → float in [0, 1] → bilinear antialiased resize to the model's square
input (1024 × 1024) → ImageNet mean/std. Coordinates: pixel (x, y) in the original image → the
same point in the 1024 × 1024 input frame (x · 1024 / W, y · 1024 / H). Masks: low-resolution
logits (256 × 256) → bilinear (align_corners=False) to the original (H, W); logits > 0 is the mask.

Each operation is here twice where both engines need it: on torch tensors for ``Sam2Engine``, and
on numpy arrays for ``GraphEngine`` (``engine/graph_engine.py``), which runs without torch: this
module imports torch only inside the torch functions. The numpy resampling is torch's own
definition (``resample_axis``), tested equal to ``F.interpolate`` within float32 rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MASK_THRESHOLD = 0.0
LOW_RES_LOGIT_LIMIT = 32.0  # the reference clamps returned low-resolution logits to ±32
REGION_FILL = 10.0  # filled holes become MASK_THRESHOLD + 10, erased sprinkles MASK_THRESHOLD - 10


def as_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Validate an image and return it as a contiguous (H, W, 3) uint8 RGB array.

    Grayscale (H, W) or (H, W, 1) is replicated to three channels; RGBA drops alpha. Float images
    in [0, 1] are not guessed at: only uint8 (or integer arrays within 0..255) are accepted.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name} must be a numpy array (H, W, 3) of uint8, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"{name} has unsupported shape {image.shape}: expected (H, W), (H, W, 3) or (H, W, 4)")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {image.shape}")
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.integer) or image.min() < 0 or image.max() > 255:
            raise ValueError(f"{name} must be uint8 (0..255), got dtype {image.dtype}")
        image = image.astype(np.uint8)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    return np.ascontiguousarray(image)


def preprocess(images: list[np.ndarray], size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Stack images into the model input: (B, 3, size, size) normalised tensor on ``device``.

    Each image is moved to the device as uint8 (a quarter of the bytes of float) and converted
    there; the maths is the reference's, in float32, then cast to ``dtype``.
    """
    import torch
    import torch.nn.functional as F

    out = []
    for image in images:
        # Not pinned: pinning a fresh buffer (cudaHostAlloc) cost ~10 ms on an H200 host, far more than
        # the pageable copy of an image's few uint8 megabytes it would speed up.
        t = torch.from_numpy(image if image.flags.writeable else image.copy())
        t = t.to(device).permute(2, 0, 1).float().div_(255.0)
        out.append(F.interpolate(t[None], (size, size), mode="bilinear", align_corners=False, antialias=True))
    batch = torch.cat(out)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return ((batch - mean) / std).to(dtype)


def to_input_frame(coords: torch.Tensor, original_hw: tuple[int, int], size: int) -> torch.Tensor:
    """Map pixel coordinates (..., 2) as (x, y) in the original image to the model's input frame.

    Divide by the image size, then multiply by the input size, in that order: the reference does
    the same, so float32 rounding is identical. Tensors or numpy arrays.
    """
    h, w = original_hw
    out = coords.copy() if isinstance(coords, np.ndarray) else coords.clone()
    out[..., 0] /= w
    out[..., 1] /= h
    return out * size


def upsample_masks(
    low_res: torch.Tensor, original_hw: tuple[int, int], max_elements: int | None = None
) -> torch.Tensor:
    """Low-resolution logits (N, 256, 256) → boolean masks (N, H, W), in chunks of at most
    ``max_elements`` upsampled logits. By default 2^20 on a CPU (4 MB: clear of glibc's fresh pages
    for blocks over 32 MB; 100 masks on a 2-core Xeon: 38 vs 93 ms at 640x480, 279 vs 554 at
    1920x1080 with 2^25), 2^25 on accelerators."""
    import torch
    import torch.nn.functional as F

    n = low_res.shape[0]
    h, w = original_hw
    out = torch.empty((n, h, w), dtype=torch.bool, device=low_res.device)
    if max_elements is None:
        max_elements = 1 << 20 if low_res.device.type == "cpu" else 1 << 25
    step = max(1, max_elements // max(1, h * w))
    for start in range(0, n, step):
        chunk = low_res[start : start + step, None].float()
        up = F.interpolate(chunk, (h, w), mode="bilinear", align_corners=False)
        torch.gt(up[:, 0], MASK_THRESHOLD, out=out[start : start + step])
    return out


def check_region_area(name: str, value) -> int:
    """A hole/sprinkle area in low-resolution pixels: an integer >= 0 (0 = off)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0 (low-resolution pixels; 0 = off), got {value!r}")
    return int(value)


def remove_small_regions(low_res: torch.Tensor, max_hole_area: int, max_sprinkle_area: int) -> torch.Tensor:
    """``clean_regions`` on a tensor of low-resolution logits (N, 256, 256); a new tensor on its device."""
    import torch

    out = clean_regions(low_res.float().cpu().numpy(), max_hole_area, max_sprinkle_area)
    return torch.from_numpy(out).to(low_res.device)


def clean_regions(low_res: np.ndarray, max_hole_area: int, max_sprinkle_area: int) -> np.ndarray:
    """Fill small holes and erase small sprinkles of low-resolution logits (N, 256, 256) float32.

    Meta's ``SAM2Transforms.postprocess_masks`` (``sam2/utils/transforms.py``), before upsampling:
    background components (logits <= ``MASK_THRESHOLD``, 8-connected) of at most ``max_hole_area``
    pixels are set to ``MASK_THRESHOLD + 10``; foreground components (logits > ``MASK_THRESHOLD``)
    of at most ``max_sprinkle_area`` pixels to ``MASK_THRESHOLD - 10``. Both kinds are found on the
    logits as given, as the reference does; areas count pixels of the 256 × 256 grid (one low-res
    pixel is (H / 256) × (W / 256) image pixels). 0 turns either off. Returns a new array.
    """
    import cv2

    arr = np.asarray(low_res, np.float32)
    out = arr.copy()
    for k in range(len(arr)):
        fg = arr[k] > MASK_THRESHOLD
        for region, area, value in (
            (~fg, max_hole_area, MASK_THRESHOLD + REGION_FILL),
            (fg, max_sprinkle_area, MASK_THRESHOLD - REGION_FILL),
        ):
            if area <= 0:
                continue
            _, labels, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
            small = region & (stats[labels, cv2.CC_STAT_AREA] <= area)
            out[k][small] = value
    return out


# ---- the same maths on numpy arrays (``GraphEngine``) --------------------------------------------


def sub_pixel_layout(shape: tuple[int, ...], levels: int) -> tuple[tuple[int, ...], list[int]]:
    """How features (C, H·2^k, W·2^k) become rows in the decoder's sub-pixel order: the view
    (C, H, 2 × k, W, 2 × k) and the permutation of it to (H, W, a1, b1, ..., ak, bk, C). Row order:
    source pixel (i, j), then the (a, b) offsets of each level; channels last (``decoder.sub_pixel_rows``)."""
    c, h, w = shape
    s = 2**levels
    view = (c, h // s, *([2] * levels), w // s, *([2] * levels))
    order = [1, 2 + levels] + [d for k in range(levels) for d in (2 + k, 3 + levels + k)] + [0]
    return view, order


def decoder_inputs_array(image_embed: np.ndarray, s0: np.ndarray, s1: np.ndarray) -> tuple[np.ndarray, ...]:
    """One image's encoder outputs (256, H, W), (32, 4H, 4W), (64, 2H, 2W) as the decoder graphs take
    them: the image tokens (H·W, 256) and the sub-pixel rows of s1 (H·W, 4·64) and s0 (4·H·W, 4·32)
    (``decoder.image_rows``, ``decoder.sub_pixel_rows``), contiguous float32."""
    c, h, w = image_embed.shape
    rows = np.ascontiguousarray(image_embed.reshape(c, h * w).T, np.float32)
    pixels = []
    for feat, levels, n in ((s1, 1, h * w), (s0, 2, 4 * h * w)):
        view, order = sub_pixel_layout(feat.shape, levels)
        pixels.append(np.ascontiguousarray(feat.reshape(view).transpose(order), np.float32).reshape(n, -1))
    return rows, pixels[0], pixels[1]


def _taps(n_in: int, n_out: int, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights (n_out, K) of a bilinear resampling of ``n_in`` samples to ``n_out``.

    ``antialias``: torch's ``_upsample_bilinear2d_aa`` (PIL's filter): a triangle of half-width
    ``max(1, n_in / n_out)`` around each output centre, weights normalised to sum to one. Otherwise
    ``upsample_bilinear2d`` with ``align_corners=False``: two neighbours of ``(i + 0.5)·scale - 0.5``,
    clamped at the edges.
    """
    scale = n_in / n_out
    i = np.arange(n_out, dtype=np.float64)
    if not antialias:  # in float32, as torch's CPU kernel computes the source index
        f = np.float32
        src = np.maximum(f(scale) * (i.astype(f) + f(0.5)) - f(0.5), f(0.0))
        i0 = np.minimum(src.astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = (src - i0.astype(f)).astype(f)
        return np.stack([i0, i1], 1), np.stack([f(1.0) - lam, lam], 1)
    support = scale if scale >= 1.0 else 1.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    centre = scale * (i + 0.5)
    lo = np.maximum((centre - support + 0.5).astype(np.int64), 0)  # truncation, as C's int cast
    size = np.minimum((centre + support + 0.5).astype(np.int64), n_in) - lo
    k = np.arange(int(size.max()))
    idx = lo[:, None] + k[None]
    w = np.clip(1.0 - np.abs((idx - centre[:, None] + 0.5) * inv), 0.0, None)
    w[k[None] >= size[:, None]] = 0.0
    w /= w.sum(1, keepdims=True)
    return np.minimum(idx, n_in - 1), w.astype(np.float32)


def resample_axis(x: np.ndarray, axis: int, n_out: int, antialias: bool) -> np.ndarray:
    """``x`` (float32) resampled to ``n_out`` samples along ``axis`` (see ``_taps``)."""
    idx, w = _taps(x.shape[axis], n_out, antialias)
    shape = [1] * x.ndim
    shape[axis] = n_out
    out = x.take(idx[:, 0], axis=axis)
    out *= w[:, 0].reshape(shape)
    for k in range(1, idx.shape[1]):  # the same sum in the same order as torch, one temporary
        tap = x.take(idx[:, k], axis=axis)
        tap *= w[:, k].reshape(shape)
        out += tap
    return out


def preprocess_array(image: np.ndarray, size: int) -> np.ndarray:
    """``preprocess`` of one RGB uint8 image (H, W, 3) in numpy: (1, 3, size, size) float32."""
    x = image.astype(np.float32) / np.float32(255.0)
    x = resample_axis(resample_axis(x, 1, size, antialias=True), 0, size, antialias=True)
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def upsample_masks_array(low_res: np.ndarray, original_hw: tuple[int, int], max_elements: int = 1 << 19) -> np.ndarray:
    """``upsample_masks`` in numpy: logits (N, 256, 256) float32 → boolean masks (N, H, W).

    Masks go as few at a time as keep the temporaries within ``max_elements`` float32 values (2 MB:
    in cache, and clear of glibc's fresh pages for blocks over 32 MB). 100 masks at 640x480 on a
    2-core Xeon: 96 ms, against 403 with 2^25.
    """
    n = low_res.shape[0]
    h, w = original_hw
    out = np.empty((n, h, w), bool)
    step = max(1, max_elements // max(1, h * w))
    for start in range(0, n, step):
        rows = resample_axis(low_res[start : start + step].astype(np.float32), 1, h, antialias=False)
        np.greater(resample_axis(rows, 2, w, antialias=False), MASK_THRESHOLD, out=out[start : start + step])
    return out
