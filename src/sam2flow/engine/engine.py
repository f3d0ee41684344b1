"""Sam2Engine: batched image embedding and one-call-per-image prompt decoding."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TypeVar

import numpy as np
import torch

from ..models.registry import ModelSpec
from ..models.weights import load_model
from . import transforms as T
from .cache import EmbeddingCache, content_hash
from .cuda_graphs import CudaGraphEncoder, cuda_graphs_wanted
from .decoder import decode, image_rows, prompted_image, upscale_addends, upscale_operands
from .encoders import ImageEncoder, ImageSide, TorchEncoder, resolve_backend
from .fast import add_pause_points, streamline_encoder
from .precision import decoder_dtype, pick_device, resolve_dtype, resolve_quantize
from .prompts import Prompt, PromptArrays, group_prompts, prompt_arrays, prompt_points
from .threads import ComputeThread, compute_thread
from .types import (  # declared there, importable from here as before
    LOW_RES,
    EmbeddingStorage,
    ImageEmbedding,
    Prediction,
)

# Prompts decoded together by the fused decoder. On a CPU 4 (hiera_tiny, 2-core Xeon, 640x480, ms a box
# for 10 / 100 boxes, float32: chunks of 2 21.2 / 21.0, 4 22.2 / 21.4, 8 28.6 / 30.9; bf16: 11.9 / 11.6,
# 10.8 / 10.7, 12.3 / 12.1): 8 puts float32 chunks' (prompts, 4096, 256) tensors past glibc's 32 MB mmap
# threshold (fresh pages on every allocation). A GPU is launch-bound at that size (Meta's automatic
# generator decodes 64 clicks a call). On a CPU the upscaling runs in pixel blocks of at most
# UPSCALE_BYTES of activations (``decoder._upscaled_masks``; float32, 4 prompts: 18.1 / 17.1 ms a box
# against 20.6 / 18.3 in one piece).
DECODE_CHUNK, ACCELERATOR_DECODE_CHUNK = 4, 64
UPSCALE_BYTES = 8 << 20
CPU_BATCH, ACCELERATOR_BATCH = 1, 4  # images per encoder run by default: on a CPU one at a time is fastest


def default_batch_size(device: str | torch.device) -> int:
    """Images per encoder run where none is set: 1 on a CPU (batches are slower per image there:
    1.3-1.4x at 4, measured with torch and with Meta's ``set_image_batch``), 4 on accelerators."""
    return CPU_BATCH if pick_device(device).type == "cpu" else ACCELERATOR_BATCH


log = logging.getLogger(__name__)
R = TypeVar("R")


def weights_fingerprint(model) -> str:
    """A hash (blake2b, 128 bits, hex) of every parameter and buffer: names, dtypes, shapes, bytes.

    Any change to any weight (one element of a fine-tuned trunk block, say) changes it, so cached
    embeddings are never served for other weights. Hashing runs at about 1 GB/s: a few hundred
    milliseconds for hiera_tiny, about a second for hiera_large, once per engine.
    """
    h = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            t = t.detach()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class DecodeFirst:
    """Decodes ahead of the encoder: ``wait``, called at the encoder's pause points
    (``fast.add_pause_points``: before each trunk block's attention and MLP, between row chunks of a
    global attention, before each neck convolution; between OpenVINO pieces), holds the encoder there
    while any ``decoding()`` block runs, so a click's decode gets the cores after at most ~50-100 ms of
    encoder work (2 cores, hiera_tiny) instead of a whole encoder forward. Encoding resumes as soon
    as no decode runs; a steady stream of decodes delays embeddings (clicks first, on purpose).
    With a ``compute`` thread (an interactive engine's encoder runs on it), ``wait`` first runs the
    clicks queued there.
    """

    def __init__(self, compute: ComputeThread | None = None):
        self._compute = compute
        self._idle = threading.Condition()
        self._running = 0
        self.paused = 0  # encoder forwards held at a pause point right now

    @contextlib.contextmanager
    def decoding(self):
        with self._idle:
            self._running += 1
        try:
            yield
        finally:
            with self._idle:
                self._running -= 1
                self._idle.notify_all()

    def __reduce__(self):
        # The hooks live on the model: a copied or pickled model gets a fresh, idle gate of its own
        # (a Condition cannot be copied, and the copy must not wait for this engine's decodes).
        return (DecodeFirst, ())

    def wait(self, *_) -> None:
        if self._compute is not None:
            self._compute.run_urgent()
        with self._idle:
            self.paused += 1
            self._idle.wait_for(lambda: self._running == 0)
            self.paused -= 1


class Sam2Engine:
    """SAM2 on images: ``embed`` images in batches, then ``predict`` any number of prompts per image.

    ``dtype`` applies to the image encoder (the expensive part): ``"auto"`` is bfloat16 where the
    hardware has it natively, else float16 on CUDA, else float32 (``sam2flow.engine.precision``);
    ``"float32"`` gives the reference's masks (tested on the parity cases: mask IoU >= 0.999 with
    Meta's predictor, embeddings and scores within 1e-4). The mask decoder runs in bfloat16 with a
    bfloat16 encoder (``decoder_dtype``; a click's decode ~1.7x faster on a native-bf16 CPU, masks
    within the same guard), else in float32. Embeddings are cached by image content in
    ``cache`` (shared by every caller; pass one cache to several engines to share it).
    ``fused_decoder`` (default) decodes with ``sam2flow.engine.decoder``, which does the image-sized
    work once per image instead of once per prompt (equal within float32 rounding); False runs
    transformers' decoder as is (the reference package's arithmetic). ``compile=True``
    compiles the image encoder with ``torch.compile`` at construction (minutes on a CPU; the time
    is kept in ``compile_seconds``); it pays off for long-running servers and batch jobs.

    ``backend`` runs the image encoder: ``"torch"``, ``"openvino"`` (CPU; ``engine/openvino_encoder.py``)
    or ``"auto"`` (``$SAM2FLOW_BACKEND`` if set, else OpenVINO on a CPU and torch elsewhere, and torch
    for an ``interactive`` engine: see ``engine/encoders.py``). If OpenVINO cannot convert or compile
    the encoder, the engine logs one line and runs torch; ``backend`` then says what runs.
    ``interactive``: the engine answers clicks while images embed (a server), so its encoder must
    pause for decodes at fine intervals: OpenVINO then runs in per-block pieces instead of one graph.
    All of an interactive engine's torch work runs on the process's ``threads.ComputeThread``,
    whichever thread calls it (clicks first; ``from_pretrained`` loads it there too).
    ``max_batch_size`` (images per encoder run): default 1 on a CPU (the fastest per image there), 4 on accelerators.
    ``store`` (``engine.store.EmbeddingStore``): embeddings kept on disk; ``embed`` looks there after
    the cache and before the encoder, and writes what it computes when the store is writable.
    ``quantize`` (OpenVINO only; ``precision.resolve_quantize``): ``"int8-weights"`` (no data needed;
    ``"auto"`` picks it where ``dtype="auto"`` means float32 on a CPU, i.e. one without native bf16,
    and the CPU has int8 dot products),
    ``"int8"`` (activations too, calibrated once on ``calibration``, RGB images like yours) or ``"none"``.
    Quantisations asked for by name raise ``ValueError`` if they fail; ``"auto"`` logs a line and runs
    the float encoder.
    """

    def __init__(
        self,
        model,
        spec: ModelSpec,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        max_batch_size: int | None = None,
        cache: EmbeddingCache | None = None,
        fused_decoder: bool = True,
        compile: bool = False,
        backend: str = "auto",
        store: EmbeddingStorage | None = None,
        interactive: bool = False,
        quantize: str = "auto",
        calibration: Sequence[np.ndarray] | None = None,
    ):
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.spec = spec
        self.device = pick_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.interactive = interactive
        self.backend = resolve_backend(backend, self.device, interactive)
        if compile and self.backend == "openvino":
            if backend == "openvino":
                raise ValueError("compile=True compiles the torch encoder: use backend='torch' (or 'auto') with it")
            self.backend = "torch"
        self.quantize = resolve_quantize(
            quantize, dtype, self.dtype, self.backend, calibration is not None, interactive
        )
        calibration = [T.as_rgb_uint8(im, f"calibration image {i}") for i, im in enumerate(calibration or ())]
        if self.quantize == "int8" and not calibration:
            raise ValueError("calibration is empty: quantize='int8' needs images to calibrate on")
        self.max_batch_size = max_batch_size or default_batch_size(self.device)
        self.fused_decoder = fused_decoder
        self.decode_chunk = DECODE_CHUNK if self.device.type == "cpu" else ACCELERATOR_DECODE_CHUNK
        self.upscale_budget = UPSCALE_BYTES if self.device.type == "cpu" else None
        self.cache = cache if cache is not None else EmbeddingCache()
        self.store = store
        # The engine converts the model in place (no copy of a large network): a second engine
        # on the same object with another dtype or device would silently change the first one.
        placed = (str(self.device), str(self.dtype), self.backend)
        owner_id, owner, owner_placed = getattr(model, "_sam2flow_owner", (None, lambda: None, None))
        # A deepcopy carries the attribute along: it counts only on the object it was set on.
        if owner_id == id(model) and owner() is not None and owner_placed != placed:
            raise ValueError(
                f"this model object already serves an engine on {owner_placed[0]} with a "
                f"{owner_placed[1]} encoder ({owner_placed[2]}); converting it to {'/'.join(placed)} would "
                f"change that engine too: pass copy.deepcopy(model), or the same device, dtype and backend"
            )
        if any(p.is_meta for p in model.vision_encoder.parameters()):
            raise ValueError(
                "this model's image encoder runs in OpenVINO for another engine, which released its torch "
                "weights: load the model again (or share that engine)"
            )
        self.model = model.eval().to(self.device, torch.float32)
        self.model._sam2flow_owner = (id(model), weakref.ref(self), placed)
        streamline_encoder(self.model)
        self.input_size = int(model.config.prompt_encoder_config.image_size)
        self.compile_seconds: float | None = None
        # Cache keys name the weights (float32, before any conversion), backend and precision, not only
        # the size: engines with other checkpoints (a fine-tuned one, say) or devices may share one
        # cache without mixing embeddings.
        fingerprint = weights_fingerprint(self.model)
        # The store's key leaves the device and backend out: embeddings made on a GPU (torch) serve a
        # CPU process (OpenVINO); both agree far within the store's float16 rounding.
        self.store_id = f"{spec.name}|{self.dtype}|{fingerprint}"
        # The calibration images' hash: it names an int8 encoder's IR and its embeddings.
        calibration_id = hashlib.blake2b("|".join(map(content_hash, calibration)).encode(), digest_size=12).hexdigest()
        # One encoder forward at a time, and one decode at a time: torch already uses every core for
        # one batch. The two locks are separate (the decoder reads none of the encoder's state), so a
        # click's decode never waits for a whole encoder forward; and decodes go first: a running
        # encoder pauses at its next pause point (``DecodeFirst``) while any decode runs.
        self._lock = threading.Lock()
        self._decode_lock = threading.Lock()
        self._compute: ComputeThread | None = compute_thread() if interactive else None
        self._decode_first = DecodeFirst(self._compute)
        # The decoder's per-image inputs of the last few images clicked on (the image embedding in the
        # decoder's precision and its ``upscale_operands``, ~16 MB in float32): a click refining an object
        # reuses them instead of rebuilding them from the high-resolution features.
        self._operands: EmbeddingCache = EmbeddingCache(4, 64 << 20, size_of=lambda v: sum(t.nbytes for t in v))
        self.encoder: ImageEncoder = self._make_encoder(fingerprint, compile, quantize, calibration, calibration_id)
        # Quantised embeddings are not float ones: they get ids of their own (calibration included).
        quant = {"none": "", "int8-weights": "|int8-weights"}.get(self.quantize, f"|int8:{calibration_id}")
        self.store_id += quant
        self._model_id = f"{spec.name}|{self.backend}|{self.dtype}|{self.device}|{fingerprint}{quant}"
        with torch.inference_mode():
            self._image_pe = self.model.get_image_wide_positional_embeddings()
        # The fused decoder's own copy of the decoder weights in its precision (``precision.decoder_dtype``);
        # the model's float32 decoder stays for the encoder's projections and ``fused_decoder=False``.
        self.decoder_dtype = decoder_dtype(self.dtype) if fused_decoder else torch.float32
        self._decoder = self.model.mask_decoder
        if self.decoder_dtype != torch.float32:
            self._decoder = copy.deepcopy(self.model.mask_decoder).to(self.decoder_dtype)
        # The positional encoding as image-token rows (contiguous: added to the image tokens in every
        # block, and a sum with a transposed operand costs ~6x one with rows in bf16).
        self._decoder_pos = image_rows(self._image_pe[0], self.decoder_dtype)

    def _make_encoder(
        self, fingerprint: str, compile: bool, quantize: str, calibration: list[np.ndarray], calibration_id: str
    ) -> ImageEncoder:
        side = ImageSide(self.model)
        if self.backend == "openvino":
            from .openvino_encoder import OpenVINOEncoder, OpenVINOError, QuantizeError

            def pixels() -> list[np.ndarray]:
                size, cpu = self.input_size, torch.device("cpu")
                return [T.preprocess([im], size, cpu, torch.float32).numpy() for im in calibration]

            def make(mode: str) -> OpenVINOEncoder:
                return OpenVINOEncoder(
                    side,
                    self.dtype,
                    self.input_size,
                    fingerprint,
                    self._decode_first.wait,
                    pieces=self.interactive,
                    quantize=mode,
                    calibration=pixels,
                    calibration_id=calibration_id,
                )

            try:
                try:
                    return make(self.quantize)
                except QuantizeError as e:
                    if quantize != "auto":
                        raise
                    log.warning("int8 weights unavailable, running the float encoder instead: %s", e)
                    self.quantize = "none"
                    return make("none")
            except OpenVINOError as e:
                if quantize not in ("auto", "none"):  # asked for by name: the caller hears why not
                    raise ValueError(f"could not quantise the image encoder: {e}") from e
                log.warning("OpenVINO image encoder unavailable, running torch instead: %s", e)
                self.backend = "torch"
                self.quantize = "none"
        self.model.vision_encoder.to(self.dtype)
        if not compile:  # a compiled encoder runs as one graph: no pauses, decodes share the cores
            if cuda_graphs_wanted(self.device):  # one launch per forward: no pause points either
                return CudaGraphEncoder(side, self.dtype)
            add_pause_points(side, self._decode_first.wait)
            return TorchEncoder(side, self.dtype)
        # torch.compile, warmed up on one blank image (timed in ``compile_seconds``); each new batch
        # size compiles once more on first use.
        start = time.perf_counter()
        encoder = TorchEncoder(side, self.dtype, compiled=True)
        encoder(torch.zeros(1, 3, self.input_size, self.input_size, device=self.device, dtype=self.dtype))
        encoder.runs = 0
        self.compile_seconds = time.perf_counter() - start
        return encoder

    @classmethod
    def from_pretrained(
        cls,
        version: str = "hiera_tiny",
        family: str = "sam2.1",
        checkpoint: str | None = None,
        **kwargs,
    ) -> Sam2Engine:
        """Find and load weights (see ``sam2flow.models.weights.load_model``) and build an engine
        (an ``interactive`` one on the compute thread, which will run all its work)."""

        def build() -> Sam2Engine:
            model, spec = load_model(version, family, checkpoint)
            return cls(model, spec, **kwargs)

        return compute_thread().call(build) if kwargs.get("interactive") else build()

    def submit_click(self, fn: Callable[..., R], *args) -> Future:
        """``fn(*args)`` as a click: on an interactive engine's compute thread, ahead of embedding work
        (its calls to this engine then run in place); its future. A non-interactive engine runs it
        here and returns it done. For a server's event loop, which awaits the future without a
        worker thread."""
        if self._compute is not None:
            return self._compute.submit(fn, *args, urgent=True)
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as e:  # handed to the awaiting caller
            future.set_exception(e)
        return future

    def _on_compute(self, urgent: bool, fn: Callable[..., R], *args) -> R:
        """``fn(*args)`` on the compute thread for an interactive engine (``urgent``: a click), else here."""
        return fn(*args) if self._compute is None else self._compute.call(fn, *args, urgent=urgent)

    # ---- embedding -------------------------------------------------------------------------

    def embed(self, images: Sequence[np.ndarray], use_cache: bool = True) -> list[ImageEmbedding]:
        """Embed RGB images of any sizes, ``max_batch_size`` at a time; cached by content."""
        if isinstance(images, np.ndarray):
            raise ValueError("embed() takes a list of images; wrap a single image as [image]")
        rgb = [T.as_rgb_uint8(im, f"image {i}") for i, im in enumerate(images)]
        keys = [f"{self._model_id}|{content_hash(im)}" for im in rgb]
        found: dict[str, ImageEmbedding] = {}
        if use_cache:
            for k in set(keys):
                hit = self.cache.get(k)
                if hit is not None:
                    found[k] = hit
        todo: dict[str, np.ndarray] = {}
        for k, im in zip(keys, rgb):
            if k not in found and (stored := self._from_store(k)) is not None:
                found[k] = stored
                if use_cache:
                    self.cache.put(k, stored)
            if k not in found:
                todo.setdefault(k, im)
        items = list(todo.items())
        for start in range(0, len(items), self.max_batch_size):
            chunk = items[start : start + self.max_batch_size]
            for (k, _), emb in zip(chunk, self._embed_batch([k for k, _ in chunk], [im for _, im in chunk])):
                if self.store is not None and self.store.writable:  # decode what later reads will get
                    emb = self._on_compute(False, self.store.put, self.store_id, emb)
                found[k] = emb
                if use_cache:
                    self.cache.put(k, emb)
        return [found[k] for k in keys]

    def _from_store(self, key: str) -> ImageEmbedding | None:
        if self.store is None:
            return None
        return self._on_compute(True, self._read_store, key)

    def _read_store(self, key: str) -> ImageEmbedding | None:
        hit = self.store.get(self.store_id, key.rsplit("|", 1)[-1], self.device)
        return None if hit is None else dataclasses.replace(hit, key=key)

    def _embed_batch(self, keys: list[str], images: list[np.ndarray]) -> list[ImageEmbedding]:
        return self._on_compute(False, self._encode, keys, images)

    def _encode(self, keys: list[str], images: list[np.ndarray]) -> list[ImageEmbedding]:
        with self._lock, torch.inference_mode():
            pixels = T.preprocess(images, self.input_size, self.device, self.encoder.input_dtype)
            embed, s0, s1 = self.encoder(pixels)
        return [
            ImageEmbedding(embed[i].clone(), (s0[i].clone(), s1[i].clone()), im.shape[:2], k)
            for i, (k, im) in enumerate(zip(keys, images))
        ]

    # ---- decoding --------------------------------------------------------------------------

    def predict(
        self,
        embedding: ImageEmbedding,
        boxes=None,
        points=None,
        point_labels=None,
        mask_input=None,
        multimask_output: bool = True,
        max_hole_area: int = 0,
        max_sprinkle_area: int = 0,
    ) -> Prediction:
        """Decode N prompts of one image in one decoder call.

        ``boxes``: (N, 4) x1, y1, x2, y2 pixels; ``points``: (N, P, 2) x, y pixels (or (P, 2) for one
        prompt) with ``point_labels`` (N, P) of 1/0; both together give each box its clicks.
        ``mask_input``: (N, 256, 256) low-resolution logits of an earlier prediction.
        With ``multimask_output`` the best of three candidates is chosen by predicted IoU at low
        resolution, so only that mask is upsampled.
        ``max_hole_area`` / ``max_sprinkle_area`` (low-resolution pixels, 0 = off, the reference's
        default) fill small holes and erase small specks before upsampling, as Meta's
        ``SAM2ImagePredictor(max_hole_area=..., max_sprinkle_area=...)`` does
        (``transforms.remove_small_regions``); ``low_res_logits`` stay as decoded.
        """
        cleanup = _cleanup(max_hole_area, max_sprinkle_area)
        arrays = prompt_arrays(boxes, points, point_labels, mask_input, embedding.original_size)
        if arrays.count == 0:  # a detector that found nothing
            return self.predict_prompts(embedding, [])
        return self._decode(embedding, arrays, multimask_output, cleanup)

    def predict_prompts(
        self,
        embedding: ImageEmbedding,
        prompts: Sequence[Prompt],
        multimask_output: bool = True,
        max_hole_area: int = 0,
        max_sprinkle_area: int = 0,
    ) -> Prediction:
        """Decode a list of ``Prompt`` objects of any mix of shapes; results in prompt order.

        ``max_hole_area`` / ``max_sprinkle_area``: as in ``predict``.
        """
        cleanup = _cleanup(max_hole_area, max_sprinkle_area)
        h, w = embedding.original_size
        if not prompts:
            return Prediction(
                np.zeros((0, h, w), bool), np.zeros(0, np.float32), np.zeros((0, LOW_RES, LOW_RES), np.float32)
            )
        groups = group_prompts(prompts, embedding.original_size)
        if len(groups) == 1:
            return self._decode(embedding, groups[0][1], multimask_output, cleanup)
        n = len(prompts)
        masks = np.zeros((n, h, w), bool)
        scores = np.zeros(n, np.float32)
        logits = np.zeros((n, LOW_RES, LOW_RES), np.float32)
        for idx, arrays in groups:
            part = self._decode(embedding, arrays, multimask_output, cleanup)
            masks[idx], scores[idx], logits[idx] = part.masks, part.scores, part.low_res_logits
        return Prediction(masks, scores, logits)

    def decode_low_res(
        self, emb: ImageEmbedding, prompts: PromptArrays, multimask_output: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every candidate of every prompt, before any selection or upsampling.

        Returns low-resolution logits (N, C, 256, 256) and predicted IoU (N, C) on the engine's
        device, C = 3 with ``multimask_output`` else 1. For callers that rank candidates
        themselves (automatic mask generation); ``predict`` is the usual entry point.
        """
        return self._on_compute(True, self._decode_low_res, emb, prompts, multimask_output)

    def _decode_low_res(
        self, emb: ImageEmbedding, prompts: PromptArrays, multimask_output: bool, best_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        coords, labels = prompt_points(prompts)
        dev = self.device
        with self._decode_first.decoding(), self._decode_lock, torch.inference_mode():
            xy = T.to_input_frame(torch.from_numpy(coords).to(dev), emb.original_size, self.input_size)
            lab = torch.from_numpy(labels).to(dev)
            mask = torch.from_numpy(prompts.mask_input).to(dev) if prompts.mask_input is not None else None
            if not self.fused_decoder:
                # One prompt per batch row (batch N, point batch 1): mask prompts line up with rows.
                sparse, dense = self.model.prompt_encoder(xy[:, None], lab[:, None], None, mask)
                low_res, iou, _, _ = self.model.mask_decoder(
                    image_embeddings=emb.image_embed[None].expand(len(xy), -1, -1, -1),
                    image_positional_embeddings=self._image_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask_output,
                    high_resolution_features=[f[None] for f in emb.high_res_feats],
                )
                return low_res[:, 0], iou[:, 0]
            sparse, _ = self.model.prompt_encoder(xy[:, None], lab[:, None], None, None)
            dd = self.decoder_dtype
            key = (emb.key, emb.high_res_feats[0].data_ptr())  # this image, these very features
            cached = self._operands.get(key)
            if cached is None:  # the image tokens in the decoder's precision, and the upscale_operands
                high_res = tuple(f.to(dd) for f in emb.high_res_feats)
                cached = (
                    image_rows(emb.image_embed, dd),
                    *upscale_operands(self._decoder, upscale_addends(self._decoder, high_res)),
                )
                self._operands.put(key, cached)
            rows, *operands = cached
            # A single prompt's token-sized work in float32 (``engine/decoder.py``: Precision).
            tokens = self.model.mask_decoder if len(xy) == 1 else self._decoder
            low_res, iou = decode(
                tokens,
                prompted_image(rows, self.model.prompt_encoder, mask),
                self._decoder_pos,
                self._image_pe.shape[-2:],
                sparse.to(tokens.iou_token.weight.dtype),
                tuple(operands),
                multimask_output,
                self.decode_chunk,
                best_only,
                self.upscale_budget,
            )
            return low_res.float(), iou.float()

    def _decode(
        self, emb: ImageEmbedding, prompts: PromptArrays, multimask_output: bool, cleanup: tuple[int, int] = (0, 0)
    ) -> Prediction:
        return self._on_compute(True, self._decode_now, emb, prompts, multimask_output, cleanup)

    def _decode_now(
        self, emb: ImageEmbedding, prompts: PromptArrays, multimask_output: bool, cleanup: tuple[int, int]
    ) -> Prediction:
        low_res, iou = self._decode_low_res(emb, prompts, multimask_output, best_only=True)
        with torch.inference_mode():
            best = iou.argmax(dim=1)
            rows = torch.arange(low_res.shape[0], device=low_res.device)
            low_res, scores = low_res[rows, best], iou[rows, best]
            cleaned = T.remove_small_regions(low_res, *cleanup) if any(cleanup) else low_res
            masks = T.upsample_masks(cleaned, emb.original_size)
            low_res = low_res.clamp(-T.LOW_RES_LOGIT_LIMIT, T.LOW_RES_LOGIT_LIMIT)
            return Prediction(masks.cpu().numpy(), scores.float().cpu().numpy(), low_res.float().cpu().numpy())

    def automatic(self, embedding: ImageEmbedding, config=None):
        """Unprompted mode on one image: see ``sam2flow.engine.automatic.generate_masks``."""
        from .automatic import AutomaticConfig, generate_masks

        return self._on_compute(False, generate_masks, self, embedding, config or AutomaticConfig())

    def segment(
        self,
        image: np.ndarray,
        boxes=None,
        points=None,
        point_labels=None,
        multimask_output: bool = True,
        max_hole_area: int = 0,
        max_sprinkle_area: int = 0,
    ) -> Prediction:
        """Embed one image (cached) and decode its prompts."""
        return self.predict(
            self.embed([image])[0],
            boxes,
            points,
            point_labels,
            multimask_output=multimask_output,
            max_hole_area=max_hole_area,
            max_sprinkle_area=max_sprinkle_area,
        )


def _cleanup(max_hole_area, max_sprinkle_area) -> tuple[int, int]:
    return T.check_region_area("max_hole_area", max_hole_area), T.check_region_area(
        "max_sprinkle_area", max_sprinkle_area
    )
