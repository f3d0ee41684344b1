"""``sam2flow run-workflow DEFINITION --input NAME=VALUE ...``: a workflow definition, locally or remotely."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..engine.options import DTYPE_CHOICES
from ..models.registry import DEFAULT_FAMILY, DEFAULT_VERSION, FAMILIES
from .common import add_backend_arg, add_graphs_arg, add_quantize_args, calibration_images, graph_engine


def add_parser(sub) -> None:
    run_ = sub.add_parser("run-workflow", help="run a workflow definition (Roboflow Workflows JSON)")
    run_.add_argument("definition", type=Path, help="workflow definition JSON file")
    run_.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an input value; repeat a name for a batch; @FILE reads JSON from a file; "
        "other values are parsed as JSON when they parse, else taken as strings (paths)",
    )
    run_.add_argument("--family", choices=FAMILIES, default=DEFAULT_FAMILY)
    run_.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="[VERSION=]PATH",
        help="weights for a version (default hiera_tiny when no VERSION= is given); repeatable",
    )
    run_.add_argument("--device", default="auto")
    run_.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="image encoder precision; auto: bfloat16 where the hardware has it (default)",
    )
    add_backend_arg(run_)
    add_quantize_args(run_)
    add_graphs_arg(run_)
    run_.add_argument("--format", choices=("json", "rle"), default="json", help="mask format in the output")
    run_.add_argument("--out", type=Path, help="write the JSON here instead of stdout")
    run_.add_argument(
        "--remote",
        metavar="URL",
        help="send the step's work to this sam2flow server "
        "(default $SAM2FLOW_REMOTE_URL; the key comes from $SAM2FLOW_API_KEY)",
    )
    run_.set_defaults(run=run)


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


def run(args) -> int:
    from ..workflows.definition import parse_definition
    from ..workflows.runner import run_workflow, serialize_outputs

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
    elif args.graphs is not None:
        results = run_workflow(definition, inputs, graph_engine(args))
    else:
        from ..engine.pool import EnginePool

        calibration = calibration_images(args.calibration)
        pool = EnginePool(
            args.family,
            args.device,
            args.dtype,
            checkpoints,
            backend=args.backend,
            quantize=args.quantize,
            calibration=calibration,
        )
        results = run_workflow(definition, inputs, pool)
    text = json.dumps(serialize_outputs(results, "rle" if args.format == "rle" else "polygon"))
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0
