"""``sam2flow batch INPUT --out FILE``: a folder or glob of images into JSON Lines, resumably (or on Ray)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from .common import (
    add_cleanup_args,
    add_graphs_arg,
    add_model_args,
    add_ray_args,
    add_store_args,
    engine_args,
    for_remote_workers,
    graph_engine,
    open_store,
    step_parameters,
)


def add_parser(sub) -> None:
    bat = sub.add_parser("batch", help="segment a directory (or glob) of images into JSON Lines, resumably")
    bat.add_argument("input", help="a directory of images or a glob pattern (quote it)")
    bat.add_argument(
        "--boxes",
        help="a directory of <stem>.json detections or one JSONL with a 'file' key; without it, unprompted mode",
    )
    bat.add_argument("--out", type=Path, required=True, help="output .jsonl (appended; re-runs skip done files)")
    bat.add_argument("--format", choices=("rle", "polygon"), default="rle")
    bat.add_argument("--batch-size", type=int, help="images embedded together (default 1 on a CPU, 4 on GPUs)")
    bat.add_argument("--threshold", type=float, default=0.0)
    bat.add_argument("--single-mask", action="store_true")
    add_cleanup_args(bat)
    bat.add_argument("--points-per-side", type=int, default=32, help="unprompted mode's point grid")
    add_model_args(bat)
    bat.add_argument(
        "--ray",
        action="store_true",
        help="run as a Ray Data pipeline (pip install 'sam2flow[ray]'); --out may then also be a .parquet directory",
    )
    add_ray_args(bat)
    add_store_args(bat)
    add_graphs_arg(bat)
    bat.set_defaults(run=run)


def run(args) -> int:
    from ..engine.types import AutomaticConfig

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    config = AutomaticConfig(points_per_side=args.points_per_side)
    if args.ray:
        if args.graphs is not None:
            raise ValueError("--graphs runs in this process: leave out --ray")
        return _run_ray(args, config)
    from ..scale.batch import run_batch

    if args.out.suffix != ".jsonl":
        raise ValueError(f"--out {args.out} must end in .jsonl")
    params = step_parameters(args)
    if args.graphs is not None:  # no torch in this process
        if args.store is not None:
            raise ValueError("--graphs keeps no embedding store: leave out --store")
        engine, batch_size = graph_engine(args), args.batch_size or 1
        params = dataclasses.replace(params, version=engine.version)
    else:
        from ..engine.engine import Sam2Engine

        store = open_store(args.store, args.store_write)
        engine = Sam2Engine.from_pretrained(**engine_args(args, max_batch_size=args.batch_size, store=store))
        batch_size = engine.max_batch_size
    summary = run_batch(
        engine, args.input, args.out, args.boxes, args.format, batch_size, params, automatic_config=config
    )
    return _summary(summary)


def _run_ray(args, config) -> int:
    from ..scale.ray_common import require_ray

    require_ray()  # before any work: without Ray this is the one line the user sees
    from ..engine.engine import default_batch_size
    from ..scale.ray_batch import run_ray_batch

    if args.out.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"--out {args.out} must end in .jsonl or .parquet")
    actor_engine = engine_args(
        args,
        checkpoint=for_remote_workers(args.checkpoint),
        max_batch_size=args.batch_size,
        store=open_store(args.store, args.store_write),  # an absolute path and a flag, sent to each actor
    )
    summary = run_ray_batch(
        args.input,
        args.out,
        actor_engine,
        args.boxes,
        args.format,
        args.batch_size or default_batch_size(args.device),
        step_parameters(args),
        config,
        args.ray_address,
        args.ray_actors,
        args.ray_gpus_per_actor,
        args.ray_cpus_per_actor,
    )
    return _summary(summary)


def _summary(summary) -> int:
    failed = f"; unreadable: {', '.join(summary.failed)}" if summary.failed else ""
    print(f"sam2flow batch: {summary.line()}{failed}", file=sys.stderr)
    return 0
