"""The benchmark cases. Each returns result entries: one per configuration and variant.

An entry holds ``ours``, ``reference``, ``unit`` and ``ratio`` (how many times faster, or for
memory how many times smaller, we are), plus the raw samples and case-specific facts. Both sides
get the same checkpoint, images and prompts, and are timed in the same interleaved loop.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import supervision as sv
import torch

from sam2flow.formats import mask_iou

from . import data
from .timing import Measured, measure

OURS, REF, OURS_BF16, REF_BF16 = "ours", "reference", "ours (bf16)", "reference (bf16 autocast)"
OURS_COMPILED = "ours (compiled)"  # torch.compile of the encoder, at the precision dtype="auto" picks
OURS_ALT = {"torch": "ours (torch)", "openvino": "ours (openvino)"}  # our engine on the other encoder backend
# our engine in bf16 on the other encoder backend (native-bf16 CPUs)
OURS_GRAPHS = "ours (graphs)"  # GraphEngine: exported OpenVINO graphs, no torch, float32
OURS_GRAPHS_AUTO = "ours (graphs, auto)"  # the same at dtype="auto" (bf16, or int8 weights without native bf16)
OURS_ALT_BF16 = {"torch": "ours (torch bf16)", "openvino": "ours (openvino bf16)"}
# OpenVINO int8 encoders (CPU): int8 weights with float32 activations, what dtype="auto" runs on a CPU without
# bf16 (the stand-in for such CPUs); and int8 weights and activations calibrated on generated scenes, at dtype="auto"
OURS_INT8W, OURS_INT8 = "ours (int8 weights)", "ours (int8)"
ORT_META = "ONNX Runtime fp32, Meta's encoder"  # what a CPU user would pick instead: Meta's encoder exported
OV_META = "OpenVINO fp32, Meta's encoder"  # ... and the same ONNX file on OpenVINO
OV_META_BF16 = "OpenVINO bf16, Meta's encoder"
IOU_GUARD = 0.97


@dataclass
class Settings:
    """Warm-ups, repeats and sizes of each case (``--quick`` or full; ``--warmup/--repeats`` override)."""

    quick: bool
    embed_warmup: int
    embed_repeats: int
    embed_b4_warmup: int
    embed_b4_repeats: int
    decode_warmup: int  # per image, before its first configuration (later ones reuse the warm state)
    decode_repeats: int  # 10 boxes
    decode_repeats_100: int  # 100 boxes (each run already averages over 100 boxes)
    step_images: int
    step_warmup: int
    step_repeats: int
    auto_points_per_side: int
    auto_warmup: int
    auto_repeats: int
    click_warmup: int = 5  # clicks, each side, before timing
    click_repeats: int = 200  # clicks timed, each side (1-5 points per object, then the next object)
    step_counts: tuple[int, ...] = (1, 4)  # images per step run (``--step-images`` sets one count)
    store_warmup: int = 1  # first clicks, each side, before timing (each one encodes on the reference's side)
    store_repeats: int = 10

    @classmethod
    def make(
        cls,
        quick: bool,
        warmup: int | None = None,
        repeats: int | None = None,
        step_images: int | None = None,
        points_per_side: int | None = None,
    ) -> Settings:
        if quick:
            s = cls(True, 1, 2, 0, 1, 1, 2, 1, 2, 1, 2, 16, 1, 1)
        else:
            s = cls(False, 2, 10, 1, 5, 2, 10, 5, 8, 1, 5, 32, 1, 5)
        if quick:
            s.click_repeats, s.store_repeats = 50, 3
        if warmup is not None:
            s.embed_warmup = s.embed_b4_warmup = s.decode_warmup = s.step_warmup = s.auto_warmup = warmup
            s.click_warmup = s.store_warmup = warmup
        if repeats is not None:
            s.embed_repeats = s.embed_b4_repeats = s.decode_repeats = s.decode_repeats_100 = repeats
            s.step_repeats = s.auto_repeats = s.click_repeats = s.store_repeats = repeats
        if step_images is not None:
            s.step_images = step_images
            s.step_counts = (step_images,)
        if points_per_side is not None:
            s.auto_points_per_side = points_per_side
        return s


@dataclass
class Context:
    """Everything one size on one device needs: both models, the settings, how to wait and log."""

    size: str
    device: torch.device
    ckpt: data.Checkpoint
    ours: Any
    ours_bf16: Any | None  # None: bf16 skipped (not native, or failed its IoU guard)
    bf16_note: str
    ref_model: Any
    predictor: Any
    settings: Settings
    sync: Callable[[], None]
    log: Callable[[str], None]
    threads: int
    extra: dict = field(default_factory=dict)
    ours_compiled: Any | None = None  # --compile: an engine built with compile=True
    ours_alt: Any | None = None  # our engine on the backend ``ours`` does not run (OpenVINO on a CPU)
    ours_alt_bf16: Any | None = None  # ``ours_alt``'s backend in bfloat16, where the CPU has it natively
    exported: Any | None = None  # CPU: Meta's encoder on ONNX Runtime and OpenVINO (``MetaExported``)
    ours_int8: dict = field(default_factory=dict)  # OURS_INT8W / OURS_INT8 → an engine (CPU, OpenVINO)
    ours_graphs: dict = field(default_factory=dict)  # OURS_GRAPHS / OURS_GRAPHS_AUTO → a GraphEngine (CPU)

    def ref(self, fn: Callable[[], Any], autocast: bool = False) -> Callable[[], Any]:
        """The reference called as its README shows: under ``torch.inference_mode()``, and on a GPU's
        bf16 row under ``torch.autocast(device, bfloat16)``."""

        def call():
            with torch.inference_mode():
                if autocast:
                    with torch.autocast(self.device.type, dtype=torch.bfloat16):
                        return fn()
                return fn()

        return call

    def competitors(
        self, ours: Callable[[], Any], ref: Callable[[], Any], ours_bf16: Callable[[], Any] | None = None
    ) -> dict:
        fns = {OURS: ours, REF: self.ref(ref)}
        if ours_bf16 is not None and self.ours_bf16 is not None:
            fns[OURS_BF16] = ours_bf16
            # the one line a user adds first; only where bf16 is native (on other CPUs it is ~9x slower)
            fns[REF_BF16] = self.ref(ref, autocast=True)
        return fns


def entry(
    ctx: Context,
    config: str,
    m: Measured,
    unit: str,
    convert: Callable[[float], float],
    higher_is_better: bool = False,
    variant: str = OURS,
    warmup: int = 0,
    **extra,
) -> dict:
    """One table row: medians of converted samples of ``variant`` and the matching reference."""
    ref_name = REF_BF16 if variant == OURS_BF16 and REF_BF16 in m.samples else REF
    ours_s = [convert(t) for t in m.samples[variant]]
    ref_s = [convert(t) for t in m.samples[ref_name]]
    ours_v, ref_v = statistics.median(ours_s), statistics.median(ref_s)
    ratio = ours_v / ref_v if higher_is_better else ref_v / ours_v
    return {
        "size": ctx.size,
        "device": str(ctx.device),
        "config": config,
        "variant": variant,
        "ours": ours_v,
        "reference": ref_v,
        "unit": unit,
        "ratio": ratio,
        "higher_is_better": higher_is_better,
        "reference_mode": ref_name,
        "warmup": warmup,
        "repeats": len(ours_s),
        "samples": {"ours": ours_s, "reference": ref_s},
        **extra,
    }


def rows(
    ctx: Context,
    config: str,
    m: Measured,
    unit: str,
    convert,
    higher_is_better=False,
    warmup=0,
    bf16_extra: dict | None = None,
    per_variant: dict[str, dict] | None = None,
    **extra,
) -> list[dict]:
    """``extra`` goes into every row, ``per_variant[v]`` over it into variant v's row only."""
    out = [entry(ctx, config, m, unit, convert, higher_is_better, OURS, warmup, **extra)]
    for variant in (
        *OURS_ALT.values(),
        *OURS_ALT_BF16.values(),
        OURS_INT8W,
        OURS_INT8,
        OURS_GRAPHS,
        OURS_GRAPHS_AUTO,
        ORT_META,
        OV_META,
        OV_META_BF16,
    ):  # vs the reference in fp32
        if variant in m.samples:
            own = {**extra, **(per_variant or {}).get(variant, {})}
            out.append(entry(ctx, config, m, unit, convert, higher_is_better, variant, warmup, **own))
    if OURS_BF16 in m.samples:
        out.append(entry(ctx, config, m, unit, convert, higher_is_better, OURS_BF16, warmup, **(bf16_extra or {})))
    if OURS_COMPILED in m.samples:
        out.append(
            entry(
                ctx,
                config,
                m,
                unit,
                convert,
                higher_is_better,
                OURS_COMPILED,
                warmup,
                **extra,
                compile_seconds=ctx.ours_compiled.compile_seconds,
                compiled_dtype=str(ctx.ours_compiled.dtype).replace("torch.", ""),
            )
        )
    return out


# ---- bf16 guard -----------------------------------------------------------------------------


def bf16_mask_iou(ours, ours_bf16) -> tuple[float, float]:
    """Mean and minimum mask IoU, bf16 encoder vs float32, on two 640×480 scenes with 10 boxes each."""
    images, dets = data.step_inputs(2, 10, seed=700)
    ious = []
    for image, d in zip(images, dets):
        a = ours.predict(ours.embed([image])[0], boxes=d.xyxy).masks
        b = ours_bf16.predict(ours_bf16.embed([image])[0], boxes=d.xyxy).masks
        ious.append(mask_iou(a, b))
    iou = np.concatenate(ious)
    return float(iou.mean()), float(iou.min())


# ---- 1. image embedding ---------------------------------------------------------------------


def count_encoder_gflop(ctx: Context) -> float:
    """GFLOP of one 1024 × 1024 image through the reference's image encoder (counted, not assumed)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = int(ctx.ref_model.image_size)
    x = torch.zeros(1, 3, size, size, device=ctx.device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        ctx.ref_model.forward_image(x)
    return counter.get_total_flops() / 1e9


def reference_batches(device: torch.device) -> bool:
    """Whether the reference takes several images at once in its fastest mode: ``set_image_batch`` on a
    GPU; on a CPU ``set_image`` image by image (its batch of 4 is ~1.4x slower per image there)."""
    return device.type != "cpu"


def case_embed(ctx: Context) -> list[dict]:
    s = ctx.settings
    images = [data.scene(100 + i, (1024, 1024)).image for i in range(4)]
    ctx.log("embed: counting encoder FLOPs (one untimed reference forward)")
    gflop = count_encoder_gflop(ctx)
    out = []
    batched = reference_batches(ctx.device)
    for batch in (1, 4):
        batch_images = images[:batch]

        def ref_set(b=batch_images):
            if batched and len(b) > 1:
                ctx.predictor.set_image_batch(b)
            else:
                for image in b:
                    ctx.predictor.set_image(image)

        fns = ctx.competitors(
            lambda b=batch_images: ctx.ours.embed(b, use_cache=False),
            ref_set,
            (lambda b=batch_images: ctx.ours_bf16.embed(b, use_cache=False)) if ctx.ours_bf16 is not None else None,
        )
        if ctx.ours_compiled is not None:
            fns[OURS_COMPILED] = lambda b=batch_images: ctx.ours_compiled.embed(b, use_cache=False)
        if ctx.ours_alt is not None:
            fns[OURS_ALT[ctx.ours_alt.backend]] = lambda b=batch_images: ctx.ours_alt.embed(b, use_cache=False)
        if ctx.ours_alt_bf16 is not None:
            fns[OURS_ALT_BF16[ctx.ours_alt_bf16.backend]] = lambda b=batch_images: ctx.ours_alt_bf16.embed(
                b, use_cache=False
            )
        for name, engine in ctx.ours_int8.items():
            fns[name] = lambda b=batch_images, e=engine: e.embed(b, use_cache=False)
        if ctx.exported is not None:
            fns[ORT_META] = lambda b=batch_images: ctx.exported.run_ort(b)
            fns[OV_META] = lambda b=batch_images: ctx.exported.run_ov(b)
            if "bf16" in ctx.exported.ov:
                fns[OV_META_BF16] = lambda b=batch_images: ctx.exported.run_ov(b, "bf16")
        warmup, repeats = (s.embed_warmup, s.embed_repeats) if batch == 1 else (s.embed_b4_warmup, s.embed_b4_repeats)
        ctx.log(f"embed: batch {batch}, {warmup} warm-up + {repeats} repeats of {', '.join(fns)}")
        m = measure(fns, warmup, repeats, ctx.sync)
        made = rows(
            ctx,
            f"batch {batch}",
            m,
            "s/image",
            lambda t, b=batch: t / b,
            warmup=warmup,
            encoder_gflop_per_image=gflop,
            bf16_extra={"encoder_gflop_per_image": gflop, "bf16_note": ctx.bf16_note},
        )
        for r in made:
            r["achieved_gflops"] = gflop / r["ours"]
            r["reference_gflops"] = gflop / r["reference"]
        out += made
    return out


# ---- 2. box decoding ------------------------------------------------------------------------


def reference_decode(predictor, boxes: np.ndarray):
    """The reference's documented multi-box call, then the best of three candidates per box."""
    masks, scores, _ = predictor.predict(box=boxes, multimask_output=True)
    if masks.ndim == 3:  # one box: the reference squeezes the box axis away
        masks, scores = masks[None], scores[None]
    rows_ = np.arange(len(masks))
    best = scores.argmax(1)
    return masks[rows_, best] > 0, scores[rows_, best]


def case_decode(ctx: Context) -> list[dict]:
    s = ctx.settings
    out = []
    for (h, w), seed in (((480, 640), 500), ((1080, 1920), 501)):
        sc = data.scene(seed, (h, w))
        emb = ctx.ours.embed([sc.image])[0]
        graph_embs = {name: g.embed([sc.image])[0] for name, g in ctx.ours_graphs.items()}
        with torch.inference_mode():
            ctx.predictor.set_image(sc.image)
        for n in (10, 100):
            boxes = data.detector_boxes(sc.boxes, (h, w), n, seed)
            fns = ctx.competitors(
                lambda b=boxes, e=emb: ctx.ours.predict(e, boxes=b), lambda b=boxes: reference_decode(ctx.predictor, b)
            )
            for name, g in ctx.ours_graphs.items():  # GraphEngine's decoder on OpenVINO
                fns[name] = lambda b=boxes, g=g, e=graph_embs[name]: g.predict(e, boxes=b)
            warmup = s.decode_warmup if n == 10 else 0
            repeats = s.decode_repeats if n == 10 else s.decode_repeats_100
            ctx.log(f"decode: {w}x{h}, {n} boxes, {warmup} warm-up + {repeats} repeats")
            m = measure(fns, warmup, repeats, ctx.sync)
            ours_masks = m.last[OURS].masks
            ref_masks = m.last[REF][0]
            iou = mask_iou(ours_masks, ref_masks)
            out += rows(
                ctx,
                f"{w}x{h}, {n} boxes",
                m,
                "ms/box",
                lambda t, n=n: 1000 * t / n,
                warmup=warmup,
                mask_iou_vs_reference=float(iou.mean()),
                min_mask_iou_vs_reference=float(iou.min()),
            )
            m.last.clear()
    return out


# ---- 3. the workflow step -------------------------------------------------------------------


def reference_step(
    predictor, images: list[np.ndarray], dets: list[sv.Detections], batched: bool = False
) -> list[sv.Detections]:
    """The step's work done with the reference: embed, all boxes at once, best of three,
    ``sv.Detections`` with xyxy from the masks and the boxes' class ids, names and ids.

    ``batched``: ``set_image_batch`` + ``predict_batch``; else image by image with ``set_image`` +
    ``predict``, the reference's fastest mode on a CPU (its batch of 4 is ~1.4x slower per image there).
    """
    if not batched:
        outs = []
        for image, d in zip(images, dets):
            predictor.set_image(image)
            outs.append(predictor.predict(box=d.xyxy, multimask_output=True)[:2])
    elif len(images) == 1:
        predictor.set_image(images[0])
        outs = [predictor.predict(box=dets[0].xyxy, multimask_output=True)[:2]]
    else:
        predictor.set_image_batch(images)
        masks, scores, _ = predictor.predict_batch(box_batch=[d.xyxy for d in dets], multimask_output=True)
        outs = list(zip(masks, scores))
    results = []
    for (masks, scores), d in zip(outs, dets):
        if masks.ndim == 3:
            masks, scores = masks[None], scores[None]
        rows_ = np.arange(len(masks))
        best = scores.argmax(1)
        m, sc = masks[rows_, best] > 0, scores[rows_, best]
        keep = m.reshape(len(m), -1).any(1)
        results.append(
            sv.Detections(
                xyxy=sv.mask_to_xyxy(m[keep]).astype(np.float32),
                mask=m[keep],
                confidence=sc[keep].astype(np.float32),
                class_id=d.class_id[keep],
                data={"class_name": d.data["class_name"][keep], "parent_id": d.data["detection_id"][keep]},
            )
        )
    return results


def step_iou(a: list[sv.Detections], b: list[sv.Detections]) -> tuple[float, int, int]:
    """Mean mask IoU over detections present in both (matched by the prompting box's id)."""
    ious, na, nb = [], 0, 0
    for da, db in zip(a, b):
        na, nb = na + len(da), nb + len(db)
        index = {pid: i for i, pid in enumerate(db.data["parent_id"])}
        for i, pid in enumerate(da.data["parent_id"]):
            if pid in index:
                ious.append(mask_iou(da.mask[i : i + 1], db.mask[index[pid] : index[pid] + 1])[0])
    return (float(np.mean(ious)) if ious else float("nan")), na, nb


def run_step_ours(engine, images, dets, version):
    from sam2flow.workflows.step import StepParameters, segment_images

    ids = [f"image-{i}" for i in range(len(images))]
    return segment_images(engine, images, ids, dets, StepParameters(version=version), None)


STEP_BOXES = (4, 10)  # boxes per image: few and many


def case_step(ctx: Context) -> list[dict]:
    """The workflow step at each of ``settings.step_counts`` images × ``STEP_BOXES`` boxes per image."""
    out = []
    for n_images in ctx.settings.step_counts:
        for n_boxes in STEP_BOXES:
            out += _step_config(ctx, n_images, n_boxes)
    return out


def _step_config(ctx: Context, n_images: int, n_boxes: int) -> list[dict]:
    s = ctx.settings
    images, dets = data.step_inputs(n_images, n_boxes)
    batched = reference_batches(ctx.device)
    fns = ctx.competitors(
        lambda: run_step_ours(ctx.ours, images, dets, ctx.size),
        lambda: reference_step(ctx.predictor, images, dets, batched),
        (lambda: run_step_ours(ctx.ours_bf16, images, dets, ctx.size)) if ctx.ours_bf16 is not None else None,
    )
    if ctx.ours_alt is not None:
        fns[OURS_ALT[ctx.ours_alt.backend]] = lambda: run_step_ours(ctx.ours_alt, images, dets, ctx.size)
    if ctx.ours_alt_bf16 is not None:
        fns[OURS_ALT_BF16[ctx.ours_alt_bf16.backend]] = lambda: run_step_ours(ctx.ours_alt_bf16, images, dets, ctx.size)
    for name, engine in {**ctx.ours_int8, **ctx.ours_graphs}.items():
        fns[name] = lambda e=engine: run_step_ours(e, images, dets, ctx.size)
    ctx.log(f"step: {n_images} images 640x480 x {n_boxes} boxes, {s.step_warmup} warm-up + {s.step_repeats} repeats")
    m = measure(fns, s.step_warmup, s.step_repeats, ctx.sync)
    iou, n_ours, n_ref = step_iou(m.last[OURS], m.last[REF])
    bf16_extra = {}
    if OURS_BF16 in m.last:
        bf16_iou, _, _ = step_iou(m.last[OURS_BF16], m.last[OURS])
        bf16_extra = {"mask_iou_vs_fp32": bf16_iou, "bf16_note": ctx.bf16_note}
    per_variant = {  # each of our other engines' masks against the reference's (and bf16 against our fp32)
        v: {"mask_iou_vs_reference": step_iou(m.last[v], m.last[REF])[0]}
        for v in (*OURS_ALT.values(), *OURS_ALT_BF16.values(), *ctx.ours_int8, *ctx.ours_graphs)
        if v in m.last
    }
    for v in (*OURS_ALT_BF16.values(), *ctx.ours_int8, *ctx.ours_graphs):
        if v in per_variant:
            per_variant[v]["mask_iou_vs_fp32"] = step_iou(m.last[v], m.last[OURS])[0]
    return rows(
        ctx,
        f"{len(images)} x 640x480, {n_boxes} boxes each",
        m,
        "images/s",
        lambda t: len(images) / t,
        higher_is_better=True,
        warmup=s.step_warmup,
        bf16_extra=bf16_extra,
        per_variant=per_variant,
        mask_iou_vs_reference=iou,
        detections_ours=n_ours,
        detections_reference=n_ref,
    )


# ---- 4. automatic mask generation -----------------------------------------------------------


def case_automatic(ctx: Context) -> list[dict]:
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    from sam2flow.engine.automatic import AutomaticConfig, generate_masks

    s = ctx.settings
    pps = s.auto_points_per_side
    image = data.scene(600, (768, 1024)).image
    config = AutomaticConfig(points_per_side=pps)  # every other setting: the reference's default
    generator = SAM2AutomaticMaskGenerator(
        ctx.ref_model,
        points_per_side=pps,
        points_per_batch=config.points_per_batch,
        pred_iou_thresh=config.pred_iou_thresh,
        stability_score_thresh=config.stability_score_thresh,
        box_nms_thresh=config.box_nms_thresh,
    )
    fns = ctx.competitors(
        lambda: generate_masks(ctx.ours, ctx.ours.embed([image], use_cache=False)[0], config),
        lambda: generator.generate(image),
    )
    ctx.log(f"automatic: 1024x768, {pps} points per side, {s.auto_warmup} warm-up + {s.auto_repeats} repeats")
    m = measure(fns, s.auto_warmup, s.auto_repeats, ctx.sync)
    return rows(
        ctx,
        f"1024x768, {pps}x{pps} points",
        m,
        "s",
        lambda t: t,
        warmup=s.auto_warmup,
        masks_ours=len(m.last[OURS]),
        masks_reference=len(m.last[REF]),
        points_per_side=pps,
    )


# ---- 6. one click on a cached embedding, over HTTP ------------------------------------------


def click_sequences(scene, n_objects: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per object 1 to 5 clicks, as an annotator places them: a positive click inside the shape,
    then positives inside and negatives just outside its box; (points (P, 2) x, y pixels, labels (P,))."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_objects):
        mask = scene.masks[k % len(scene.masks)]
        ys, xs = np.nonzero(mask)
        x1, y1, x2, y2 = scene.boxes[k % len(scene.boxes)]
        h, w = mask.shape
        pts, labels = [], []
        for i in range(5):
            if i % 2 == 0 or i == 1:
                j = rng.integers(len(xs))
                pts.append([float(xs[j]), float(ys[j])]), labels.append(1)
            else:
                pts.append([float(min(w - 1, x2 + 8)), float(min(h - 1, (y1 + y2) / 2))]), labels.append(0)
        out.append((np.array(pts, np.float32), np.array(labels, np.int32)))
    return out


def _percentiles(samples: list[float]) -> dict:
    v = np.array(samples) * 1000
    return {f"p{q}_ms": float(np.percentile(v, q)) for q in (50, 90, 99)}


def _click_breakdown(engine, emb, points: np.ndarray, labels: np.ndarray, prev: np.ndarray, repeats: int) -> dict:
    """Median milliseconds of each stage of one refining click, in process: the decoder (to low-res
    logits), selection and upsampling to full size, COCO RLE with its box, the JSON answer."""
    from sam2flow.engine.prompts import PromptArrays, check_mask_input
    from sam2flow.formats import mask_to_rle

    arrays = PromptArrays(None, points[None], labels[None], check_mask_input(prev[None], 1))
    stages: dict[str, list[float]] = {"decoder": [], "select_upsample": [], "rle": [], "json": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.decode_low_res(emb, arrays, False)
        t1 = time.perf_counter()
        pred = engine._decode(emb, arrays, False)
        t2 = time.perf_counter()
        rle = mask_to_rle(pred.masks[0])
        t3 = time.perf_counter()
        json.dumps({"rle": rle, "box": [0.0, 0.0, 1.0, 1.0], "score": float(pred.scores[0])})
        t4 = time.perf_counter()
        stages["decoder"].append(t1 - t0)
        stages["select_upsample"].append((t2 - t1) - (t1 - t0))
        stages["rle"].append(t3 - t2)
        stages["json"].append(t4 - t3)
    return {k: 1000 * statistics.median(v) for k, v in stages.items()}


PACED_CLICKS = 60  # per server in the click case's annotator-pace series
CLICK_BLOCK = 25  # clicks of one side in a row in the click case (``measure``'s ``block``)
CLICK_SETTLE_S = 0.2  # before each block, past the servers' polling: their and the reference's spinning has stopped


def case_click(ctx: Context) -> list[dict]:
    """One click on an embedded 800x600 image: ours through ``sam2flow serve`` in its own process, over
    HTTP on loopback (``POST /page/decode``, the page's path: the previous prompt's logits as mask
    input, RLE and box out), the reference in process (``predictor.predict(point_coords,
    point_labels, mask_input=the previous low-res logits)``, its fastest documented mode). p50/p90/p99
    in the notes. Where bf16 is native, a second server in bfloat16 (what ``dtype=auto`` runs there:
    encoder and decoder) against the reference under ``torch.autocast``.

    The server runs as users run it, one process of its own (inside this process its compute thread
    would be one more OpenMP team beside the reference's and the other server's, and libgomp stops
    spinning idle helpers when a process has more of them than cores: ``engine/threads.py``; that
    measured ~10 ms a click more on 2 cores), with its default ``--click-spin-ms``. Each side clicks
    ``CLICK_BLOCK`` times in a row, the sides taking turns, with a pause before each turn long enough
    for the server's polling and the reference's OpenMP spinning to stop: click by click, each side
    met the other's spinning helpers on one of the two cores (session 17: our bf16 p50/p99 20.8/38.0
    ms that way, 4 clicks of 50 at 30-40 ms). The notes add an annotator's pace, ours alone: one
    click every 250 ms, against a server with the default polling and one without.
    """
    import base64
    import io
    import tempfile

    import requests
    from PIL import Image

    from sam2flow.server.ready import wait_ready
    from sam2flow.server.settings import ServerSettings

    s = ctx.settings
    sc = data.scene(700, (600, 800))
    total = s.click_warmup + s.click_repeats + 2 * PACED_CLICKS
    sequences = click_sequences(sc, (total + 4) // 5, 700)
    buf = io.BytesIO()
    Image.fromarray(sc.image).save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    http = requests.Session()
    servers: list[subprocess.Popen] = []
    logs = Path(tempfile.mkdtemp(prefix="sam2flow-bench-click-"))

    def start(dtype: str, spin_ms: float = ServerSettings().click_spin_ms) -> tuple[str, str]:
        """``sam2flow serve`` in ``dtype`` on a free port, the scene embedded: (url, image_id).
        ``spin_ms``: the server's ``--click-spin-ms``."""
        port = _free_port()
        command = [sys.executable, "-m", "sam2flow", "serve", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--checkpoint", str(ctx.ckpt.path), "--preload", ctx.size, "--family", ctx.ckpt.family]
        command += ["--device", str(ctx.device), "--dtype", dtype, "--click-spin-ms", str(spin_ms)]
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # --threads: both sides
        log = logs / f"server-{len(servers)}.log"
        with open(log, "wb") as out:
            server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        servers.append(server)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 900, server, log, name="the benchmark server")
        body = {"image": {"type": "base64", "value": png}, "sam2_version_id": ctx.size}
        r = http.post(f"{url}/sam2/embed_image", timeout=600, json=body)
        r.raise_for_status()
        return url, r.json()["image_id"]

    def ours(url: str, image_id: str, route: str = "/page/decode") -> Callable[[], Any]:
        """Clicks through the page's route, or ``/sam2/segment_image`` (the Roboflow-style API: points as
        ``{x, y, positive}``, RLE out, the previous logits from the server's cache by ``image_id``)."""
        count = [0]

        def click():
            n = count[0]
            count[0] += 1
            pts, labels = sequences[n // 5]
            k = n % 5 + 1
            if route == "/page/decode":
                points = [[float(x), float(y), int(lab)] for (x, y), lab in zip(pts[:k], labels[:k])]
                body = {"image_id": image_id, "sam2_version_id": ctx.size, "points": points}
            else:
                points = [
                    {"x": float(x), "y": float(y), "positive": bool(lab)} for (x, y), lab in zip(pts[:k], labels[:k])
                ]
                body = {
                    "image_id": image_id,
                    "sam2_version_id": ctx.size,
                    "prompts": [{"points": points}],
                    "format": "rle",
                    "load_logits_from_cache": k > 1,
                    "save_logits_to_cache": True,
                }
            answer = http.post(f"{url}{route}", json=body, timeout=60)
            answer.raise_for_status()
            return answer.json()

        return click

    def ref() -> Callable[[], Any]:
        count, prev = [0], {}

        def click():
            n = count[0]
            count[0] += 1
            pts, labels = sequences[n // 5]
            k = n % 5 + 1
            masks, scores, logits = ctx.predictor.predict(
                point_coords=pts[:k],
                point_labels=labels[:k],
                mask_input=prev.get(n // 5) if k > 1 else None,
                multimask_output=k == 1,
            )
            best = int(scores.argmax())
            prev[n // 5] = logits[best : best + 1]
            return masks[best]

        return click

    def alone(click: Callable[[], Any], calls: int, gap_s: float) -> dict:
        """Ours alone, the reference idle: ``calls`` clicks, ``gap_s`` before each (0.25: an annotator's
        pace; 0: back to back); percentiles of all but the first 5."""
        samples = []
        for _ in range(calls):
            time.sleep(gap_s)
            t0 = time.perf_counter()
            click()
            samples.append(time.perf_counter() - t0)
        return _percentiles(samples[5:])

    try:
        started = {"float32": start("float32")}
        if ctx.ours_bf16:
            started["bfloat16"] = start("bfloat16")
        fns = ctx.competitors(
            ours(*started["float32"]), ref(), ours(*started["bfloat16"]) if "bfloat16" in started else None
        )
        if REF_BF16 in fns:
            fns[REF_BF16] = ctx.ref(ref(), autocast=True)  # its own click sequence and previous masks
        with torch.inference_mode():
            ctx.predictor.set_image(sc.image)
        ctx.log(f"click: 800x600, 1-5 points + previous mask, {s.click_warmup} warm-up + {s.click_repeats} clicks")
        settle = ServerSettings().click_spin_ms / 1000 + CLICK_SETTLE_S
        m = measure(fns, s.click_warmup, s.click_repeats, ctx.sync, block=CLICK_BLOCK, settle_s=settle)
        pts, labels = sequences[0]
        extra = {}
        for variant, engine, dtype in ((OURS, ctx.ours, "float32"), (OURS_BF16, ctx.ours_bf16, "bfloat16")):
            if variant in m.samples:
                ctx.log(f"click: {dtype} at an annotator's pace, {PACED_CLICKS} clicks 250 ms apart, polling on/off")
                idle = start(dtype, spin_ms=0)
                paced_on = alone(ours(*started[dtype]), PACED_CLICKS, 0.25)
                paced_off = alone(ours(*idle), PACED_CLICKS, 0.25)
                ctx.log(f"click: {dtype} through /sam2/segment_image, {s.click_repeats} clicks back to back")
                segment = alone(ours(*started[dtype], route="/sam2/segment_image"), s.click_repeats + 5, 0.0)
                emb = engine.embed([sc.image])[0]
                prev = engine.predict(emb, points=pts[:1], point_labels=labels[:1]).low_res_logits[0]
                extra[variant] = dict(
                    ours_percentiles_ms=_percentiles(m.samples[variant]),
                    reference_percentiles_ms=_percentiles(m.samples[REF_BF16 if variant == OURS_BF16 else REF]),
                    ours_stages_ms=_click_breakdown(
                        engine, emb, pts[:2], labels[:2], prev, max(5, s.click_repeats // 5)
                    ),
                    route="POST /page/decode on loopback (reference in process)",
                    paced_percentiles_ms=paced_on,
                    paced_no_spin_percentiles_ms=paced_off,
                    segment_image_percentiles_ms=segment,
                )
    finally:
        for server in servers:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(logs, ignore_errors=True)
    return rows(
        ctx,
        "800x600, 1-5 points + mask, HTTP",
        m,
        "ms/click",
        lambda t: 1000 * t,
        warmup=s.click_warmup,
        bf16_extra=extra.get(OURS_BF16),
        **extra[OURS],
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- 7. the first click on an image whose embedding is in the store ------------------------


def case_store(ctx: Context) -> list[dict]:
    """The first click on an 800x600 image, nothing of it in memory: ours with its embedding in an
    ``EmbeddingStore`` (read from the file, float16 widened to float32, then decoded) vs the reference
    (``set_image`` + ``predict``: the encoder, as for every image it has not seen); our first click
    on a new image (encoder + decode, no store) in the notes. The store file is in the OS page cache
    after the warm-up, as on a server that reads it often; a cold disk adds its read time (8.4 MB)."""
    import tempfile

    from sam2flow.engine.store import EmbeddingStore

    s = ctx.settings
    sc = data.scene(710, (600, 800))
    pts, labels = click_sequences(sc, 1, 710)[0]
    pts, labels = pts[:1], labels[:1]
    root = tempfile.mkdtemp(prefix="sam2flow-bench-store-")
    o = ctx.ours  # its cache is off: every call embeds (or reads the store)
    writer = data.load_ours(
        ctx.ckpt, str(o.device), str(o.dtype).removeprefix("torch."), store=EmbeddingStore(root, True)
    )
    writer.embed([sc.image])
    stored = data.load_ours(ctx.ckpt, str(o.device), str(o.dtype).removeprefix("torch."), store=EmbeddingStore(root))
    new_image = "ours (new image)"

    def first_click(engine):
        return engine.predict(engine.embed([sc.image])[0], points=pts, point_labels=labels).masks[0]

    def ref():
        ctx.predictor.set_image(sc.image)
        masks, scores, _ = ctx.predictor.predict(point_coords=pts, point_labels=labels, multimask_output=True)
        return masks[int(scores.argmax())] > 0

    fns = {OURS: lambda: first_click(stored), REF: ctx.ref(ref), new_image: lambda: first_click(o)}
    ctx.log(f"store: first click, 800x600, {s.store_warmup} warm-up + {s.store_repeats} repeats of {', '.join(fns)}")
    try:
        m = measure(fns, s.store_warmup, s.store_repeats, ctx.sync)
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return rows(
        ctx,
        "800x600, first click, stored vs new image",
        m,
        "ms/click",
        lambda t: 1000 * t,
        warmup=s.store_warmup,
        ours_new_image_ms=1000 * m.median(new_image),
        mask_iou_vs_reference=float(mask_iou(m.last[OURS][None], m.last[REF][None])[0]),
        mask_iou_stored_vs_new=float(mask_iou(m.last[OURS][None], m.last[new_image][None])[0]),
        route="in process: engine.embed (store read) + engine.predict",
    )


# ---- 5. peak memory of the step -------------------------------------------------------------


def write_step_inputs(path: Path, count: int) -> Path:
    """The memory case's images and detections as arrays (no pickle), for ``memory_worker.read_inputs``."""
    images, dets = data.step_inputs(count)
    arrays: dict[str, np.ndarray] = {"count": np.asarray(count)}
    for i, (image, d) in enumerate(zip(images, dets)):
        arrays.update({f"image{i}": image, f"xyxy{i}": d.xyxy, f"confidence{i}": d.confidence})
        arrays.update({f"class_id{i}": d.class_id, f"class_name{i}": d.data["class_name"].astype(str)})
        arrays[f"detection_id{i}"] = d.data["detection_id"].astype(str)
    np.savez(path, **arrays)
    return path


def memory_worker(impl: str, ckpt: data.Checkpoint, device: str, inputs: Path, threads: int, **extra) -> dict:
    """``benchmarks.memory_worker`` for one side in a fresh process; ``extra``: ``dtype``, ``graphs``."""
    cmd = [sys.executable, "-m", "benchmarks.memory_worker", "--impl", impl, "--inputs", str(inputs)]
    cmd += ["--version", ckpt.version, "--family", ckpt.family, "--checkpoint", str(ckpt.path)]
    cmd += ["--device", device, "--threads", str(threads)]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker ({impl}, {extra}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def case_memory(
    size: str, ckpt: data.Checkpoint, device: torch.device, settings: Settings, threads: int, log, graphs: Path | None
) -> list[dict]:
    """Peak resident memory of the step case, each side alone in a fresh process with its own imports.

    Sides: ours (``Sam2Engine`` in float32, as the other float32 rows), the reference, and, on a CPU
    with ``graphs`` (an export), ``GraphEngine`` in float32 and as ``dtype="auto"`` picks (no torch).
    """
    n = settings.step_images
    log(f"memory: step on {n} images, each side in its own process")
    with tempfile.TemporaryDirectory() as tmp:
        inputs = write_step_inputs(Path(tmp) / "inputs.npz", n)
        res = {
            OURS: memory_worker("ours", ckpt, str(device), inputs, threads),
            REF: memory_worker("reference", ckpt, str(device), inputs, threads),
        }
        if graphs is not None and device.type == "cpu":
            res[OURS_GRAPHS] = memory_worker("graphs", ckpt, "cpu", inputs, threads, graphs=graphs)
            auto = memory_worker("graphs", ckpt, "cpu", inputs, threads, graphs=graphs, dtype="auto")
            if (auto["dtype"], auto["quantize"]) != ("float32", "none"):
                res[OURS_GRAPHS_AUTO] = auto

    def mib(r: dict) -> float:
        return r["peak_rss_mib"]

    ref = res[REF]
    out = [
        {
            "size": size,
            "device": str(device),
            "config": f"step, {n} x 640x480, 10 boxes each",
            "variant": variant,
            "ours": mib(r),
            "reference": mib(ref),
            "unit": "MiB peak RSS",
            "ratio": mib(ref) / mib(r),
            "higher_is_better": False,
            "reference_mode": REF,
            "warmup": 0,
            "repeats": 1,
            "after_load_mib": {"ours": r["after_load_rss_mib"], "reference": ref["after_load_rss_mib"]},
            "baseline_mib": {"ours": r["baseline_rss_mib"], "reference": ref["baseline_rss_mib"]},
            "samples": {"ours": [mib(r)], "reference": [mib(ref)]},
            "precision": {k: r[k] for k in ("dtype", "quantize", "backend") if k in r},
            **({"torch_imported": r["torch_imported"]} if "torch_imported" in r else {}),
        }
        for variant, r in res.items()
        if variant != REF
    ]
    if device.type == "cuda":
        out[0]["cuda_peak_allocated_mib"] = {
            "ours": res[OURS].get("cuda_peak_allocated_mib"),
            "reference": ref.get("cuda_peak_allocated_mib"),
        }
    return out
