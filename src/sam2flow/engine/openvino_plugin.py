"""OpenVINO's CPU plugin as both engines compile for it: settings, caches, errors. No torch here.

``OpenVINOEncoder`` (``engine/openvino_encoder.py``, which converts our torch modules) and
``GraphEngine`` (``engine/graph_engine.py``, which runs exported graphs without torch) compile
with the same settings and share OpenVINO's compiled-model cache under ``$SAM2FLOW_CACHE_DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SAM2FLOW_CACHE_DIR"
HINTS = ("f32", "bf16", "f16")  # INFERENCE_PRECISION_HINT values we compile with
# int8 weights: OpenVINO's CPU plugin quantises each fully connected layer's activations on the fly
# (``DYNAMIC_QUANTIZATION_GROUP_SIZE``, 32 by default) and multiplies in int8. Measured (hiera_tiny,
# float32 hint, one 1024 image, 2-core Xeon with AMX): groups of 32 1.13-1.20 s, 128 1.02-1.05 s,
# 256 1.07-1.13 s, 1024 1.29-1.34 s, none 1.38 s; the float IR 1.37 s; relative L2 error of the image
# embedding against the float IR 1.6-1.7 % at 32-256.
DYNAMIC_QUANTIZATION_GROUP = 128


class OpenVINOError(RuntimeError):
    """A graph could not be converted, checked or compiled with OpenVINO."""


class QuantizeError(OpenVINOError):
    """The float encoder is fine, but its int8 version could not be made or failed its check."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (OpenVINO's span several, with blank ones between)."""
    return " ".join(str(error).split())


def cache_root() -> Path:
    """``$SAM2FLOW_CACHE_DIR`` or ``~/.cache/sam2flow``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "sam2flow"


def compile_config(hint: str, quantize: str = "none") -> dict:
    """The CPU plugin's settings for an IR run at ``hint`` precision with ``quantize`` weights
    (``"int8-weights"``: activations quantised on the fly, in groups of ``DYNAMIC_QUANTIZATION_GROUP``)."""
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    if quantize == "int8-weights":
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = DYNAMIC_QUANTIZATION_GROUP
    return config


def compiled_cache_dir(openvino_root: Path, config: dict) -> Path:
    """OpenVINO's compiled-model cache for ``config``: one folder per precision and quantisation group.

    OpenVINO 2026.4's cache key leaves the precision hint out on some CPUs (seen on a Xeon with AMX): a
    bf16 compile then loaded the f32 blob and returned NaN; the dynamic quantisation group may be left
    out too.
    """
    hint = config["INFERENCE_PRECISION_HINT"]
    dq = config.get("DYNAMIC_QUANTIZATION_GROUP_SIZE")
    return openvino_root / "compiled" / (f"{hint}-dq{dq}" if dq else hint)
