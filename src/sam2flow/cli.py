"""The ``sam2flow`` command line: ``segment`` an image with boxes and clicks.

Errors end in one line on stderr (``sam2flow: error: ...``) and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .engine.precision import DTYPE_CHOICES
from .models.registry import DEFAULT_FAMILY, DEFAULT_VERSION, FAMILIES, VERSIONS


def _floats(text: str, n: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} {text!r} is not comma-separated numbers") from None
    if len(values) not in n:
        raise argparse.ArgumentTypeError(f"{what} {text!r} needs {' or '.join(map(str, n))} numbers")
    return values


def _box(text: str) -> list[float]:
    return _floats(text, (4,), "--box")


def _point(text: str) -> list[float]:
    values = _floats(text, (2, 3), "--point")
    if len(values) == 3 and values[2] not in (0.0, 1.0):
        raise argparse.ArgumentTypeError(f"--point {text!r}: label must be 1 (positive) or 0 (negative)")
    return values if len(values) == 3 else values + [1.0]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (``--help`` still shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"sam2flow: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sam2flow", description="Segment Anything 2 on images.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    seg = sub.add_parser("segment", help="segment objects in one image from boxes and clicks")
    seg.add_argument("image", help="image file (any format Pillow reads)")
    seg.add_argument("--box", type=_box, action="append", default=[], metavar="X1,Y1,X2,Y2",
                     help="a box prompt in pixels; repeat for more objects")
    seg.add_argument("--point", type=_point, action="append", default=[], metavar="X,Y[,LABEL]",
                     help="a click (label 1 positive, default; 0 negative); all clicks form one prompt, "
                          "which joins the box when exactly one --box is given")
    seg.add_argument("--boxes", type=Path, metavar="FILE.json",
                     help="detections in the prediction JSON format (x, y, width, height as centre and size)")
    _add_model_args(seg)
    seg.add_argument("--threshold", type=float, default=0.0, help="drop masks scoring below this (default 0)")
    seg.add_argument("--single-mask", action="store_true", help="single-mask mode instead of best of three")
    _add_cleanup_args(seg)
    seg.add_argument("--format", choices=("json", "rle"), default="json",
                     help="json: polygon points per mask; rle: COCO RLE per mask")
    seg.add_argument("--out", type=Path, help="write the JSON here instead of stdout")
    seg.add_argument("--annotate", type=Path, metavar="OUT.png", help="write the image with masks, boxes and labels")

    run = sub.add_parser("run-workflow", help="run a workflow definition (Roboflow Workflows JSON)")
    run.add_argument("definition", type=Path, help="workflow definition JSON file")
    run.add_argument("--input", action="append", default=[], metavar="NAME=VALUE",
                     help="an input value; repeat a name for a batch; @FILE reads JSON from a file; "
                          "other values are parsed as JSON when they parse, else taken as strings (paths)")
    run.add_argument("--family", choices=FAMILIES, default=DEFAULT_FAMILY)
    run.add_argument("--checkpoint", action="append", default=[], metavar="[VERSION=]PATH",
                     help="weights for a version (default hiera_tiny when no VERSION= is given); repeatable")
    run.add_argument("--device", default="auto")
    run.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                     help="image encoder precision; auto: bfloat16 where the hardware has it (default)")
    run.add_argument("--format", choices=("json", "rle"), default="json", help="mask format in the output")
    run.add_argument("--out", type=Path, help="write the JSON here instead of stdout")
    run.add_argument("--remote", metavar="URL", help="send the step's work to this sam2flow server "
                     "(default $SAM2FLOW_REMOTE_URL; the key comes from $SAM2FLOW_API_KEY)")

    bat = sub.add_parser("batch", help="segment a directory (or glob) of images into JSON Lines, resumably")
    bat.add_argument("input", help="a directory of images or a glob pattern (quote it)")
    bat.add_argument("--boxes", help="a directory of <stem>.json detections or one JSONL with a 'file' key; "
                                     "without it, unprompted mode")
    bat.add_argument("--out", type=Path, required=True, help="output .jsonl (appended; re-runs skip done files)")
    bat.add_argument("--format", choices=("rle", "polygon"), default="rle")
    bat.add_argument("--batch-size", type=int, default=4, help="images embedded together")
    bat.add_argument("--threshold", type=float, default=0.0)
    bat.add_argument("--single-mask", action="store_true")
    _add_cleanup_args(bat)
    bat.add_argument("--points-per-side", type=int, default=32, help="unprompted mode's point grid")
    _add_model_args(bat)
    bat.add_argument("--ray", action="store_true", help="run as a Ray Data pipeline (pip install 'sam2flow[ray]'); "
                     "--out may then also be a .parquet directory")
    bat.add_argument("--ray-address", help="with --ray: the cluster to join ('auto': this machine's; "
                                           "default $RAY_ADDRESS, else a new local cluster)")
    bat.add_argument("--ray-actors", type=int, help="with --ray: model actors (default one per GPU, else per CPU less one)")
    bat.add_argument("--ray-gpus-per-actor", type=float, help="with --ray: GPU share per actor (default 1 on GPU clusters)")
    bat.add_argument("--ray-cpus-per-actor", type=float, default=1.0, help="with --ray: CPUs per actor (default 1)")

    srv = sub.add_parser("serve", help="run the SAM2 inference server (inference-sdk compatible HTTP API)")
    srv.add_argument("--host", help="default 127.0.0.1 (SAM2FLOW_HOST)")
    srv.add_argument("--port", type=int, help="default 9001 (SAM2FLOW_PORT)")
    srv.add_argument("--device", help="auto, cpu, cuda, mps (SAM2FLOW_DEVICE)")
    srv.add_argument("--dtype", choices=DTYPE_CHOICES, help="encoder precision, default auto (SAM2FLOW_DTYPE)")
    srv.add_argument("--compile", action="store_true", default=None,
                     help="torch.compile the image encoder at load (SAM2FLOW_COMPILE)")
    srv.add_argument("--family", choices=FAMILIES, help="sam2.1 or sam2 (SAM2FLOW_FAMILY)")
    srv.add_argument("--preload", action="append", choices=VERSIONS,
                     help="load this version at start-up; repeatable (SAM2FLOW_PRELOAD=a,b)")
    srv.add_argument("--checkpoint", help="weights for the first preloaded version (SAM2FLOW_CHECKPOINT)")
    srv.add_argument("--max-batch-size", type=int, help="images embedded together (SAM2FLOW_MAX_BATCH_SIZE)")
    srv.add_argument("--max-wait-ms", type=float, help="batching wait (SAM2FLOW_MAX_WAIT_MS)")
    srv.add_argument("--images", metavar="DIR", help="labelling page: label the images of DIR (read-only)")
    srv.add_argument("--labels", metavar="A,B,...", help="labelling page: the class list (SAM2FLOW_LABELS)")
    srv.add_argument("--annotations", metavar="OUT.json", help="with --images: the COCO file saved as you go "
                                                               "(default <DIR name>.coco.json)")
    srv.add_argument("--ray", action="store_true", help="deploy on Ray Serve (pip install 'sam2flow[ray]')")
    srv.add_argument("--ray-address", help="with --ray: the cluster to join ('auto': this machine's; "
                                           "default $RAY_ADDRESS, else a new local cluster)")
    srv.add_argument("--replicas", type=int, help="with --ray: model replicas (default 1; the initial "
                                                  "number when autoscaling)")
    srv.add_argument("--min-replicas", type=int, help="with --ray: autoscale from this many replicas")
    srv.add_argument("--max-replicas", type=int, help="with --ray: autoscale up to this many replicas")
    srv.add_argument("--num-gpus-per-replica", type=float,
                     help="with --ray: GPU share per replica (0.5: two per GPU; default 1 if the cluster has GPUs)")
    srv.add_argument("--num-cpus-per-replica", type=float, default=1.0, help="with --ray: CPUs per replica")
    fix = sub.add_parser("fixture", help="write the offline fixture model (hiera_tiny trained on synthetic shapes)")
    dest = fix.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", type=Path, metavar="FILE.pt", help="an original-layout checkpoint (Meta's format)")
    dest.add_argument("--hf", type=Path, metavar="DIR", help="a Hugging Face directory (config.json + safetensors)")
    fix.add_argument("--family", choices=FAMILIES, default=DEFAULT_FAMILY)

    demo = sub.add_parser("demo", help="run the workflow step on a generated scene with the fixture model (offline)")
    demo.add_argument("--out", type=Path, default=Path("sam2flow-demo"), help="output directory (default %(default)s)")
    demo.add_argument("--seed", type=int, default=3, help="which generated scene")
    return parser


def cmd_fixture(args) -> int:
    from .testing.fixture import write_checkpoint, write_hf_directory

    if args.out is not None:
        path = write_checkpoint(args.out, args.family)
        print(f"sam2flow fixture: wrote {path} (hiera_tiny, {args.family}, original layout)", file=sys.stderr)
    else:
        path = write_hf_directory(args.hf, args.family)
        print(f"sam2flow fixture: wrote {path} (hiera_tiny, {args.family}, Hugging Face directory)", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from .testing.demo import run_demo

    result = run_demo(args.out, seed=args.seed)
    iou = f"; mean IoU with the true shapes {result.ious.mean():.3f}" if len(result.ious) else ""
    print(f"sam2flow demo: {len(result.detections)} of {len(result.scene)} shapes segmented{iou}")
    for name, path in result.files.items():
        print(f"  {name}: {path}")
    print("The demo model only knows synthetic shapes; for real images see the README (weights).")
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from .server.app import create_app
    from .server.settings import ServerSettings

    overrides = {k: v for k, v in vars(args).items()
                 if k in ServerSettings.model_fields and v is not None}
    settings = ServerSettings(**overrides)
    if args.ray:
        return _cmd_serve_ray(args, settings)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")
    return 0


def _cmd_serve_ray(args, settings) -> int:
    from .scale.ray_common import require_ray

    require_ray()  # before any work: without Ray this is the one line the user sees
    from .scale.ray_serve import serve_forever

    if settings.checkpoint and Path(settings.checkpoint).exists():  # the replicas' working directory is not ours
        settings.checkpoint = str(Path(settings.checkpoint).resolve())
    serve_forever(settings, args.ray_address, replicas=args.replicas, min_replicas=args.min_replicas,
                  max_replicas=args.max_replicas, num_gpus_per_replica=args.num_gpus_per_replica,
                  num_cpus_per_replica=args.num_cpus_per_replica)
    return 0


def _area(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0")
    return value


def _add_cleanup_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-hole-area", type=_area, default=0, metavar="PIXELS",
                   help="fill holes of at most this many low-resolution (256x256) pixels; 0 = off (default)")
    p.add_argument("--max-sprinkle-area", type=_area, default=0, metavar="PIXELS",
                   help="erase specks of at most this many low-resolution (256x256) pixels; 0 = off (default)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", choices=VERSIONS, default=DEFAULT_VERSION)
    p.add_argument("--family", choices=FAMILIES, default=DEFAULT_FAMILY)
    p.add_argument("--checkpoint", help="an original .pt, a Hugging Face directory or repository id")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="image encoder precision; auto (default): bfloat16 where the hardware has it, "
                        "float32 gives the reference's masks")
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoder (slow start)")


def _prompts(args, image_hw):
    """Prompts, class ids/names and parent ids, in prompt order: --boxes file, --box, then clicks."""
    from .engine.prompts import Prompt, group_prompts
    from .formats import predictions_to_detections

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


def cmd_segment(args) -> int:
    from .detections import masks_to_detections
    from .engine.engine import Sam2Engine
    from .formats import detections_to_predictions
    from .images import read_image_file

    image = read_image_file(args.image, f"image {args.image}")
    h, w = image.shape[:2]
    prompts, class_ids, class_names, parents = _prompts(args, (h, w))
    engine = Sam2Engine.from_pretrained(
        args.version, args.family, args.checkpoint, device=args.device, dtype=args.dtype, compile=args.compile
    )
    result = engine.predict_prompts(engine.embed([image])[0], prompts, multimask_output=not args.single_mask,
                                    max_hole_area=args.max_hole_area, max_sprinkle_area=args.max_sprinkle_area)
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
        from .annotate import write_annotated

        write_annotated(image, detections, args.annotate)
    return 0


def _input_value(text: str):
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--input @{path}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_inputs(pairs: list[str]) -> dict:
    """``NAME=VALUE`` pairs → inputs; a repeated name makes a batch (a list)."""
    values: dict[str, list] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--input {pair!r} is not NAME=VALUE")
        values.setdefault(name, []).append(_input_value(text))
    return {k: v[0] if len(v) == 1 else v for k, v in values.items()}


def cmd_run_workflow(args) -> int:
    from .engine.pool import EnginePool
    from .workflows.definition import parse_definition
    from .workflows.runner import run_workflow, serialize_outputs

    try:
        raw = json.loads(args.definition.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"workflow definition {args.definition}: {e}") from None
    definition = parse_definition(raw.get("specification", raw) if isinstance(raw, dict) else raw)
    inputs = parse_inputs(args.input)
    checkpoints = {}
    for item in args.checkpoint:
        version, sep, path = item.partition("=")
        checkpoints[version if sep else DEFAULT_VERSION] = path if sep else item
    if args.remote or os.environ.get("SAM2FLOW_REMOTE_URL"):
        results = run_workflow(definition, inputs, execution="remote", api_url=args.remote)
    else:
        results = run_workflow(definition, inputs, EnginePool(args.family, args.device, args.dtype, checkpoints))
    text = json.dumps(serialize_outputs(results, "rle" if args.format == "rle" else "polygon"))
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


def cmd_batch(args) -> int:
    from .engine.engine import Sam2Engine
    from .scale.batch import run_batch

    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if args.ray:
        return _cmd_batch_ray(args)
    if args.out.suffix != ".jsonl":
        raise ValueError(f"--out {args.out} must end in .jsonl")
    engine = Sam2Engine.from_pretrained(args.version, args.family, args.checkpoint, device=args.device,
                                        dtype=args.dtype, max_batch_size=args.batch_size, compile=args.compile)
    params = _step_parameters(args)
    from .engine.automatic import AutomaticConfig

    config = AutomaticConfig(points_per_side=args.points_per_side)
    summary = run_batch(engine, args.input, args.out, args.boxes, args.format, args.batch_size, params,
                        automatic_config=config)
    return _batch_summary(summary)


def _step_parameters(args):
    from .workflows.step import StepParameters

    return StepParameters(args.version, args.threshold, not args.single_mask, max_hole_area=args.max_hole_area,
                          max_sprinkle_area=args.max_sprinkle_area)


def _batch_summary(summary) -> int:
    print(f"sam2flow batch: {summary.line()}" + (f"; unreadable: {', '.join(summary.failed)}" if summary.failed else ""),
          file=sys.stderr)
    return 0


def _cmd_batch_ray(args) -> int:
    from .engine.automatic import AutomaticConfig
    from .scale.ray_common import require_ray

    require_ray()  # before any work: without Ray this is the one line the user sees
    from .scale.ray_batch import run_ray_batch

    if args.out.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"--out {args.out} must end in .jsonl or .parquet")
    checkpoint = args.checkpoint
    if checkpoint and Path(checkpoint).exists():  # the actors' working directory is not ours
        checkpoint = str(Path(checkpoint).resolve())
    engine_args = {"version": args.version, "family": args.family, "checkpoint": checkpoint,
                   "device": args.device, "dtype": args.dtype, "max_batch_size": args.batch_size,
                   "compile": args.compile}
    summary = run_ray_batch(args.input, args.out, engine_args, args.boxes, args.format, args.batch_size,
                            _step_parameters(args),
                            AutomaticConfig(points_per_side=args.points_per_side), args.ray_address,
                            args.ray_actors, args.ray_gpus_per_actor, args.ray_cpus_per_actor)
    return _batch_summary(summary)


def main(argv: list[str] | None = None) -> int:
    from .testing.fixture import FixtureError

    args = build_parser().parse_args(argv)
    try:
        commands = {"segment": cmd_segment, "run-workflow": cmd_run_workflow, "serve": cmd_serve, "batch": cmd_batch,
                    "fixture": cmd_fixture, "demo": cmd_demo}
        return commands[args.command](args)
    except (ValueError, OSError, FixtureError) as e:
        message = " ".join(str(e).split())
        print(f"sam2flow: error: {message}", file=sys.stderr)
        return 1
