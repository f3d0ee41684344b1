"""What the commands share: the one-line-error parser, model and mask clean-up flags, step parameters."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..engine.options import BACKENDS, DTYPE_CHOICES, QUANTIZE_CHOICES
from ..models.registry import DEFAULT_FAMILY, DEFAULT_VERSION, FAMILIES, VERSIONS


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (``--help`` still shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"sam2flow: error: {message}\n")


def floats(text: str, n: tuple[int, ...], what: str) -> list[float]:
    """``"1,2,3"`` → ``[1.0, 2.0, 3.0]`` with one of ``n`` values, or an argparse error naming ``what``."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} {text!r} is not comma-separated numbers") from None
    if len(values) not in n:
        raise argparse.ArgumentTypeError(f"{what} {text!r} needs {' or '.join(map(str, n))} numbers")
    return values


def _area(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", choices=VERSIONS, default=DEFAULT_VERSION)
    p.add_argument("--family", choices=FAMILIES, default=DEFAULT_FAMILY)
    p.add_argument("--checkpoint", help="an original .pt, a Hugging Face directory or repository id")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="image encoder precision; auto (default): bfloat16 where the hardware has it, "
        "float32 gives the reference's masks",
    )
    add_backend_arg(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoder (slow start)")
    add_quantize_args(p)


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantize",
        default="auto",
        choices=QUANTIZE_CHOICES,
        help="OpenVINO encoder: int8-weights (no data needed; auto picks it on CPUs with VNNI but without bf16), "
        "int8 (activations too: needs --calibration), none",
    )
    p.add_argument(
        "--calibration",
        metavar="DIR",
        help="images like yours to calibrate --quantize int8 on (a folder or a glob; 8 or more), once per weights",
    )


def calibration_images(source: str | None) -> list | None:
    """``--calibration``'s images as RGB arrays (``ValueError`` naming what is wrong)."""
    if source is None:
        return None
    from ..images import read_image_file
    from ..scale.batch import list_images

    try:
        files = list_images(source)
    except ValueError as e:
        raise ValueError(f"--calibration: {e}") from None
    return [read_image_file(p, f"--calibration image {p}") for p in files]


def engine_args(args, **extra) -> dict:
    """``Sam2Engine.from_pretrained`` keywords from ``add_model_args``' flags, plus ``extra``."""
    keys = ("version", "family", "checkpoint", "device", "dtype", "compile", "backend", "quantize")
    found = {k: getattr(args, k) for k in keys}
    return {**found, "calibration": calibration_images(args.calibration), **extra}


def add_backend_arg(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    p.add_argument(
        "--backend",
        default=default,
        choices=BACKENDS,
        help="image encoder runtime; auto (default): $SAM2FLOW_BACKEND, else openvino on a CPU "
        "(torch for serve) and torch on a GPU; openvino: CPUs only",
    )


def add_graphs_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--graphs",
        type=Path,
        metavar="DIR",
        help="run on exported OpenVINO graphs (sam2flow export-graphs) without torch: the export's version "
        "and weights; --dtype auto, float32 or bfloat16; --quantize auto, none or int8-weights",
    )


def graph_engine(args):
    """``GraphEngine`` on ``--graphs`` with ``--dtype`` and ``--quantize``."""
    from ..engine.graph_engine import GraphEngine

    return GraphEngine(args.graphs, dtype=args.dtype, quantize=args.quantize)


def add_ray_args(p: argparse.ArgumentParser, what: str = "model") -> None:
    """``--ray`` and how the job spreads over the cluster: the actors of ``batch --ray`` and ``embed --ray``."""
    p.add_argument(
        "--ray-address",
        help="with --ray: the cluster to join ('auto': this machine's; default $RAY_ADDRESS, else a new local cluster)",
    )
    p.add_argument(
        "--ray-actors", type=int, help=f"with --ray: {what} actors (default one per GPU, else per CPU less one)"
    )
    p.add_argument(
        "--ray-gpus-per-actor", type=float, help="with --ray: GPU share per actor (default 1 on GPU clusters)"
    )
    p.add_argument("--ray-cpus-per-actor", type=float, default=1.0, help="with --ray: CPUs per actor (default 1)")


def add_store_args(p: argparse.ArgumentParser, env: bool = False) -> None:
    """``--store DIR`` (read embeddings from a ``sam2flow embed`` store) and ``--store-write``."""
    p.add_argument(
        "--store",
        metavar="DIR",
        help="embedding store made by 'sam2flow embed': stored images never run the encoder"
        + (" (SAM2FLOW_STORE)" if env else ""),
    )
    p.add_argument(
        "--store-write",
        action="store_true",
        default=None,
        help="with --store: also keep new embeddings there (default: read-only)"
        + (" (SAM2FLOW_STORE_WRITE)" if env else ""),
    )


def open_store(path: str | None, write: bool | None):
    """The ``EmbeddingStore`` of ``--store``/``--store-write``, or ``None``."""
    if path is None:
        if write:
            raise ValueError("--store-write needs --store DIR")
        return None
    from ..engine.store import EmbeddingStore

    return EmbeddingStore(path, writable=bool(write))


def add_cleanup_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-hole-area",
        type=_area,
        default=0,
        metavar="PIXELS",
        help="fill holes of at most this many low-resolution (256x256) pixels; 0 = off (default)",
    )
    p.add_argument(
        "--max-sprinkle-area",
        type=_area,
        default=0,
        metavar="PIXELS",
        help="erase specks of at most this many low-resolution (256x256) pixels; 0 = off (default)",
    )


def step_parameters(args):
    """The workflow step's parameters from ``--version``, ``--threshold``, ``--single-mask`` and the clean-up flags."""
    from ..workflows.step import StepParameters

    return StepParameters(
        args.version,
        args.threshold,
        not args.single_mask,
        max_hole_area=args.max_hole_area,
        max_sprinkle_area=args.max_sprinkle_area,
    )


def for_remote_workers(checkpoint: str | None) -> str | None:
    """A local checkpoint path made absolute: Ray actors and replicas do not share our working directory."""
    if checkpoint and Path(checkpoint).exists():
        return str(Path(checkpoint).resolve())
    return checkpoint
