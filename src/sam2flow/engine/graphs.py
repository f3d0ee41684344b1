"""Export SAM2 as OpenVINO graphs that ``GraphEngine`` runs without torch.

``export_graphs`` writes one folder:

- ``encoder/`` the image side (pixels (1, 3, S, S) → image embedding and the two projected
  high-resolution features) as ``OpenVINOEncoder`` converts it: the same IR, checked against torch;
- ``encoder-int8-weights/`` the same with int8 weights (NNCF), what ``dtype="auto"`` runs on a CPU
  without native bf16 but with VNNI, when it compiles and passes its check (else left out, with a logged line);
- ``decoder-{multi,single}[-mask].xml`` the prompt encoder and the fused mask decoder
  (``engine/decoder.py``) for N prompts of one image, with and without ``multimask_output``, with and
  without mask prompts. Inputs: one image's encoder outputs as ``transforms.decoder_inputs_array``
  gives them (``rows`` (4096, 256), the image tokens; ``pixels1`` (4096, 256) and ``pixels0``
  (16384, 128), the high-resolution features' sub-pixel rows: GraphEngine makes them once per image),
  ``coords`` (N, P, 2) float32 in the 1024 input frame, ``labels`` (N, P) int32 (2, 3 for a box's
  corners, 1/0 for clicks) and, for ``-mask``, ``masks`` (N, 1, 256, 256) logits. Outputs: the best
  candidate's low-resolution logits (N, 1, 256, 256) and predicted IoU (N, 1), as ``Sam2Engine``
  selects them (best of three, or SAM2's stability fall-back for a single mask). N and P are dynamic;
- ``sam2flow-graphs.json``: what the graphs are (version, family, sizes, the weights' fingerprint,
  the OpenVINO version, the files).

Every decoder graph is checked against the torch decoder in float32 on one embedded image before it
is kept, both fed ``decoder_inputs_array`` (``OpenVINOError`` above 1e-3 of the logits' scale).
Converting takes ~30 s for hiera_tiny, the int8 weights ~20 s more. The folder is written under a
temporary name and renamed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import transforms as T
from .decoder import decode, image_rows, prompted_image, upscale_operands, with_upscale_bias
from .engine import Sam2Engine
from .graph_engine import GRAPHS_FORMAT, MANIFEST, decoder_name
from .openvino_encoder import Layout, _check_pixels, _quantize
from .openvino_plugin import OpenVINOError, QuantizeError, one_line
from .types import LOW_RES

log = logging.getLogger(__name__)

DECODER_INPUTS = ("rows", "pixels1", "pixels0", "coords", "labels")


class DecoderGraph(nn.Module):
    """The prompt encoder and the fused decoder of ``engine`` as one module to convert (see the module
    docstring for inputs and outputs). float32: ``GraphEngine`` picks the precision when it compiles."""

    def __init__(self, engine: Sam2Engine, multimask_output: bool, mask_prompts: bool):
        super().__init__()
        self.prompt_encoder = engine.model.prompt_encoder
        self.decoder = engine.model.mask_decoder
        self.register_buffer("pos", image_rows(engine._image_pe[0], torch.float32))
        self.grid = tuple(int(s) for s in engine._image_pe.shape[-2:])
        self.multimask_output = multimask_output
        self.mask_prompts = mask_prompts

    def forward(self, rows, pixels1, pixels0, coords, labels, masks=None):
        sparse, _ = self.prompt_encoder(coords[:, None], labels[:, None], None, None)
        image = prompted_image(rows, self.prompt_encoder, masks)
        operands = upscale_operands(self.decoder, with_upscale_bias(self.decoder, pixels1, pixels0))
        # every prompt in one chunk: the caller bounds N (a traced loop over chunks would fix N)
        return decode(self.decoder, image, self.pos, self.grid, sparse, operands, self.multimask_output, 1 << 30, True)


def _example(engine: Sam2Engine) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """One embedded seeded image's encoder outputs (image_embed, s0, s1) and three prompts (a box, a box with a
    click, a box with two: coords, labels, and mask logits for the ``-mask`` graphs), float32."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    emb = engine.embed([image], use_cache=False)[0]
    boxes = torch.tensor([[100, 80, 300, 260], [250, 200, 600, 470], [10, 10, 630, 470]], dtype=torch.float32)
    coords = torch.cat([boxes.view(-1, 2, 2), torch.tensor([[[200.0, 170.0], [0.0, 0.0]]]).expand(3, 2, 2)], 1)
    coords = coords / torch.tensor([640.0, 480.0]) * engine.input_size
    labels = torch.tensor([[2, 3, 1, -1], [2, 3, 1, 0], [2, 3, 0, -1]], dtype=torch.int32)
    masks = torch.from_numpy(rng.normal(0, 4, (3, 1, LOW_RES, LOW_RES)).astype(np.float32))
    return (emb.image_embed.float(), *(f.float() for f in emb.high_res_feats)), (coords, labels, masks)


def _convert_decoder(engine: Sam2Engine, multimask_output: bool, mask_prompts: bool, feats, prompts):
    """One decoder graph, converted and checked in float32 against the torch module, both fed
    ``decoder_inputs_array`` of the encoder outputs ``feats``; ``prompts`` from ``_example``."""
    import openvino as ov

    module = DecoderGraph(engine, multimask_output, mask_prompts).eval()
    image = tuple(torch.from_numpy(a) for a in T.decoder_inputs_array(*(t.numpy() for t in feats)))
    prompts = prompts if mask_prompts else prompts[:2]
    example = (*image, *prompts)
    shapes = [list(t.shape) for t in image] + [[-1, -1, 2], [-1, -1]]
    if mask_prompts:
        shapes.append([-1, 1, LOW_RES, LOW_RES])
    name = decoder_name(multimask_output, mask_prompts)
    try:
        # The trace keeps the branches its three prompts take (one image shared by every prompt, unless
        # mask prompts give each its own): right for any N, and the check below runs N = 2.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            want = module(*example)
            model = ov.convert_model(module, example_input=example, input=[ov.PartialShape(s) for s in shapes])
        for port, key in zip(model.inputs, DECODER_INPUTS + ("masks",)):
            port.get_tensor().set_names({key})
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        # checked on two prompts, not the three it was traced with: N must really be dynamic
        got = compiled([t.numpy() for t in image] + [t.numpy()[:2] for t in prompts])
    except Exception as e:  # the converter's and plugin's own errors are of many types
        raise OpenVINOError(f"OpenVINO could not convert the mask decoder ({name}): {one_line(e)}") from e
    for what, w, g in zip(("logits", "IoU"), want, (got[0], got[1])):
        w = w[:2].numpy()
        err = float(np.abs(w - g).max()) if w.shape == g.shape else float("inf")
        scale = max(1.0, float(np.abs(w).max()))
        if not err <= 1e-3 * scale:
            raise OpenVINOError(
                f"OpenVINO's float32 {name} {what} differ from torch's by {err:.3g} (scale {scale:.3g})"
            )
    return model


def export_graphs(
    directory: str | os.PathLike,
    version: str = "hiera_tiny",
    family: str = "sam2.1",
    checkpoint: str | None = None,
    int8_weights: bool = True,
) -> Path:
    """Write the graphs of a checkpoint (found as ``load_model`` finds it) into ``directory``; returns it.

    ``directory`` must not exist yet, or be an earlier export (replaced). ``int8_weights``: add the
    int8-weights encoder. Raises ``OpenVINOError`` if a graph cannot be converted or fails its check.
    """
    import openvino as ov

    out = Path(directory)
    if out.exists() and not (out / MANIFEST).is_file():
        raise ValueError(f"{out} exists and is not a sam2flow graph export: choose a new folder")
    engine = Sam2Engine.from_pretrained(
        version, family, checkpoint, device="cpu", dtype="float32", backend="openvino", quantize="none"
    )
    if engine.backend != "openvino":
        raise OpenVINOError("the image encoder could not be converted to OpenVINO (see the logged line)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-graphs-", dir=out.parent))
    try:
        encoders = {"none": "encoder/piece0.xml"}
        shutil.copytree(engine.encoder.directory, tmp / "encoder")
        if int8_weights:
            try:
                layout = Layout((), ())
                err = _quantize(
                    tmp / "encoder",
                    tmp / "encoder-int8-weights",
                    layout,
                    "int8-weights",
                    [],
                    _check_pixels(engine.input_size),
                )
                encoders["int8-weights"] = "encoder-int8-weights/piece0.xml"
                log.warning("int8-weights encoder: image embedding within %.2g%% of float32's (relative L2)", 100 * err)
            except QuantizeError as e:
                log.warning("int8-weights encoder left out of the export: %s", e)
        feats, prompts = _example(engine)
        decoders = {}
        for multimask in (True, False):
            for masks in (False, True):
                name = decoder_name(multimask, masks)
                model = _convert_decoder(engine, multimask, masks, feats, prompts)
                ov.save_model(model, str(tmp / f"{name}.xml"), compress_to_fp16=False)
                decoders[name] = f"{name}.xml"
        manifest = {
            "format": GRAPHS_FORMAT,
            "version": engine.spec.version,
            "family": engine.spec.family,
            "input_size": engine.input_size,
            "low_res": LOW_RES,
            "weights": engine.store_id.rsplit("|", 1)[-1],  # the weights' fingerprint (float32)
            "openvino": ov.get_version(),
            "encoders": encoders,
            "decoders": decoders,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
