"""Machine facts for the record, and the machine's measured matmul rate."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch

from sam2flow.engine import cpu, precision

MATMUL_N = 2048


def _cpuinfo() -> list[dict[str, str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    blocks = []
    for block in text.strip().split("\n\n"):
        entry = {}
        for line in block.splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                entry[k.strip()] = v.strip()
        blocks.append(entry)
    return blocks


def physical_cores() -> int | None:
    """Distinct (package, core) pairs among the CPUs this process may run on."""
    info = _cpuinfo()
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cores = set()
    for entry in info:
        if allowed is not None and "processor" in entry and int(entry["processor"]) not in allowed:
            continue
        if "core id" in entry:
            cores.add((entry.get("physical id", "0"), entry["core id"]))
    return len(cores) or None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + (" (modified)" if dirty.stdout.strip() else "")


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


ISA_CAP_ENV = (*cpu.ISA_CAP_ENV, "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "OV_CPU_MAX_ISA")


# glibc's malloc settings and preloads that change how fast big tensors are allocated (glibc gives blocks
# over 32 MB fresh pages each time unless its thresholds are raised; PyTorch's CPU tuning guide suggests
# jemalloc or tcmalloc instead): a run under them is reported as such, both sides share the process.
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def facts(devices: list[str]) -> dict:
    """CPU, cores, threads, library versions, GPUs: everything a reader needs to weigh the numbers."""
    info = _cpuinfo()
    flags = cpu.cpu_flags()
    out = {
        "cpu_model": (info[0].get("model name") if info else None) or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "physical_cores": physical_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "cpu_bf16_flags": sorted(flags & (cpu.BF16_CPU_FLAGS | {"amx_tile", "avx512f", "avx2", "avx512_fp16"})),
        # int8 dot products in hardware (what the int8 rows use): AVX512-VNNI, AVX-VNNI, AMX-INT8
        "cpu_int8_flags": sorted(flags & cpu.INT8_DOT_CPU_FLAGS),
        "native_bf16": precision.native_bf16(torch.device("cpu")),
        # instruction-set caps a run may set to stand in for an older CPU (oneDNN in torch and in OpenVINO's
        # CPU plugin, MKL, torch's own kernels), and the level torch's kernels dispatch to
        "isa_caps": {k: os.environ[k] for k in ISA_CAP_ENV if k in os.environ},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # the C allocator both sides run under: glibc's thresholds or a preloaded allocator, when set
        "allocator_env": {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ},
        "memory_gib": memory_gib(),
        "load_average_at_start": load_average(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: _version(name)
            for name in (
                "torch",
                "transformers",
                "sam2",
                "sam2flow",
                "supervision",
                "numpy",
                "opencv-python",
                "openvino",
                "nncf",
                "onnxruntime",
                "matplotlib",
            )
        },
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(),
        "git_revision": _git_revision(),
        "devices": devices,
    }
    if torch.cuda.is_available():
        out["cuda"] = {
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "cuda_version": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "bf16_supported": precision.native_bf16(torch.device("cuda")),
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        }
    return out


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int = MATMUL_N, repeats: int = 5) -> float:
    """Median rate of an ``n × n`` by ``n × n`` matmul (2 n³ floating-point operations)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(2):
            a @ b
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            sync()
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9
