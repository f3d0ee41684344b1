"""One side of the memory case, alone in its process: load, run the step once, print peak RSS.

``python -m benchmarks.memory_worker --impl ours|reference --version V --family F --checkpoint PT
--device D --images N --threads T`` prints one JSON line. Both sides import the same libraries
first (torch, transformers, sam2, sam2flow, supervision), so their baselines are equal and the
difference is the work itself.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (VmHWM; ru_maxrss elsewhere)."""
    hwm = _status_mib("VmHWM")
    if hwm is not None:
        return hwm
    raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return raw / 2**20 if sys.platform == "darwin" else raw / 1024


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=("ours", "reference"), required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--family", default="sam2.1")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)

    import numpy  # noqa: F401
    import sam2.build_sam  # noqa: F401
    import sam2.sam2_image_predictor  # noqa: F401
    import supervision  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import sam2flow.workflows.step  # noqa: F401

    from . import cases, data

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    images, dets = data.step_inputs(a.images)
    baseline = peak_rss_mib()
    ckpt = data.Checkpoint(a.version, a.family, Path(a.checkpoint), "")
    if a.impl == "ours":
        engine = data.load_ours(ckpt, a.device)
        after_load = peak_rss_mib()
        result = cases.run_step_ours(engine, images, dets, a.version)
    else:
        _, predictor = data.load_reference(ckpt, a.device)
        after_load = peak_rss_mib()
        with torch.inference_mode():
            result = cases.reference_step(predictor, images, dets)
    out = {
        "impl": a.impl,
        "images": a.images,
        "detections": sum(len(d) for d in result),
        "baseline_rss_mib": baseline,
        "after_load_rss_mib": after_load,
        "peak_rss_mib": peak_rss_mib(),
        "ru_maxrss_mib": (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
        ),
    }
    if a.device.startswith("cuda"):
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


if __name__ == "__main__":
    main()
