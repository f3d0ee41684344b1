"""One side of the memory case, alone in its process: load, run the step once, print peak RSS.

``python -m benchmarks.memory_worker --impl ours|graphs|reference --inputs NPZ [--version V
--family F --checkpoint PT | --graphs DIR] [--dtype D] --device D --threads T`` prints one JSON line.
Each side imports only what it needs, as a user's process would: ``ours`` sam2flow's step and
``Sam2Engine`` (torch, transformers, OpenVINO); ``graphs`` sam2flow's step and ``GraphEngine``
(OpenVINO and numpy, no torch: checked); ``reference`` torch and Meta's ``sam2``. The step's images
and boxes come from ``--inputs`` (written by ``cases.write_step_inputs``), so no side imports the
benchmark's own torch code.
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


def read_inputs(path: str):
    """The step's images and detections from ``cases.write_step_inputs``'s file."""
    import numpy as np
    import supervision as sv

    z = np.load(path, allow_pickle=False)
    n = int(z["count"])
    images = [z[f"image{i}"] for i in range(n)]
    dets = [
        sv.Detections(
            xyxy=z[f"xyxy{i}"],
            confidence=z[f"confidence{i}"],
            class_id=z[f"class_id{i}"],
            data={
                "class_name": z[f"class_name{i}"].astype(object),
                "detection_id": z[f"detection_id{i}"].astype(object),
            },
        )
        for i in range(n)
    ]
    return images, dets


def _step(engine, images, dets, version: str):
    from sam2flow.workflows.step import StepParameters, segment_images

    ids = [f"image-{i}" for i in range(len(images))]
    return segment_images(engine, images, ids, dets, StepParameters(version=version), None)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=("ours", "graphs", "reference"), required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--version", default="hiera_tiny")
    p.add_argument("--family", default="sam2.1")
    p.add_argument("--checkpoint")
    p.add_argument("--graphs")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)

    import numpy  # noqa: F401
    import supervision  # noqa: F401

    if a.impl == "graphs":
        from sam2flow import EmbeddingCache, GraphEngine
    elif a.impl == "ours":
        import torch

        from sam2flow import EmbeddingCache, Sam2Engine
    else:
        import sam2.build_sam  # noqa: F401
        import sam2.sam2_image_predictor  # noqa: F401
        import torch
    if a.impl != "graphs" and a.threads > 0:
        torch.set_num_threads(a.threads)
    images, dets = read_inputs(a.inputs)
    baseline = peak_rss_mib()
    if a.impl == "graphs":
        engine = GraphEngine(a.graphs, dtype=a.dtype, cache=EmbeddingCache(max_entries=0))
        after_load = peak_rss_mib()
        result = _step(engine, images, dets, engine.version)
        detail = {"dtype": engine.dtype, "quantize": engine.quantize, "torch_imported": "torch" in sys.modules}
    elif a.impl == "ours":
        engine = Sam2Engine.from_pretrained(
            a.version, a.family, checkpoint=a.checkpoint, device=a.device, dtype=a.dtype,
            cache=EmbeddingCache(max_entries=0),
        )  # fmt: skip
        after_load = peak_rss_mib()
        result = _step(engine, images, dets, a.version)
        detail = {"dtype": str(engine.dtype).removeprefix("torch."), "backend": engine.backend}
    else:
        from . import cases, data

        _, predictor = data.load_reference(data.Checkpoint(a.version, a.family, Path(a.checkpoint), ""), a.device)
        after_load = peak_rss_mib()
        with torch.inference_mode():
            result = cases.reference_step(predictor, images, dets)
        detail = {"dtype": "float32"}
    out = {
        "impl": a.impl,
        "images": len(images),
        "detections": sum(len(d) for d in result),
        "baseline_rss_mib": baseline,
        "after_load_rss_mib": after_load,
        "peak_rss_mib": peak_rss_mib(),
        "ru_maxrss_mib": (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
        ),
        **detail,
    }
    if a.device.startswith("cuda") and a.impl != "graphs":
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


if __name__ == "__main__":
    main()
