"""``sam2flow fixture`` and ``sam2flow demo``: the offline fixture model, and the step on a generated scene."""

from __future__ import annotations

import sys
from pathlib import Path

from ..models.registry import DEFAULT_FAMILY, FAMILIES


def add_parsers(sub) -> None:
    fix = sub.add_parser("fixture", help="write the offline fixture model (hiera_tiny trained on synthetic shapes)")
    dest = fix.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", type=Path, metavar="FILE.pt", help="an original-layout checkpoint (Meta's format)")
    dest.add_argument("--hf", type=Path, metavar="DIR", help="a Hugging Face directory (config.json + safetensors)")
    fix.add_argument("--family", choices=FAMILIES, default=DEFAULT_FAMILY)
    fix.set_defaults(run=run_fixture)

    demo = sub.add_parser("demo", help="run the workflow step on a generated scene with the fixture model (offline)")
    demo.add_argument("--out", type=Path, default=Path("sam2flow-demo"), help="output directory (default %(default)s)")
    demo.add_argument("--seed", type=int, default=3, help="which generated scene")
    demo.set_defaults(run=run_demo)


def run_fixture(args) -> int:
    from ..testing.fixture import FixtureError, write_checkpoint, write_hf_directory

    try:
        if args.out is not None:
            path = write_checkpoint(args.out, args.family)
            kind = "original layout"
        else:
            path = write_hf_directory(args.hf, args.family)
            kind = "Hugging Face directory"
    except FixtureError as e:
        raise ValueError(str(e)) from None
    print(f"sam2flow fixture: wrote {path} (hiera_tiny, {args.family}, {kind})", file=sys.stderr)
    return 0


def run_demo(args) -> int:
    from ..testing.demo import run_demo as demo
    from ..testing.fixture import FixtureError

    try:
        result = demo(args.out, seed=args.seed)
    except FixtureError as e:
        raise ValueError(str(e)) from None
    iou = f"; mean IoU with the true shapes {result.ious.mean():.3f}" if len(result.ious) else ""
    print(f"sam2flow demo: {len(result.detections)} of {len(result.scene)} shapes segmented{iou}")
    for name, path in result.files.items():
        print(f"  {name}: {path}")
    print("The demo model only knows synthetic shapes; for real images see the README (weights).")
    return 0
