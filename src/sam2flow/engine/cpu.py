"""What the CPU computes natively: its feature flags, whether bfloat16 runs in hardware, whether int8
dot products do.

No torch here: ``GraphEngine`` picks its precision with these in a process without it, and
``precision`` builds on them for ``Sam2Engine``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo flags of bf16 arithmetic in hardware
INT8_DOT_CPU_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # int8 dot products: VNNI, AMX-INT8
# oneDNN's dispatcher cap (``ONEDNN_MAX_CPU_ISA``, read by torch's and OpenVINO's oneDNN; values from
# https://uxlfoundation.github.io/oneDNN/dev_guide_cpu_dispatcher_control.html): the levels that keep bf16
ISA_CAP_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
BF16_ISA_CAPS = frozenset(
    {
        "ALL",
        "AVX512_CORE_BF16",
        "AVX512_CORE_FP16",
        "AVX512_CORE_AMX",
        "AVX512_CORE_AMX_FP16",
        "AVX10_1_512",
        "AVX10_1_512_AMX",
        "AVX10_1_512_AMX_FP16",
        "AVX10_2_512",
        "AVX10_2_512_AMX_2",
    }
)
VEX_VNNI_ISA_CAPS = frozenset({"AVX2_VNNI", "AVX2_VNNI_2"})  # keep AVX-VNNI (``avx_vnni``), not AVX512-VNNI
VNNI_ISA_CAPS = BF16_ISA_CAPS | VEX_VNNI_ISA_CAPS | {"AVX512_CORE_VNNI"}  # the levels that keep int8 dot products


def isa_caps() -> list[str]:
    """oneDNN's dispatcher caps set in the environment (upper case; none: empty)."""
    return [os.environ[k].upper() for k in ISA_CAP_ENV if os.environ.get(k)]


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16(flags: frozenset[str]) -> bool:
    """True where a CPU with ``flags`` multiplies bfloat16 in hardware and oneDNN is not capped below it
    (``ONEDNN_MAX_CPU_ISA``: a stand-in for an older CPU counts as one)."""
    return bool(BF16_CPU_FLAGS & flags) and all(c in BF16_ISA_CAPS for c in isa_caps())


def cpu_int8_dot(flags: frozenset[str]) -> bool:
    """True where a CPU with ``flags`` has int8 dot products (VNNI or AMX-INT8) and oneDNN is not capped
    below them: what int8 weights need to pay off.

    OpenVINO's CPU plugin quantises a fully connected layer's input on the fly for int8 weights only
    with AVX2-VNNI or AVX512-VNNI (``useDynamicQuantizationImpl`` in its oneDNN fully-connected
    executor, openvinotoolkit/openvino ``src/plugins/intel_cpu``); without, it expands the weights to
    float and multiplies in float. hiera_tiny's encoder, float32, one 1024² image on 2 cores of a
    Xeon: int8 weights 1.15 s with dynamic quantisation, 1.43 s without, float weights 1.43 s; with
    oneDNN capped to AVX2, 2.09 s against float's 1.79.
    """
    if not INT8_DOT_CPU_FLAGS & flags:
        return False
    for cap in isa_caps():
        if cap in VEX_VNNI_ISA_CAPS and "avx_vnni" not in flags:
            return False
        if cap not in VNNI_ISA_CAPS:
            return False
    return True
