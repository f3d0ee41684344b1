"""The image side on OpenVINO: our own torch module, converted by ``openvino.convert_model``.

No ONNX file is involved: the ``ImageSide`` module (``engine/encoders.py``) is converted either as
one graph (the default: fastest, and one memory arena), or, for an engine that answers clicks while
images embed (``interactive``), in pieces (the patch embedding with the first blocks, then one
Hiera block at a time, then the neck and projections), each compiled for the CPU. Pieces keep the
engine's click priority: between two pieces the encoder waits while a decode runs
(``DecodeFirst``), as the torch encoder does between trunk blocks. Outputs of one piece feed the
next without a copy. They cost speed and memory (hiera_tiny, bf16, 2 cores: ~10 % slower, and
~2.2 vs ~1.45 GB resident after a few images: each piece keeps its own buffers).

Conversion takes about half a minute for hiera_tiny (minutes for hiera_large), once: the IR is
kept on disk under ``$SAM2FLOW_CACHE_DIR/openvino`` (default ``~/.cache/sam2flow/openvino``),
keyed by the weights' fingerprint, the input size, the piece layout and the OpenVINO version, and
OpenVINO's own compiled-model cache sits beside it, so a later start loads in about a second.
A new conversion is checked against the torch module in float32 (every output within 1e-3 of
the reference's scale) before it is kept; a failed check raises ``OpenVINOError``.

Precision: ``INFERENCE_PRECISION_HINT`` = ``bf16`` where the engine's dtype is bfloat16 (chosen
only where the CPU has it natively), ``f16`` for float16, else ``f32``.

Quantisation (``quantize``, with NNCF, OpenVINO's own compression tools), made once from the float
IR and kept beside it:
- ``"int8-weights"``: int8 weights (per output channel, asymmetric), each fully connected layer's
  activations quantised on the fly in groups of ``DYNAMIC_QUANTIZATION_GROUP`` (the CPU plugin's
  dynamic quantisation), the rest in the precision above. Needs no data; compressing takes seconds,
  the check's two compilations ~20 s (hiera_tiny, 2 cores). Then 1.02-1.05 vs 1.37 s an image in
  float32 on a Xeon with AMX (1.57 vs 2.17 s on an AMD EPYC before the group size was chosen); with
  bf16 no faster than bf16 alone.
- ``"int8"``: int8 weights and activations (post-training quantisation, ``model_type=TRANSFORMER``),
  calibrated on the caller's images: about a minute for 4 images. 1.10 s an image with the f32
  hint, 0.84 s with bf16 (2.0x and 1.4x the float graph).
Either is checked against the float IR on one image (relative L2 error of the image embedding,
logged) and refused above ``QUANT_TOLERANCE``; for ``"int8"`` that image is the last calibration
image, left out of the calibration when there are two or more.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .encoders import EncoderOutput, ImageSide
from .fast import forget_position_encodings
from .openvino_plugin import (
    OpenVINOError,
    QuantizeError,
    cache_root,
    compile_config,
    compiled_cache_dir,
    one_line,
)

CONVERSION_VERSION = 2  # bump when the pieces or their conversion change: old IR is then ignored
BLOCKS_PER_PIECE = 1  # Hiera blocks per compiled piece: the encoder can pause after every block
QUANTIZE_MODES = ("none", "int8-weights", "int8")
# The most a quantised IR's image embedding may differ from the float IR's (relative L2 on one image).
# Measured on the fixture model: int8 weights ~1e-2, int8 with 4 calibration images 0.06-0.14.
QUANT_TOLERANCE = {"int8-weights": 0.05, "int8": 0.25}
_PRECISION_HINT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


log = logging.getLogger(__name__)


# ---- the pieces, as torch modules --------------------------------------------------------------


class _Stem(nn.Module):
    """Pixels (1, 3, S, S) → patch embedding + positional embedding → the first blocks → (1, H, W, C)."""

    def __init__(self, backbone, blocks):
        super().__init__()
        self.backbone = backbone  # patch_embed and the positional embeddings (blocks are not traced)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, pixels):
        x = self.backbone.patch_embed(pixels)
        x = x + self.backbone._get_pos_embed(x.shape[1:3])
        for block in self.blocks:
            x = block(x)
        return x


class _Blocks(nn.Module):
    """(1, H, W, C) → a run of Hiera blocks → (1, H', W', C')."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class _Head(nn.Module):
    """The four stage outputs (fine → coarse, channels last) → FPN neck → ``ImageSide.head``."""

    def __init__(self, side: ImageSide):
        super().__init__()
        self.side = side
        self.levels = side.encoder.num_feature_levels

    def forward(self, s1, s2, s3, s4):
        fpn, _ = self.side.encoder.neck((s1, s2, s3, s4))  # coarse → fine
        return self.side.head(fpn[-self.levels :][::-1])


@dataclass(frozen=True)
class Layout:
    """How the trunk is cut: ``pieces`` are block ranges [start, stop); ``stage_ends`` the blocks whose
    output the neck takes."""

    pieces: tuple[tuple[int, int], ...]  # empty: the whole ``ImageSide`` as one graph
    stage_ends: tuple[int, ...]

    @classmethod
    def whole(cls, backbone) -> Layout:
        return cls((), tuple(int(e) for e in backbone.stage_ends))

    @classmethod
    def of(cls, backbone, blocks_per_piece: int = BLOCKS_PER_PIECE) -> Layout:
        ends = tuple(int(e) for e in backbone.stage_ends)
        pieces, start = [], 0
        for stop in range(1, len(backbone.blocks) + 1):
            if stop - start == blocks_per_piece or stop - 1 in ends:
                pieces.append((start, stop))
                start = stop
        return cls(tuple(pieces), ends)


def _modules(side: ImageSide, layout: Layout) -> list[nn.Module]:
    if not layout.pieces:
        return [side]
    backbone = side.encoder.backbone
    blocks = list(backbone.blocks)
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(layout.pieces):
        mods.append(_Stem(backbone, blocks[a:b]) if i == 0 else _Blocks(blocks[a:b]))
    mods.append(_Head(side))
    return mods


# ---- conversion, disk cache, check ---------------------------------------------------------------


def _cache_key(fingerprint: str, input_size: int, layout: Layout, quantized: str = "") -> str:
    """The IR's folder name; ``quantized`` names a quantisation (and its calibration), "" the float IR."""
    import openvino as ov

    h = hashlib.blake2b(digest_size=12)
    h.update(f"{fingerprint}|{input_size}|{layout}|{ov.get_version()}|{CONVERSION_VERSION}".encode())
    if quantized:
        h.update(f"|{quantized}".encode())
    return h.hexdigest()


def _complete(directory: Path, layout: Layout) -> bool:
    return (directory / f"piece{len(layout.pieces)}.xml").is_file()


def _check_pixels(input_size: int) -> np.ndarray:
    """Seeded normal pixels (1, 3, S, S) float32: what conversions are checked on."""
    return torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(0)).numpy()


def _run_torch(mods: list[nn.Module], layout: Layout, pixels: torch.Tensor) -> tuple[list, EncoderOutput]:
    """Every piece's inputs (for conversion) and the final output, in torch float32."""
    inputs, stages, x = [], [], pixels
    with torch.inference_mode():
        if not layout.pieces:
            return [(pixels,)], mods[0](pixels)
        for (_, stop), mod in zip(layout.pieces, mods):
            inputs.append((x,))
            x = mod(x)
            if stop - 1 in layout.stage_ends:
                stages.append(x)
        inputs.append(tuple(stages))
        out = mods[-1](*stages)
    return inputs, out


def _convert(side: ImageSide, layout: Layout, input_size: int, directory: Path) -> None:
    """Convert every piece to IR in ``directory`` (written in a temporary folder, then renamed)."""
    import openvino as ov

    mods = _modules(side, layout)
    pixels = torch.from_numpy(_check_pixels(input_size))
    inputs, reference = _run_torch(mods, layout, pixels)
    models = []
    for i, (mod, example) in enumerate(zip(mods, inputs)):
        try:
            with torch.no_grad():
                # Static input shapes: traced shapes are otherwise dynamic, and the CPU plugin then keeps
                # the shape arithmetic and larger buffers (hiera_tiny, one graph: +1,077 vs +590 MiB
                # after the first inference in float32, +654 vs +395 MiB in bf16; ~3 % faster in f32).
                shapes = [ov.PartialShape(list(t.shape)) for t in example]
                models.append(ov.convert_model(mod, example_input=example, input=shapes))
        except Exception as e:  # the converter's own errors are of many types
            raise OpenVINOError(f"OpenVINO could not convert piece {i} of the image encoder: {one_line(e)}") from e
    check = [ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}) for m in models]
    got = _infer_chain(check, layout)(pixels.numpy())
    for name, want, have in zip(("image_embed", "s0", "s1"), reference, got):
        err = float(np.abs(want.numpy() - have).max())
        scale = max(1.0, float(want.abs().max()))
        if not err <= 1e-3 * scale:
            raise OpenVINOError(f"OpenVINO's float32 {name} differs from torch's by {err:.3g} (scale {scale:.3g})")
    _save(models, directory)


def _save(models: list, directory: Path) -> None:
    """Write the pieces' IR into ``directory`` (in a temporary folder, then renamed)."""
    import openvino as ov

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    try:
        for i, m in enumerate(models):
            ov.save_model(m, str(tmp / f"piece{i}.xml"), compress_to_fp16=False)
        try:
            os.replace(tmp, directory)  # atomic: a reader sees all pieces or none
        except OSError:
            if not (directory / f"piece{len(models) - 1}.xml").is_file():  # not another process's copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _quantize(
    source: Path, directory: Path, layout: Layout, mode: str, calibration: list[np.ndarray], check: np.ndarray
) -> float:
    """Quantise the float IR in ``source`` into ``directory``; returns the check's relative error.

    ``calibration``: pixels (1, 3, S, S) float32 for ``"int8"``; ``check``: the pixels both IRs run on.
    """
    import openvino as ov

    try:
        import nncf
    except ImportError as e:
        raise QuantizeError("quantising the encoder needs NNCF (pip install nncf)") from e
    core = ov.Core()
    floats = [core.read_model(str(source / f"piece{i}.xml")) for i in range(len(layout.pieces) + 1)]
    # run the float IR first: NNCF compresses weights in place, on the very model objects it is given
    f32 = compile_config("f32", "none")
    want = _infer_chain([core.compile_model(m, "CPU", f32) for m in floats], layout)(check)[0]
    nncf.set_log_level(logging.ERROR)
    quantized = []
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: never into a command's output
        for i, m in enumerate(floats):
            try:
                if mode == "int8-weights":
                    quantized.append(nncf.compress_weights(m, mode=nncf.CompressWeightsMode.INT8_ASYM))
                else:
                    data = nncf.Dataset(calibration)
                    q = nncf.quantize(m, data, subset_size=len(calibration), model_type=nncf.ModelType.TRANSFORMER)
                    quantized.append(q)
            except Exception as e:  # NNCF's own errors are of many types
                raise QuantizeError(
                    f"NNCF could not quantise piece {i} of the image encoder ({mode}): {one_line(e)}"
                ) from e
    config = compile_config("f32", mode)  # as it will run, in float32 where it is not int8
    try:
        have = _infer_chain([core.compile_model(m, "CPU", config) for m in quantized], layout)(check)[0]
    except Exception as e:  # the plugin's errors are plain RuntimeErrors
        raise QuantizeError(f"OpenVINO could not compile the {mode} image encoder: {one_line(e)}") from e
    err = float(np.linalg.norm(have - want) / max(np.linalg.norm(want), 1e-12))
    if not err <= QUANT_TOLERANCE[mode]:
        raise QuantizeError(
            f"the {mode} encoder's image embedding differs from float32's by {err:.1%} (relative L2), "
            f"over the {QUANT_TOLERANCE[mode]:.0%} allowed: not kept"
        )
    _save(quantized, directory)
    return err


def _infer_chain(compiled: list, layout: Layout) -> Callable[[np.ndarray], tuple[np.ndarray, ...]]:
    """A function running the compiled pieces in order on one image (1, 3, S, S) float32."""
    requests = [c.create_infer_request() for c in compiled]
    if not layout.pieces:

        def run_whole(pixels: np.ndarray, pause: Callable[[], None] = lambda: None) -> tuple[np.ndarray, ...]:
            pause()
            requests[0].infer(pixels, share_inputs=True, share_outputs=True)
            return tuple(requests[0].get_output_tensor(i).data.copy() for i in range(3))

        return run_whole

    def run(pixels: np.ndarray, pause: Callable[[], None] = lambda: None) -> tuple[np.ndarray, ...]:
        x, stages = pixels, []
        for (_, stop), req in zip(layout.pieces, requests):
            pause()
            req.infer(x, share_inputs=True, share_outputs=True)
            x = req.get_output_tensor(0).data
            if stop - 1 in layout.stage_ends:
                stages.append(x)
        pause()
        head = requests[-1]
        head.infer(stages, share_inputs=True, share_outputs=True)
        return tuple(head.get_output_tensor(i).data.copy() for i in range(3))

    return run


class OpenVINOEncoder:
    """``ImageEncoder`` on OpenVINO's CPU plugin; one image per inference (the fastest per image on a
    CPU), batches run image by image.

    ``fingerprint``: the model weights' hash (``weights_fingerprint``), which names the IR on disk.
    ``pieces``: convert in pieces, one Hiera block each (for click priority), instead of one graph.
    ``pause``: called before each piece, or once before the whole graph (the engine's
    ``DecodeFirst.wait``). ``free_torch``: drop the torch copy of the trunk and neck weights once
    compiled (they are not needed any more). ``quantize``: ``"none"``, ``"int8-weights"`` or ``"int8"``
    (see the module's docstring); ``"int8"`` calls ``calibration()`` for its images' pixels (only when
    its IR is not on disk yet), and ``calibration_id`` names those images in the cache key.
    """

    backend = "openvino"
    input_dtype = torch.float32

    def __init__(
        self,
        side: ImageSide,
        dtype: torch.dtype,
        input_size: int,
        fingerprint: str,
        pause: Callable[[], None] = lambda: None,
        pieces: bool = False,
        free_torch: bool = True,
        cache_dir: str | os.PathLike | None = None,
        quantize: str = "none",
        calibration: Callable[[], list[np.ndarray]] | None = None,
        calibration_id: str = "",
    ):
        try:
            import openvino as ov
        except ImportError as e:
            raise OpenVINOError("the openvino package is not installed (pip install openvino)") from e
        if quantize not in QUANTIZE_MODES:
            raise ValueError(f"unknown quantize {quantize!r}: expected one of {', '.join(QUANTIZE_MODES)}")
        if quantize == "int8" and (calibration is None or pieces):
            raise ValueError("quantize='int8' needs calibration images and the whole graph (pieces=False)")
        self.precision = str(dtype).removeprefix("torch.")
        self.quantize = quantize
        self.runs = 0
        self._pause = pause
        self.pieces = pieces
        layout = Layout.of(side.encoder.backbone) if pieces else Layout.whole(side.encoder.backbone)
        root = Path(cache_dir) if cache_dir is not None else cache_root() / "openvino"
        directory = root / _cache_key(fingerprint, input_size, layout)
        self.converted = not _complete(directory, layout)
        if self.converted:
            log.warning(
                "converting the image encoder to OpenVINO, once for these weights (~30 s for hiera_tiny, "
                "minutes for hiera_large); kept in %s (backend='torch' skips this)",
                directory,
            )
            _convert(side, layout, input_size, directory)
        if quantize != "none":
            tag = quantize if quantize == "int8-weights" else f"int8:{calibration_id}"
            source, directory = directory, root / _cache_key(fingerprint, input_size, layout, tag)
            if not _complete(directory, layout):
                log.warning("quantising the image encoder (%s) once for these weights; kept in %s", quantize, directory)
                calib = calibration() if quantize == "int8" else []
                # int8 is checked on an image it was not calibrated on (the last one), where there are two or more
                check = calib[-1] if calib else _check_pixels(input_size)
                calib = calib[:-1] if len(calib) > 1 else calib
                err = _quantize(source, directory, layout, quantize, calib, check)
                log.warning("%s encoder: image embedding within %.2g%% of float32's (relative L2)", quantize, 100 * err)
        core = ov.Core()
        hint = _PRECISION_HINT[dtype]
        config = compile_config(hint, quantize)
        core.set_property({"CACHE_DIR": str(compiled_cache_dir(root, config))})
        try:
            compiled = [
                core.compile_model(str(directory / f"piece{i}.xml"), "CPU", config)
                for i in range(len(layout.pieces) + 1)
            ]
        except Exception as e:  # an int8 encoder that will not compile leaves the float one to try
            error = OpenVINOError if quantize == "none" else QuantizeError
            raise error(f"OpenVINO could not compile the image encoder from {directory}: {one_line(e)}") from e
        self.directory = directory
        self._run = _infer_chain(compiled, layout)
        if free_torch:  # the trunk and neck now live in OpenVINO: release the torch weights
            side.encoder.to("meta")
            forget_position_encodings(side.encoder)

    def __call__(self, pixels: torch.Tensor) -> EncoderOutput:
        outs = []
        for image in pixels.float().numpy():
            outs.append(self._run(image[None], self._pause))
            self.runs += 1
        if len(outs) == 1:  # the usual case on a CPU (batch 1): no second copy
            return tuple(torch.from_numpy(a) for a in outs[0])  # type: ignore[return-value]
        return tuple(torch.from_numpy(np.concatenate(parts)) for parts in zip(*outs))  # type: ignore[return-value]
