"""``GraphEngine``: SAM2 from exported OpenVINO graphs, in a process that never imports torch.

For batch work on CPUs where memory counts (a container per worker, many workers per machine): the
image encoder and the prompt decoder run as the graphs ``export_graphs`` wrote (``engine/graphs.py``),
pre- and post-processing in numpy (``engine/transforms.py``, torch's own resampling). Only numpy,
OpenCV and OpenVINO are loaded. Measured on a 2-core Xeon with AMX (hiera_tiny, the workflow step on
two 640 × 480 images, 10 boxes each, each side in a fresh process): peak RSS 714 MiB in bf16 and 932
in float32, against 1,671 for Meta's predictor and 1,757 for ``Sam2Engine`` in float32.

An embedding holds the encoder's outputs in the layout the decoder graphs take (the image tokens and
the high-resolution features' sub-pixel rows: a permutation, made once per image in numpy, 16 MB in
float32), so each decoder run (``DECODE_CHUNK`` prompts) starts from them.

Differences from ``Sam2Engine``: decoding runs on OpenVINO too (slower per prompt than our torch
decoder: this engine is for memory, not for clicks); unprompted mode (``automatic``) is not
available; one image per encoder run (the fastest per image on a CPU); no embedding store.
Masks equal ``Sam2Engine``'s in float32 (the tests compare both with Meta's predictor).

Memory: only one of the two graphs holds its working memory at a time (``low_memory``, default):
an encoder run first releases the decoder's buffers and a decode the encoder's
(``CompiledModel.release_memory``), so the peak is the larger of the two, not their sum; the
buffers are allocated again on the next switch (a few tens of milliseconds).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import transforms as T
from .cache import EmbeddingCache, content_hash
from .cpu import cpu_bf16, cpu_flags, cpu_int8_dot
from .openvino_plugin import OpenVINOError, cache_root, compile_config, compiled_cache_dir, one_line
from .prompts import group_prompts, prompt_arrays, prompt_points
from .types import LOW_RES, AutomaticConfig, Prediction, Prompt, PromptArrays

log = logging.getLogger(__name__)

GRAPHS_FORMAT = 3  # the export format (``engine/graphs.py`` writes it): bump when inputs, outputs or files change
MANIFEST = "sam2flow-graphs.json"
DTYPES = ("auto", "float32", "bfloat16")
QUANTIZE = ("auto", "none", "int8-weights")
# Prompts per decoder run: bounds the decoder's buffers below the encoder's. Measured (hiera_tiny, 2-core
# Xeon, 10 boxes on each of two embedded 640x480 images, peak RSS / decode per image): float32 chunks of 2:
# 837 MiB / 0.61 s, 4: 836 / 0.52, 8: 947 / 0.53, 10: 1,034 / 0.40; bf16 4: 619 / 0.31, 8: 671 / 0.34.
DECODE_CHUNK = 4


@dataclass(frozen=True)
class GraphEmbedding:
    """What the decoder graphs need of one image, as numpy float32 (``transforms.decoder_inputs_array``
    of the encoder's outputs): ``rows`` (4096, 256), the image tokens; ``pixels`` (4096, 256) and
    (16384, 128), the high-resolution features' sub-pixel rows; ``original_size`` (H, W); ``key`` as
    ``ImageEmbedding.key`` (``"<model id>|<image id>"``)."""

    rows: np.ndarray
    pixels: tuple[np.ndarray, np.ndarray]
    original_size: tuple[int, int]
    key: str

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.rows, *self.pixels))

    @property
    def image_embed(self) -> np.ndarray:
        """The image embedding (256, 64, 64) as the encoder gave it (``ImageEmbedding.image_embed``), a copy."""
        side = int(round(self.rows.shape[0] ** 0.5))
        return self.rows.T.reshape(self.rows.shape[1], side, side)

    @property
    def image_id(self) -> str:
        return self.key.rsplit("|", 1)[-1]


def decoder_name(multimask_output: bool, mask_prompts: bool) -> str:
    """The file stem of the decoder graph for these options."""
    return f"decoder-{'multi' if multimask_output else 'single'}{'-mask' if mask_prompts else ''}"


def read_manifest(directory: Path) -> dict:
    """The export's manifest, checked: ``ValueError`` naming what is missing or foreign."""
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ValueError(f"no graph export at {directory}: make one with `sam2flow export-graphs` or export_graphs()")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{directory} has no {MANIFEST}: not a sam2flow graph export") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != GRAPHS_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{path}: export format {found!r}, this sam2flow reads {GRAPHS_FORMAT}: export again")
    for key in ("version", "input_size", "weights", "encoders", "decoders"):
        if key not in manifest:
            raise ValueError(f"{path} lacks {key!r}: export again")
    for kind in ("encoders", "decoders"):
        for name, file in manifest[kind].items():
            if not (directory / file).is_file() or not (directory / file).with_suffix(".bin").is_file():
                raise ValueError(f"{directory}: {kind[:-1]} {name!r} ({file}) is missing: export again")
    return manifest


class GraphEngine:
    """SAM2 on images from exported graphs (``export_graphs``), without torch; a ``SegmentingEngine``.

    ``directory``: the export. ``dtype``: ``"auto"`` (bfloat16 where the CPU has it natively, else
    float32), ``"float32"`` (the reference's arithmetic) or ``"bfloat16"``. ``quantize``: ``"auto"``
    (int8 weights for the encoder where ``auto`` means float32 and the CPU has int8 dot products, as
    ``Sam2Engine`` does, if the export has them), ``"none"`` or ``"int8-weights"``. ``cache``:
    embeddings by image content (shared if given). ``low_memory``: keep one graph's working memory at
    a time (see the module docstring). Bad input raises ``ValueError`` naming it.
    """

    backend = "openvino-graphs"

    def __init__(
        self,
        directory: str | os.PathLike,
        dtype: str = "auto",
        quantize: str = "auto",
        cache: EmbeddingCache | None = None,
        low_memory: bool = True,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} for GraphEngine: expected one of {', '.join(DTYPES)}")
        if quantize not in QUANTIZE:
            raise ValueError(f"unknown quantize {quantize!r} for GraphEngine: expected one of {', '.join(QUANTIZE)}")
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.version = str(self.manifest["version"])
        self.input_size = int(self.manifest["input_size"])
        bf16 = dtype == "bfloat16" or (dtype == "auto" and cpu_bf16(cpu_flags()))
        self.dtype = "bfloat16" if bf16 else "float32"
        encoders = self.manifest["encoders"]
        auto_quantize = quantize == "auto"
        if auto_quantize:
            pays = dtype == "auto" and not bf16 and cpu_int8_dot(cpu_flags())  # as ``precision.resolve_quantize``
            quantize = "int8-weights" if pays and "int8-weights" in encoders else "none"
        if quantize not in encoders:
            raise ValueError(f"{self.directory} has no {quantize} encoder (it has: {', '.join(encoders)})")
        self.quantize = quantize
        self.low_memory = low_memory
        self.cache = cache if cache is not None else EmbeddingCache()
        self._hint = "bf16" if bf16 else "f32"
        try:
            import openvino as ov
        except ImportError as e:
            raise OpenVINOError("GraphEngine needs the openvino package (pip install openvino)") from e
        self._core = ov.Core()
        try:
            self._encoder = self._compile_encoder()
        except OpenVINOError as e:
            if not auto_quantize or self.quantize == "none":  # asked for by name, or float: the caller hears why
                raise
            # int8 weights the CPU plugin cannot compile (seen with oneDNN capped below AVX-512): float
            log.warning("int8-weights encoder unavailable, running the float encoder instead: %s", e)
            self.quantize = "none"
            self._encoder = self._compile_encoder()
        quant = "" if self.quantize == "none" else f"|{self.quantize}"
        # the same model id scheme as Sam2Engine's: version, backend, precision, device, weights
        self.model_id = f"{self.version}|{self.backend}|{self.dtype}|cpu|{self.manifest['weights']}{quant}"
        self._decoders: dict[str, object] = {}  # compiled on first use
        self._lock = threading.Lock()  # one graph runs at a time: each uses every core
        self._holding: object | None = None  # the compiled graph whose buffers are allocated

    def _compile_encoder(self):
        config = compile_config(self._hint, self.quantize)
        self._core.set_property({"CACHE_DIR": str(compiled_cache_dir(cache_root() / "openvino", config))})
        return self._compile(self.manifest["encoders"][self.quantize], config)

    def _compile(self, file: str, config: dict):
        path = self.directory / file
        try:
            return self._core.compile_model(str(path), "CPU", config)
        except Exception as e:  # the plugin's errors are plain RuntimeErrors
            raise OpenVINOError(f"OpenVINO could not compile {path}: {one_line(e)}") from e

    def _use(self, graph) -> None:
        """Before ``graph`` runs: release the other graph's buffers (``low_memory``)."""
        if self.low_memory and self._holding is not None and self._holding is not graph:
            self._holding.release_memory()
        self._holding = graph

    def _decoder(self, multimask_output: bool, mask_prompts: bool):
        name = decoder_name(multimask_output, mask_prompts)
        if name not in self._decoders:
            if name not in self.manifest["decoders"]:
                raise ValueError(f"{self.directory} has no {name} graph: export again")
            self._decoders[name] = self._compile(self.manifest["decoders"][name], compile_config(self._hint))
        return self._decoders[name]

    # ---- SegmentingEngine ------------------------------------------------------------------

    def embed(self, images: Sequence[np.ndarray], use_cache: bool = True) -> list[GraphEmbedding]:
        """Embed RGB uint8 images (H, W, 3) of any sizes, one encoder run each; cached by content."""
        if isinstance(images, np.ndarray):
            raise ValueError("embed() takes a list of images; wrap a single image as [image]")
        out = []
        for i, image in enumerate(images):
            rgb = T.as_rgb_uint8(image, f"image {i}")
            key = f"{self.model_id}|{content_hash(rgb)}"
            hit = self.cache.get(key) if use_cache else None
            if hit is None:
                pixels = T.preprocess_array(rgb, self.input_size)
                with self._lock:
                    self._use(self._encoder)
                    embed, s0, s1 = (a[0] for a in self._encoder(pixels).values())
                    rows, pixels1, pixels0 = T.decoder_inputs_array(embed, s0, s1)  # new arrays
                hit = GraphEmbedding(rows, (pixels1, pixels0), rgb.shape[:2], key)
                if use_cache:
                    self.cache.put(key, hit)
            out.append(hit)
        return out

    def predict_prompts(
        self,
        embedding: GraphEmbedding,
        prompts: Sequence[Prompt],
        multimask_output: bool = True,
        max_hole_area: int = 0,
        max_sprinkle_area: int = 0,
    ) -> Prediction:
        """The best mask per prompt, in prompt order (as ``Sam2Engine.predict_prompts``)."""
        cleanup = self._check(embedding, max_hole_area, max_sprinkle_area)
        groups = group_prompts(prompts, embedding.original_size) if prompts else []
        return self._predict(embedding, groups, len(prompts), multimask_output, cleanup)

    def predict(
        self,
        embedding: GraphEmbedding,
        boxes=None,
        points=None,
        point_labels=None,
        mask_input=None,
        multimask_output: bool = True,
        max_hole_area: int = 0,
        max_sprinkle_area: int = 0,
    ) -> Prediction:
        """N prompts of one image given as arrays, as ``Sam2Engine.predict`` takes them."""
        cleanup = self._check(embedding, max_hole_area, max_sprinkle_area)
        arrays = prompt_arrays(boxes, points, point_labels, mask_input, embedding.original_size)
        groups = [(list(range(arrays.count)), arrays)] if arrays.count else []
        return self._predict(embedding, groups, arrays.count, multimask_output, cleanup)

    def _check(self, embedding, max_hole_area, max_sprinkle_area) -> tuple[int, int]:
        """The clean-up areas, checked; and that ``embedding`` is this engine's."""
        hole = T.check_region_area("max_hole_area", max_hole_area)
        sprinkle = T.check_region_area("max_sprinkle_area", max_sprinkle_area)
        if not isinstance(embedding, GraphEmbedding) or not embedding.key.startswith(self.model_id + "|"):
            raise ValueError("this embedding was not made by this GraphEngine: embed the image with it")
        return hole, sprinkle

    def _predict(self, embedding: GraphEmbedding, groups, n: int, multimask_output: bool, cleanup) -> Prediction:
        """Decode validated prompt groups ((indices, arrays) pairs) of ``n`` prompts in all."""
        hole, sprinkle = cleanup
        h, w = embedding.original_size
        masks = np.zeros((n, h, w), bool)
        scores = np.zeros(n, np.float32)
        logits = np.zeros((n, LOW_RES, LOW_RES), np.float32)
        for idx, arrays in groups:
            low, iou = self._decode(embedding, arrays, multimask_output)
            cleaned = T.clean_regions(low, hole, sprinkle) if hole or sprinkle else low
            masks[idx] = T.upsample_masks_array(cleaned, (h, w))
            scores[idx] = iou
            logits[idx] = np.clip(low, -T.LOW_RES_LOGIT_LIMIT, T.LOW_RES_LOGIT_LIMIT)
        return Prediction(masks, scores, logits)

    def _decode(self, emb: GraphEmbedding, prompts: PromptArrays, multimask_output: bool):
        """Low-resolution logits (N, 256, 256) and predicted IoU (N,) of the best candidate per prompt."""
        coords, lab = prompt_points(prompts)
        xy = T.to_input_frame(coords, emb.original_size, self.input_size)
        mask = prompts.mask_input
        lows, ious = [], []
        with self._lock:
            graph = self._decoder(multimask_output, mask is not None)
            self._use(graph)
            for start in range(0, len(xy), DECODE_CHUNK):
                part = slice(start, start + DECODE_CHUNK)
                inputs = [emb.rows, *emb.pixels, xy[part], lab[part]]
                if mask is not None:
                    inputs.append(mask[part].astype(np.float32))
                low, iou = graph(inputs).values()
                best = iou.argmax(1)
                rows = np.arange(len(best))
                lows.append(low[rows, best].astype(np.float32))
                ious.append(iou[rows, best].astype(np.float32))
        return np.concatenate(lows), np.concatenate(ious)

    def automatic(self, embedding: GraphEmbedding, config: AutomaticConfig | None = None):
        """Not available here: unprompted mode runs on ``Sam2Engine``."""
        raise ValueError(
            "GraphEngine decodes prompts only: unprompted (automatic) mode needs Sam2Engine "
            "(give the step boxes, or run it with the torch engine)"
        )


class GraphPool:
    """``EngineProvider`` over ``GraphEngine`` objects: ``get(version)`` returns the one of that version."""

    def __init__(self, *engines: GraphEngine):
        self.engines = {e.version: e for e in engines}

    def get(self, version: str) -> GraphEngine:
        if version not in self.engines:
            have = ", ".join(sorted(self.engines)) or "none"
            raise ValueError(f"no graphs of SAM2 {version!r} are loaded (exported versions here: {have})")
        return self.engines[version]
