"""``sam2flow segment IMAGE``: one image, boxes and clicks in, masks as JSON (and a picture) out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_cleanup_args, add_model_args, engine_args, floats


def _box(text: str) -> list[float]:
    return floats(text, (4,), "--box")


def _point(text: str) -> list[float]:
    values = floats(text, (2, 3), "--point")
    if len(values) == 3 and values[2] not in (0.0, 1.0):
        raise argparse.ArgumentTypeError(f"--point {text!r}: label must be 1 (positive) or 0 (negative)")
    return values if len(values) == 3 else values + [1.0]


def add_parser(sub) -> None:
    seg = sub.add_parser("segment", help="segment objects in one image from boxes and clicks")
    seg.add_argument("image", help="image file (any format Pillow reads)")
    seg.add_argument(
        "--box",
        type=_box,
        action="append",
        default=[],
        metavar="X1,Y1,X2,Y2",
        help="a box prompt in pixels; repeat for more objects",
    )
    seg.add_argument(
        "--point",
        type=_point,
        action="append",
        default=[],
        metavar="X,Y[,LABEL]",
        help="a click (label 1 positive, default; 0 negative); all clicks form one prompt, "
        "which joins the box when exactly one --box is given",
    )
    seg.add_argument(
        "--boxes",
        type=Path,
        metavar="FILE.json",
        help="detections in the prediction JSON format (x, y, width, height as centre and size)",
    )
    add_model_args(seg)
    seg.add_argument("--threshold", type=float, default=0.0, help="drop masks scoring below this (default 0)")
    seg.add_argument("--single-mask", action="store_true", help="single-mask mode instead of best of three")
    add_cleanup_args(seg)
    seg.add_argument(
        "--format",
        choices=("json", "rle"),
        default="json",
        help="json: polygon points per mask; rle: COCO RLE per mask",
    )
    seg.add_argument("--out", type=Path, help="write the JSON here instead of stdout")
    seg.add_argument("--annotate", type=Path, metavar="OUT.png", help="write the image with masks, boxes and labels")
    seg.set_defaults(run=run)


def _prompts(args, image_hw):
    """Prompts, class ids/names and parent ids, in prompt order: --boxes file, --box, then clicks."""
    from ..engine.prompts import Prompt, group_prompts
    from ..formats import predictions_to_detections

    prompts, class_ids, class_names, parents = [], [], [], []
    if args.boxes is not None:
        try:
            data = json.loads(args.boxes.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--boxes {args.boxes}: {e}") from None
        dets = predictions_to_detections(data, image_hw)
        ids = dets.data.get("detection_id")
        for i, box in enumerate(dets.xyxy):
            prompts.append(Prompt(box=box.tolist()))
            class_ids.append(int(dets.class_id[i]))
            class_names.append(str(dets.data["class_name"][i]))
            parents.append(None if ids is None else ids[i])
    for box in args.box:
        prompts.append(Prompt(box=box))
    clicks = [p[:2] for p in args.point]
    labels = [int(p[2]) for p in args.point]
    if clicks and len(prompts) == 1:
        prompts[0] = Prompt(box=prompts[0].box, points=clicks, labels=labels)
    elif clicks:
        prompts.append(Prompt(points=clicks, labels=labels))
    for i in range(len(class_ids), len(prompts)):
        class_ids.append(i)
        class_names.append(str(i))
        parents.append(None)
    if not prompts:
        raise ValueError("no prompts: give --box, --point or --boxes")
    group_prompts(prompts, image_hw)  # fail on bad prompts before loading a model
    return prompts, class_ids, class_names, parents


def run(args) -> int:
    from ..detections import masks_to_detections
    from ..engine.engine import Sam2Engine
    from ..formats import detections_to_predictions
    from ..images import read_image_file

    image = read_image_file(args.image, f"image {args.image}")
    h, w = image.shape[:2]
    prompts, class_ids, class_names, parents = _prompts(args, (h, w))
    engine = Sam2Engine.from_pretrained(**engine_args(args))
    result = engine.predict_prompts(
        engine.embed([image])[0],
        prompts,
        multimask_output=not args.single_mask,
        max_hole_area=args.max_hole_area,
        max_sprinkle_area=args.max_sprinkle_area,
    )
    has_parents = any(p is not None for p in parents)
    detections = masks_to_detections(
        result.masks, result.scores, class_ids, class_names, parents if has_parents else None, args.threshold
    )
    mask_format = "rle" if args.format == "rle" else "polygon"
    payload = {"image": {"width": w, "height": h}, "predictions": detections_to_predictions(detections, mask_format)}
    text = json.dumps(payload)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    if args.annotate:
        from ..annotate import write_annotated

        write_annotated(image, detections, args.annotate)
    return 0
