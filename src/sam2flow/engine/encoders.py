"""Image encoders: pixels in, what the decoder needs of an image out, on one backend or another.

The image side of SAM2 is everything that runs once per image: the Hiera trunk, the FPN neck, the
decoder's two projections of the high-resolution features (``conv_s0``/``conv_s1``) and the
no-memory embedding added to the image embedding. ``ImageSide`` is that computation as one torch
module; ``TorchEncoder`` runs it eagerly (or compiled) and ``OpenVINOEncoder``
(``engine/openvino_encoder.py``) runs the same module converted by OpenVINO. Both honour
``ImageEncoder``, which is all the engine knows of them.

Backends: ``"torch"``; ``"openvino"`` (CPU only); ``"auto"``: ``$SAM2FLOW_BACKEND`` if set, else
OpenVINO on a CPU and torch elsewhere, except for an ``interactive`` engine (one that answers clicks
while images embed: the server), which runs torch on a CPU too. Measured on 2 cores, hiera_tiny:
- OpenVINO as one graph embeds faster than torch (one benchmark run, native-bf16 CPU: bf16 1.1-1.3
  vs 1.9-2.1 s an image, float32 2.3-2.4 vs 3.4-3.5 s), which is what batch work (the step,
  ``batch``, Ray) wants.
- Clicks wait behind a whole graph (~1 s), and still longer behind OpenVINO's per-block pieces than
  at the torch encoder's finer pause points (mixed-load p99 206 vs 130-145 ms, bf16); the pieces
  also hold ~0.75 GB more memory. So a server keeps torch unless told otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .options import BACKEND_ENV, BACKENDS

EncoderOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``image_embed`` (B, 256, 64, 64), ``s0`` (B, 32, 256, 256), ``s1`` (B, 64, 128, 128): float32."""


@runtime_checkable
class ImageEncoder(Protocol):
    """Pixels (B, 3, S, S), normalised, in the encoder's input frame → ``EncoderOutput`` (float32).

    ``backend`` names what runs it (``"torch"``, ``"openvino"``); ``precision`` the arithmetic
    (``"float32"``, ``"bfloat16"``, ...); ``input_dtype`` the pixels' dtype; ``runs`` counts the
    images encoded so far (what tests and metrics read to know the encoder ran, whatever the backend).
    """

    backend: str
    precision: str
    input_dtype: torch.dtype
    runs: int

    def __call__(self, pixels: torch.Tensor) -> EncoderOutput: ...


def resolve_backend(backend: str, device: torch.device, interactive: bool = False) -> str:
    """``"torch"`` or ``"openvino"`` for ``backend`` on ``device`` (``ValueError`` for unknown names);
    ``interactive``: the engine answers clicks while images embed (see the module's docstring)."""
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={backend!r} is not a backend: expected one of {', '.join(BACKENDS)}")
        if backend == "auto":
            return "openvino" if device.type == "cpu" and not interactive else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "openvino" and device.type != "cpu":
        raise ValueError(f"the openvino backend runs on the CPU, not on {device}: use backend='torch' there")
    return backend


class ImageSide(nn.Module):
    """The once-per-image part of a ``Sam2Model``: (B, 3, S, S) pixels → ``EncoderOutput``.

    The trunk and neck run in the vision encoder's dtype; the projections and the no-memory
    embedding in float32 (as the reference does after its encoder).
    """

    def __init__(self, model):
        super().__init__()
        self.encoder = model.vision_encoder
        self.conv_s0 = model.mask_decoder.conv_s0
        self.conv_s1 = model.mask_decoder.conv_s1
        self.no_memory = model.no_memory_embedding

    def forward(self, pixels: torch.Tensor) -> EncoderOutput:
        return self.head(self.encoder(pixels).fpn_hidden_states)

    def head(self, fpn: tuple[torch.Tensor, ...]) -> EncoderOutput:
        """FPN levels (high → low resolution) → ``EncoderOutput``."""
        embed = fpn[2].float() + self.no_memory.view(1, -1, 1, 1).float()
        return embed, self.conv_s0(fpn[0].float()), self.conv_s1(fpn[1].float())


class TorchEncoder:
    """``ImageSide`` in PyTorch, eager or ``torch.compile``d (``compiled=True``)."""

    backend = "torch"

    def __init__(self, side: ImageSide, dtype: torch.dtype, compiled: bool = False):
        self.side = side
        self.precision = str(dtype).removeprefix("torch.")
        self.input_dtype = dtype
        self.runs = 0
        self._forward: Callable[[torch.Tensor], EncoderOutput] = side
        if compiled:
            self._forward = torch.compile(side, dynamic=False)

    def __call__(self, pixels: torch.Tensor) -> EncoderOutput:
        with torch.inference_mode():
            out = self._forward(pixels)
        self.runs += pixels.shape[0]
        return out
