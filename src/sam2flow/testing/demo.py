"""``sam2flow demo``: the workflow step on a generated scene, offline, with the fixture model.

A synthetic scene plays the detector's output (its exact boxes, class names ``ellipse``,
``rectangle``, ``polygon``); the step turns each box into a mask. The fixture only knows such
shapes: for real images use the released weights (see the README).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import supervision as sv

from ..formats import mask_iou
from .scenes import KINDS, Scene, make_scene

DEMO_DEFINITION = {
    "version": "1.0",
    "inputs": [
        {"type": "WorkflowImage", "name": "image"},
        {"type": "WorkflowBatchInput", "name": "detections", "kind": ["object_detection_prediction"]},
    ],
    "steps": [
        {
            "type": "roboflow_core/segment_anything@v1",
            "name": "sam",
            "images": "$inputs.image",
            "boxes": "$inputs.detections",
            "version": "hiera_tiny",
            "multimask_output": True,
            # Meta's post-processing, in low-resolution pixels (~75 image pixels at 480 x 640): a stray
            # speck far from its shape would otherwise stretch the mask's box over half the image
            "max_hole_area": 16,
            "max_sprinkle_area": 16,
        },
    ],
    "outputs": [{"type": "JsonField", "name": "predictions", "selector": "$steps.sam.predictions"}],
}


@dataclass(frozen=True)
class DemoResult:
    scene: Scene
    detections: sv.Detections
    ious: np.ndarray  # (N,) IoU of each output mask with its prompting shape's true mask
    files: dict[str, Path]


def scene_detections(scene: Scene) -> sv.Detections:
    """The scene's true boxes as a detector's output (class ids follow ``KINDS``)."""
    return sv.Detections(
        xyxy=scene.boxes.astype(np.float32),
        confidence=np.ones(len(scene), np.float32),
        class_id=np.array([KINDS.index(k) for k in scene.kinds], int),
        data={"class_name": np.array(scene.kinds), "detection_id": np.array([str(uuid.uuid4()) for _ in scene.kinds])},
    )


def run_demo(out_dir: str | Path, seed: int = 3, size: tuple[int, int] = (480, 640), engine=None) -> DemoResult:
    """Segment scene ``seed``; write ``input.png``, ``annotated.png`` and ``result.json`` to ``out_dir``.

    ``engine`` defaults to the fixture model on the CPU (``FixtureError`` if its weights are missing).
    """
    from PIL import Image

    from ..annotate import write_annotated
    from ..engine.engine import Sam2Engine
    from ..workflows.runner import run_workflow, serialize_outputs
    from .fixture import fixture_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scene = make_scene(seed, size=size)
    if engine is None:
        model, spec = fixture_model()
        engine = Sam2Engine(model, spec, device="cpu")
    boxes = scene_detections(scene)
    result = run_workflow(DEMO_DEFINITION, {"image": scene.image, "detections": boxes}, engine)
    detections = result[0]["predictions"]
    # each output names its prompting box (parent_id): compare with that shape's true mask
    row = {pid: i for i, pid in enumerate(boxes.data["detection_id"])}
    truth = [scene.masks[row[pid]] for pid in detections.data["parent_id"]]
    ious = np.array([mask_iou(m, t) for m, t in zip(detections.mask, truth)])
    files = {"input": out / "input.png", "annotated": out / "annotated.png", "result": out / "result.json"}
    Image.fromarray(scene.image).save(files["input"])
    write_annotated(scene.image, detections, files["annotated"])
    files["result"].write_text(json.dumps(serialize_outputs(result)[0], indent=1) + "\n")
    return DemoResult(scene, detections, ious, files)
