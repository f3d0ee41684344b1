"""What a CPU user would run instead of PyTorch: Meta's image encoder exported to ONNX, on ONNX Runtime
and on OpenVINO, each in its fastest documented CPU mode.

The exported graph is the work ``SAM2ImagePredictor.set_image`` does after its transforms: trunk,
neck and the decoder's two high-resolution projections (``SAM2Base.forward_image``). Timed calls
include the predictor's own transforms (resize, normalise), as ours include our preprocessing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from sam2flow.engine.precision import native_bf16


class _MetaImageSide(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        fpn = self.model.forward_image(x)["backbone_fpn"]
        return fpn[0], fpn[1], fpn[2]


class MetaExported:
    """Meta's encoder as ONNX (opset 18, the TorchScript exporter as Meta's own export notebooks use),
    run by ONNX Runtime (all graph optimisations, its default thread pool) and by OpenVINO
    (``PERFORMANCE_HINT=LATENCY``; f32, plus bf16 where the CPU has it natively)."""

    def __init__(self, ref_model, predictor, log=print):
        import onnxruntime as ort
        import openvino as ov

        self._dir = tempfile.TemporaryDirectory(prefix="sam2flow-meta-onnx-")
        path = Path(self._dir.name) / "encoder.onnx"
        size = int(ref_model.image_size)
        log("exporting Meta's image encoder to ONNX (torch.onnx.export, opset 18)")
        with torch.inference_mode():
            torch.onnx.export(
                _MetaImageSide(ref_model).eval(),
                torch.zeros(1, 3, size, size),
                str(path),
                opset_version=18,
                dynamo=False,
                input_names=["pixels"],
            )
        self.predictor = predictor
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.ort = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        core = ov.Core()
        precisions = ["f32"] + (["bf16"] if native_bf16(torch.device("cpu")) else [])
        self.ov = {
            p: core.compile_model(str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": p})
            for p in precisions
        }
        self._requests = {k: c.create_infer_request() for k, c in self.ov.items()}

    def _pixels(self, image: np.ndarray) -> np.ndarray:
        return self.predictor._transforms(image)[None].numpy()

    def run_ort(self, images: list[np.ndarray]) -> list:
        return [self.ort.run(None, {"pixels": self._pixels(im)}) for im in images]

    def run_ov(self, images: list[np.ndarray], precision: str = "f32") -> list:
        req = self._requests[precision]
        return [req.infer(self._pixels(im)) for im in images]
