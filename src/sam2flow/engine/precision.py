"""Which device and which image-encoder precision to run on.

``dtype="auto"`` picks bfloat16 where the hardware computes it natively (CPUs with AVX512-BF16 or
AMX, GPUs that support it), float16 on other CUDA GPUs, and float32 elsewhere: bfloat16 emulated
on a CPU without those instructions is about 100× slower than float32 (a CPU whose oneDNN is capped below
bf16 with ``ONEDNN_MAX_CPU_ISA``, to stand in for an older one, counts as without). The prompt decoder runs in
bfloat16 with a bfloat16 encoder and in float32 otherwise (``decoder_dtype``); the tests hold bf16
masks to IoU >= 0.97 against float32 on the fixture model.
"""

from __future__ import annotations

import logging

import torch

from .cpu import cpu_bf16, cpu_flags, cpu_int8_dot
from .options import QUANTIZE_CHOICES

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → cuda, then mps, then cpu."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """True where bfloat16 matmuls run in hardware on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # the CPU has it, and oneDNN is not capped below it (a stand-in for an older CPU)
        return cpu_bf16(cpu_flags())
    return False


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"``, a name (``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``) or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}: use auto, float32, bfloat16 or float16")
        resolved = dtype
    elif dtype == "auto":
        if native_bf16(device):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise ValueError(f"unknown dtype {dtype!r}: expected auto or one of {', '.join(DTYPES)}")
    if resolved == torch.bfloat16 and device.type == "cpu" and not native_bf16(device):
        log.warning(
            "bfloat16 on a CPU without AVX512-BF16/AMX is emulated and much slower than float32; "
            "use dtype='auto' or 'float32'"
        )
    return resolved


def decoder_dtype(dtype: torch.dtype) -> torch.dtype:
    """The fused mask decoder's precision for an engine whose encoder runs in ``dtype``.

    bfloat16 follows a bfloat16 encoder, which ``auto`` picks only where the hardware has it: a click's
    decode takes ~27 ms instead of ~45 ms on a 2-core AVX512-BF16 CPU, and masks stay within the
    bf16 guard (tests/test_precision.py). The prompt encoder stays float32 (point coordinates go
    through sine features that bfloat16's 8 bits of mantissa would blur). float32 otherwise: float16
    is not tried for the decoder.
    """
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def resolve_quantize(
    quantize: str,
    requested_dtype: str | torch.dtype,
    dtype: torch.dtype,
    backend: str,
    calibrated: bool,
    interactive: bool = False,
) -> str:
    """``"none"``, ``"int8-weights"`` or ``"int8"`` for the image encoder (``engine/openvino_encoder.py``).

    ``"auto"`` is ``"int8-weights"`` where ``dtype="auto"`` resolved to float32 on OpenVINO (a CPU
    without native bf16) and the CPU has int8 dot products (``cpu.cpu_int8_dot``: ~1.25-1.4x faster,
    masks within the bf16 guard, no data needed) for batch work, else ``"none"``: an explicit
    ``float32`` keeps the reference's arithmetic, int8 weights gain nothing on top of bf16 nor without
    VNNI, and an ``interactive`` engine (a server) starts without quantising its pieces. ``"int8"``
    (activations too) needs calibration images (``calibrated``) and the whole graph.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantize {quantize!r}: expected one of {', '.join(QUANTIZE_CHOICES)}")
    if calibrated and quantize != "int8":
        raise ValueError(f"calibration images are for quantize='int8', not {quantize!r}")
    if quantize == "auto":
        auto_float = isinstance(requested_dtype, str) and requested_dtype == "auto" and dtype == torch.float32
        pays = backend == "openvino" and auto_float and not interactive and cpu_int8_dot(cpu_flags())
        return "int8-weights" if pays else "none"
    if quantize != "none" and backend != "openvino":
        raise ValueError(f"quantize={quantize!r} runs on OpenVINO, not on the {backend} backend: use a CPU engine")
    if quantize == "int8" and interactive:
        raise ValueError("quantize='int8' runs the encoder as one graph; an interactive engine needs pieces")
    if quantize == "int8" and not calibrated:
        raise ValueError(
            "quantize='int8' calibrates on images like the ones you will segment: pass calibration=[images] "
            "(8 or more; --calibration DIR on the command line), or use quantize='int8-weights', which needs none"
        )
    return quantize
