"""Unprompted mode: segment everything in an image from a grid of single-click prompts.

The same masks as Meta's ``SAM2AutomaticMaskGenerator`` with one full-image crop
(``crop_n_layers=0``, the reference's default; crop layers are not implemented), computed with
less work:

1. Click prompts at the centres of an ``n × n`` grid over the image (normalised centres
   ``(i + 0.5) / n`` scaled by the image's width and height), decoded ``points_per_batch`` at a
   time with one positive click each. Every candidate is kept: three per click with
   ``multimask_output``, one without.
2. Predicted-IoU filter (``iou > pred_iou_thresh``; skipped when the threshold is 0), done on
   the low-resolution logits: the reference upsamples every candidate first, but the filter does
   not look at the mask, so the survivors are the same.
3. Optional hole and speck removal on the 256 × 256 logits (``min_mask_region_area``), as the
   reference's predictor does before upsampling.
4. Stability score on the full-resolution logits, in chunks: pixels above
   ``mask_threshold + offset`` over pixels above ``mask_threshold - offset``; filter
   ``stability >= stability_score_thresh`` (skipped when the threshold is 0).
5. Mask = logits > ``mask_threshold``; box = the mask's bounding box.
6. Greedy box NMS by predicted IoU (``box_nms_thresh``), identical to ``torchvision.ops.nms``.

Only the low-resolution logits of the survivors are kept between the steps; the final masks are
upsampled once more at the end (the same operation on the same logits, so the same pixels).
Everything stays on the engine's device until the result is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import transforms as T
from .types import LOW_RES, AutomaticConfig, ImageEmbedding, LowResDecoder, PromptArrays

_MAX_UPSAMPLE_ELEMENTS = 1 << 25  # float32 logits per upsampling chunk (128 MiB)


@dataclass(frozen=True)
class AutomaticResult:
    """Masks found in one image, best first (by predicted IoU; ties keep grid order).

    ``masks`` (K, H, W) bool; ``scores`` (K,) float32 predicted IoU; ``stability`` (K,) float32;
    ``boxes`` (K, 4) float32 ``x_min, y_min, x_max, y_max``: the first and last pixel column
    and row of the mask (inclusive, as the reference's boxes and ``sv.mask_to_xyxy``; all zero
    for an empty mask); ``points`` (K, 2) float32: the click (x, y pixels) that produced it.
    """

    masks: np.ndarray
    scores: np.ndarray
    stability: np.ndarray
    boxes: np.ndarray
    points: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls, hw: tuple[int, int]) -> AutomaticResult:
        h, w = hw
        f = np.float32
        return cls(np.zeros((0, h, w), bool), np.zeros(0, f), np.zeros(0, f), np.zeros((0, 4), f), np.zeros((0, 2), f))


def point_grid(points_per_side: int, hw: tuple[int, int]) -> np.ndarray:
    """(n², 2) float32 clicks (x, y pixels), row by row: normalised cell centres times (W, H).

    Computed in float64 and rounded to float32 once, as the reference does (its engine then
    divides by W, H and multiplies by the input size in float32, as ``to_input_frame`` does).
    """
    n = points_per_side
    half = 1 / (2 * n)
    centres = np.linspace(half, 1 - half, n)  # float64; the reference's spacing, bit for bit
    xs, ys = np.meshgrid(centres, centres)  # xs varies along a row, ys down the rows
    h, w = hw
    return (np.stack([xs.ravel(), ys.ravel()], axis=1) * np.array([w, h], np.float64)).astype(np.float32)


def stability_scores(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """(N, H, W) logits → (N,) float32: |logits > t + offset| / |logits > t - offset| (NaN if empty)."""
    inner = (logits > (mask_threshold + offset)).sum((-1, -2), dtype=torch.int32)
    outer = (logits > (mask_threshold - offset)).sum((-1, -2), dtype=torch.int32)
    return inner.float() / outer.float()


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool → (N, 4) int64 ``x_min, y_min, x_max, y_max`` (inclusive); empty → zeros."""
    n, h, w = masks.shape
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (N, H), (N, W)
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    big = max(h, w)
    boxes = torch.stack(
        [
            torch.where(cols, xs, big).amin(dim=1),
            torch.where(rows, ys, big).amin(dim=1),
            torch.where(cols, xs, -1).amax(dim=1),
            torch.where(rows, ys, -1).amax(dim=1),
        ],
        dim=1,
    )
    return torch.where(rows.any(dim=1, keepdim=True), boxes, 0)


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS; indices of kept boxes, best score first (ties: lower index first).

    Same arithmetic as ``torchvision.ops.nms`` (float32 areas and IoU, ``iou > threshold``
    suppresses; a zero-area pair has IoU NaN and suppresses nothing), without needing torchvision.
    """
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    x1, y1, x2, y2 = b.T
    areas = (x2 - x1) * (y2 - y1)
    removed = np.zeros(len(b), bool)
    keep = []
    zero = np.float32(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in order:
            if removed[i]:
                continue
            keep.append(i)
            w = np.maximum(zero, np.minimum(x2[i], x2) - np.maximum(x1[i], x1))
            h = np.maximum(zero, np.minimum(y2[i], y2) - np.maximum(y1[i], y1))
            inter = w * h
            iou = inter / (areas[i] + areas - inter)
            removed |= iou.astype(np.float64) > iou_threshold
    return np.asarray(keep, dtype=np.int64)


def _upsample(low_res: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(N, 256, 256) → (N, H, W) float32 logits, bilinear without corner alignment (the reference's)."""
    return F.interpolate(low_res[:, None].float(), hw, mode="bilinear", align_corners=False)[:, 0]


def generate_masks(
    engine: LowResDecoder, embedding: ImageEmbedding, config: AutomaticConfig = AutomaticConfig()
) -> AutomaticResult:
    """Segment everything in one embedded image (see the module's docstring for the steps).

    ``engine``: anything that decodes low-resolution candidates (``Sam2Engine``; ``LowResDecoder``).
    """
    if not isinstance(config, AutomaticConfig):
        raise ValueError(f"config must be an AutomaticConfig, got {type(config).__name__}")
    hw = tuple(int(v) for v in embedding.original_size)
    h, w = hw
    cfg = config
    grid = point_grid(cfg.points_per_side, hw)
    chunk = max(1, _MAX_UPSAMPLE_ELEMENTS // (h * w))

    kept_logits, kept_scores, kept_stability, kept_boxes, kept_points = [], [], [], [], []
    with torch.inference_mode():
        for start in range(0, len(grid), cfg.points_per_batch):
            pts = grid[start : start + cfg.points_per_batch]
            prompts = PromptArrays(None, pts[:, None], np.ones((len(pts), 1), np.int32), None)
            low_res, iou = engine.decode_low_res(embedding, prompts, cfg.multimask_output)
            c = low_res.shape[1]
            low_res = low_res.reshape(-1, LOW_RES, LOW_RES)  # click-major, candidate-minor
            iou = iou.reshape(-1).float()
            pts_t = torch.from_numpy(pts).to(low_res.device).repeat_interleave(c, dim=0)
            if cfg.pred_iou_thresh > 0.0:
                sel = torch.nonzero(iou > cfg.pred_iou_thresh).squeeze(1)
                low_res, iou, pts_t = low_res[sel], iou[sel], pts_t[sel]
            if len(iou) == 0:
                continue
            if cfg.min_mask_region_area > 0:
                # the reference's predictor, built with max_hole_area = max_sprinkle_area = this area
                low_res = T.remove_small_regions(low_res, cfg.min_mask_region_area, cfg.min_mask_region_area)
            for s in range(0, len(iou), chunk):
                part = low_res[s : s + chunk]
                up = _upsample(part, hw)
                stab = stability_scores(up, cfg.mask_threshold, cfg.stability_score_offset)
                sel = torch.arange(len(part), device=up.device)
                if cfg.stability_score_thresh > 0.0:
                    sel = torch.nonzero(stab >= cfg.stability_score_thresh).squeeze(1)
                if len(sel) == 0:
                    continue
                kept_logits.append(part[sel])
                kept_scores.append(iou[s : s + chunk][sel])
                kept_stability.append(stab[sel])
                kept_boxes.append(mask_boxes(up[sel] > cfg.mask_threshold))
                kept_points.append(pts_t[s : s + chunk][sel])
                del up
        if not kept_scores:
            return AutomaticResult.empty(hw)

        scores = torch.cat(kept_scores)
        boxes = torch.cat(kept_boxes)
        keep = box_nms(boxes.cpu().numpy(), scores.cpu().numpy(), cfg.box_nms_thresh)
        keep_t = torch.from_numpy(keep).to(scores.device)
        logits = torch.cat(kept_logits)[keep_t]
        masks = torch.empty((len(keep), h, w), dtype=torch.bool, device=logits.device)
        for s in range(0, len(keep), chunk):
            torch.gt(_upsample(logits[s : s + chunk], hw), cfg.mask_threshold, out=masks[s : s + chunk])
        return AutomaticResult(
            masks=masks.cpu().numpy(),
            scores=scores[keep_t].cpu().numpy().astype(np.float32),
            stability=torch.cat(kept_stability)[keep_t].cpu().numpy().astype(np.float32),
            boxes=boxes[keep_t].cpu().numpy().astype(np.float32),
            points=torch.cat(kept_points)[keep_t].cpu().numpy().astype(np.float32),
        )
