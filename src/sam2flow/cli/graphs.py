"""``sam2flow export-graphs OUT``: a checkpoint as OpenVINO graphs that ``GraphEngine`` runs without torch."""

from __future__ import annotations

from pathlib import Path

from ..models.registry import DEFAULT_FAMILY, DEFAULT_VERSION, FAMILIES, VERSIONS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export-graphs",
        help="export a checkpoint as OpenVINO graphs (run them without torch: run-workflow --graphs)",
    )
    p.add_argument("out", type=Path, help="a new folder (or an earlier export, replaced)")
    p.add_argument("--version", choices=VERSIONS, default=DEFAULT_VERSION)
    p.add_argument("--family", choices=FAMILIES, default=DEFAULT_FAMILY)
    p.add_argument("--checkpoint", help="weights (.pt, Hugging Face folder or repo id); default: found as usual")
    p.add_argument(
        "--no-int8-weights",
        action="store_true",
        help="leave out the int8-weights encoder (what dtype auto runs on a CPU with VNNI but without native bf16)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from ..engine.graphs import export_graphs

    out = export_graphs(args.out, args.version, args.family, args.checkpoint, int8_weights=not args.no_int8_weights)
    print(out)
    return 0
