"""What the CPU computes natively: its feature flags and whether bfloat16 runs in hardware.

No torch here: ``GraphEngine`` picks its precision with these in a process without it, and
``precision`` builds on them for ``Sam2Engine``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo flags of bf16 arithmetic in hardware
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
    caps = [os.environ[k].upper() for k in ISA_CAP_ENV if os.environ.get(k)]
    return bool(BF16_CPU_FLAGS & flags) and all(c in BF16_ISA_CAPS for c in caps)
