"""The torch image encoder on a CUDA GPU, replayed from CUDA graphs: one launch per forward.

The encoder's input always has the same shape for a given batch size (B, 3, 1024, 1024), so its
thousand-odd kernels can be captured once (``torch.cuda.CUDAGraph``) and replayed. Eager PyTorch
spends longer launching them than the GPU spends running them: measured on an H200, hiera_large in
bfloat16 took 65 ms an image at batch 1 of which ~13 ms was GPU time (the rest is Python and launch
overhead, which Meta's ``set_image`` pays too: 59 ms). A replay runs the same kernels on the same
inputs, so its output equals the eager one bit for bit.

A graph is captured per batch size on first use, after two eager warm-up runs on a side stream
(cuBLAS/cuDNN choose their kernels and workspaces there, and the encoder's memoised position
encodings get made). All graphs share one memory pool, which is safe here because they never run at
once (the engine holds one encoder lock), each replay's outputs are copied out before any other
replay, and the static inputs and memoised encodings live outside the pool (made before capture).
If a capture fails (an operation that cannot be captured, out of memory), the encoder logs one
line and stays eager from then on. ``$SAM2FLOW_CUDA_GRAPHS=0`` turns graphs off.
"""

from __future__ import annotations

import logging
import os

import torch

from .encoders import EncoderOutput, ImageSide, TorchEncoder

CUDA_GRAPHS_ENV = "SAM2FLOW_CUDA_GRAPHS"
WARMUP_RUNS = 2

log = logging.getLogger(__name__)


def cuda_graphs_wanted(device: torch.device) -> bool:
    """Graphs on a CUDA device unless ``$SAM2FLOW_CUDA_GRAPHS`` is ``0``/``false``/``no``/``off``."""
    off = os.environ.get(CUDA_GRAPHS_ENV, "").strip().lower() in ("0", "false", "no", "off")
    return device.type == "cuda" and not off


class _Captured:
    """One batch size's graph with its static input and outputs (overwritten by every replay)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, pixels: torch.Tensor, outputs: EncoderOutput):
        self.graph, self.pixels, self.outputs = graph, pixels, outputs


class CudaGraphEncoder(TorchEncoder):
    """``TorchEncoder`` on a CUDA device: eager once per new batch size (warm-up), then CUDA graph
    replays. Returns fresh tensors each call (copies of the graph's static outputs), so callers may
    keep them."""

    def __init__(self, side: ImageSide, dtype: torch.dtype):
        super().__init__(side, dtype)
        self._forward = self._run  # TorchEncoder.__call__ runs it in inference mode and counts images
        self.captures = 0  # graphs captured so far (one per batch size seen)
        self.failed: str | None = None  # why capturing failed; then every call runs eagerly
        self._graphs: dict[tuple[int, ...], _Captured] = {}
        self._pool = None  # one memory pool for all graphs (torch.cuda.graph_pool_handle)

    def _run(self, pixels: torch.Tensor) -> EncoderOutput:
        if self.failed is not None or pixels.device.type != "cuda":
            return self.side(pixels)
        captured = self._graphs.get(tuple(pixels.shape))
        if captured is None:
            try:
                captured = self._capture(pixels)
            except Exception as e:  # noqa: BLE001 - any failure: run eagerly from now on, say why once
                self.failed = f"{type(e).__name__}: {e}".splitlines()[0]
                self._graphs.clear()
                torch.cuda.synchronize(pixels.device)
                log.warning("CUDA graphs unavailable for the image encoder, running it eagerly: %s", self.failed)
                return self.side(pixels)
            self._graphs[tuple(pixels.shape)] = captured
        captured.pixels.copy_(pixels)
        captured.graph.replay()
        return tuple(t.clone() for t in captured.outputs)  # type: ignore[return-value]

    def _capture(self, pixels: torch.Tensor) -> _Captured:
        static = pixels.clone()
        stream = torch.cuda.Stream(pixels.device)
        stream.wait_stream(torch.cuda.current_stream(pixels.device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                self.side(static)
        torch.cuda.current_stream(pixels.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (a decode elsewhere) do not break this capture
        with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
            outputs = self.side(static)
        self.captures += 1
        return _Captured(graph, static, outputs)
