"""Identical inputs for both sides: checkpoints, images, detector-like boxes, and the two models."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import supervision as sv
import torch

from sam2flow.models.registry import get_spec

RANDOM_SEED = 0


@dataclass(frozen=True)
class Checkpoint:
    version: str
    family: str
    path: Path
    weights: str  # what the weights are, in words


def make_checkpoint(version: str, family: str, directory: Path) -> Checkpoint:
    """An original-layout checkpoint (``{"model": state_dict}``) that both sides load.

    hiera_tiny: the project's fixture (trained decoder, realistic masks) when its trained weights
    exist; otherwise, and for other sizes, Meta's ``build_sam2`` with seeded random weights.
    """
    spec = get_spec(version, family)
    directory.mkdir(parents=True, exist_ok=True)
    random_path = directory / f"random{RANDOM_SEED}_{spec.checkpoint_name}"
    if version == "hiera_tiny":
        import hashlib

        from sam2flow.testing.fixture import WEIGHTS_FILE, FixtureError, write_checkpoint

        # named after the trained weights, so a retrained fixture never meets a stale file
        tag = hashlib.sha256(WEIGHTS_FILE.read_bytes()).hexdigest()[:10] if WEIGHTS_FILE.is_file() else "none"
        fixture_path = directory / f"fixture-{tag}_{spec.checkpoint_name}"
        if fixture_path.exists():
            return Checkpoint(version, family, fixture_path, "fixture (trained prompt encoder + mask decoder)")
        try:
            write_checkpoint(fixture_path, family)
            return Checkpoint(version, family, fixture_path, "fixture (trained prompt encoder + mask decoder)")
        except FixtureError as e:
            reason = str(e).split(":")[0]
            note = f"seeded random (Meta build_sam2, seed {RANDOM_SEED}); fixture unavailable: {reason}"
    else:
        note = f"seeded random (Meta build_sam2, seed {RANDOM_SEED}); the fixture exists only for hiera_tiny"
    if not random_path.exists():
        from sam2.build_sam import build_sam2

        torch.manual_seed(RANDOM_SEED)
        model = build_sam2(spec.meta_config, ckpt_path=None, device="cpu", mode="eval")
        tmp = random_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict()}, tmp)
        os.replace(tmp, random_path)
        del model
    return Checkpoint(version, family, random_path, note)


# ---- models ---------------------------------------------------------------------------------


def load_ours(
    ckpt: Checkpoint,
    device: str,
    dtype: str = "float32",
    max_batch_size: int | None = None,
    compile: bool = False,
    backend: str = "auto",
    store=None,
    quantize: str = "auto",
    calibration=None,
):
    """Our engine with its embedding cache off, so every repeat does the full work (``backend`` and
    ``max_batch_size`` as the engine's defaults unless given: OpenVINO and batch 1 on a CPU)."""
    from sam2flow import EmbeddingCache, Sam2Engine

    return Sam2Engine.from_pretrained(
        ckpt.version,
        ckpt.family,
        checkpoint=str(ckpt.path),
        device=device,
        dtype=dtype,
        max_batch_size=max_batch_size,
        cache=EmbeddingCache(max_entries=0),
        compile=compile,
        backend=backend,
        store=store,
        quantize=quantize,
        calibration=calibration,
    )


def graphs_for(ckpt: Checkpoint, log) -> Path:
    """``export_graphs`` of ``ckpt``, made once and kept under ``$SAM2FLOW_CACHE_DIR/graphs`` (named by
    the checkpoint file's hash, the export format and the OpenVINO version)."""
    import hashlib

    import openvino as ov

    from sam2flow import export_graphs
    from sam2flow.engine.graph_engine import GRAPHS_FORMAT, MANIFEST
    from sam2flow.engine.openvino_plugin import cache_root

    h = hashlib.blake2b(digest_size=12)
    with open(ckpt.path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    h.update(f"|{GRAPHS_FORMAT}|{ov.get_version()}".encode())
    directory = cache_root() / "graphs" / f"{ckpt.version}-{h.hexdigest()}"
    if not (directory / MANIFEST).is_file():
        log(f"{ckpt.version}: exporting the graphs GraphEngine runs (once; kept in {directory})")
        export_graphs(directory, ckpt.version, ckpt.family, str(ckpt.path))
    return directory


def load_graphs(directory: Path, dtype: str):
    """``GraphEngine`` on an export, its embedding cache off (every repeat does the full work)."""
    from sam2flow import EmbeddingCache, GraphEngine

    return GraphEngine(directory, dtype=dtype, cache=EmbeddingCache(max_entries=0))


CALIBRATION_SEED = 900  # generated scenes the int8 row calibrates on: none of them is timed or checked


def calibration_images(count: int = 8, hw: tuple[int, int] = (480, 640)) -> list[np.ndarray]:
    """Images for ``quantize="int8"``: generated scenes of the benchmark's kind, not the ones it times."""
    return [scene(CALIBRATION_SEED + i, hw).image for i in range(count)]


def load_reference(ckpt: Checkpoint, device: str):
    """Meta's model and ``SAM2ImagePredictor`` on the same checkpoint, as its README builds them."""
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    spec = get_spec(ckpt.version, ckpt.family)
    model = build_sam2(spec.meta_config, ckpt_path=str(ckpt.path), device=device, mode="eval")
    return model, SAM2ImagePredictor(model)


# ---- images and prompts ---------------------------------------------------------------------


def scene(seed: int, hw: tuple[int, int]):
    """A synthetic scene (``sam2flow.testing.scenes``): image plus ground-truth boxes."""
    from sam2flow.testing.scenes import make_scene

    return make_scene(seed, size=hw)


def detector_boxes(gt_boxes: np.ndarray, hw: tuple[int, int], n: int, seed: int) -> np.ndarray:
    """``n`` boxes (float32 xyxy) as a detector would give them: the scene's ground-truth boxes,
    cycled, each widened by 2 % and shifted by a few per cent of its size (seeded); random boxes
    when the scene has none."""
    h, w = hw
    rng = np.random.default_rng(seed)
    if len(gt_boxes) == 0:
        xy = rng.uniform(0, 1, (n, 2)) * [w * 0.7, h * 0.7]
        wh = rng.uniform(0.1, 0.3, (n, 2)) * [w, h]
        return np.concatenate([xy, xy + wh], 1).astype(np.float32)
    base = gt_boxes[np.arange(n) % len(gt_boxes)].astype(np.float64)
    size = np.maximum(base[:, 2:] - base[:, :2], 1.0)
    jitter = rng.normal(0, 0.03, (n, 4)) * np.concatenate([size, size], 1)
    grow = 0.02 * np.concatenate([-size, size], 1)
    out = base + grow + jitter
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, w - 1)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, h - 1)
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 2)
    return out.astype(np.float32)


def detections(boxes: np.ndarray, kinds: tuple[str, ...], gt_count: int, prefix: str) -> sv.Detections:
    """Boxes as a detector's ``sv.Detections``: class id/name of the shape kind, a detection id."""
    from sam2flow.testing.scenes import KINDS

    names = [kinds[i % gt_count] if gt_count else "object" for i in range(len(boxes))]
    ids = [KINDS.index(k) if k in KINDS else 0 for k in names]
    return sv.Detections(
        xyxy=boxes.astype(np.float32),
        confidence=np.full(len(boxes), 0.9, np.float32),
        class_id=np.asarray(ids, int),
        data={
            "class_name": np.asarray(names, dtype=object),
            "detection_id": np.asarray([f"{prefix}-{i}" for i in range(len(boxes))], dtype=object),
        },
    )


def step_inputs(count: int, boxes_per_image: int = 10, hw: tuple[int, int] = (480, 640), seed: int = 300):
    """``count`` images of ``hw`` with ``boxes_per_image`` detections each (the step case)."""
    images, dets = [], []
    for i in range(count):
        s = scene(seed + i, hw)
        boxes = detector_boxes(s.boxes, hw, boxes_per_image, seed + i)
        images.append(s.image)
        dets.append(detections(boxes, s.kinds, len(s.boxes), f"img{i}"))
    return images, dets
