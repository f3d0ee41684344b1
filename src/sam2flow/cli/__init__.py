"""The ``sam2flow`` command line: one module per command, each with ``add_parser`` and ``run``.

``segment`` (one image), ``run-workflow``, ``batch``, ``embed``, ``export-graphs``, ``serve``, ``fixture``
and ``demo`` (``offline``). Errors end in one line on stderr (``sam2flow: error: ...``) and a non-zero exit
status; nothing heavy (torch, the server) is imported before a command needs it.
"""

from __future__ import annotations

import argparse
import sys

from ..engine.openvino_plugin import OpenVINOError
from . import batch, embed, graphs, offline, run_workflow, segment, serve
from .common import Parser
from .run_workflow import parse_inputs

__all__ = ["build_parser", "main", "parse_inputs"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sam2flow", description="Segment Anything 2 on images.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    segment.add_parser(sub)
    run_workflow.add_parser(sub)
    batch.add_parser(sub)
    embed.add_parser(sub)
    graphs.add_parser(sub)
    serve.add_parser(sub)
    offline.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError, OpenVINOError) as e:
        message = " ".join(str(e).split())
        print(f"sam2flow: error: {message}", file=sys.stderr)
        return 1
