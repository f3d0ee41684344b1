"""The engine's contracts: the data it takes and hands out, and the interfaces adapters call.

Adapters (the workflow step and runner, the server and its batchers, remote execution, Ray) are
written against these declarations, not against ``Sam2Engine``: anything that honours
``SegmentingEngine`` plugs in unchanged (``Sam2Engine`` itself, the server's ``BatchedEngine``,
``workflows.remote.RemoteEngine``, a new backend), and anything that honours ``EngineProvider``
hands engines out by version (``EnginePool``, the server's state, ``RemotePool``).

Coordinates are pixels of the original image throughout: boxes ``x1, y1, x2, y2``, points
``x, y``; sizes are ``(H, W)``. Low-resolution mask logits are ``LOW_RES × LOW_RES``.

This module imports nothing else of sam2flow at run time, and not torch, so every layer can depend
on it (``GraphEngine``'s torch-free processes included).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

LOW_RES = 256  # side of the decoder's mask logits (the mask prompt's side too)


# ---- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One object to segment: a box (x1, y1, x2, y2 in pixels), clicks, or both.

    ``points`` are (x, y) pixels, ``labels`` 1 (positive) or 0 (negative), one per point.
    ``mask_input`` is optional low-resolution logits (256 × 256) from an earlier prediction.
    """

    box: Sequence[float] | None = None
    points: Sequence[Sequence[float]] | None = None
    labels: Sequence[int] | None = None
    mask_input: np.ndarray | None = None


@dataclass(frozen=True)
class PromptArrays:
    """Validated prompts of one shape: boxes (N, 4) or None, points (N, P, 2) or None, labels (N, P)."""

    boxes: np.ndarray | None
    points: np.ndarray | None
    labels: np.ndarray | None
    mask_input: np.ndarray | None  # (N, 1, 256, 256)

    @property
    def count(self) -> int:
        for a in (self.boxes, self.points, self.mask_input):
            if a is not None:
                return a.shape[0]
        return 0


@dataclass(frozen=True)
class ImageEmbedding:
    """What the decoder needs of one image.

    ``image_embed``: (256, 64, 64); ``high_res_feats``: (32, 256, 256) and (64, 128, 128), already
    projected by the decoder's ``conv_s0``/``conv_s1``; ``original_size``: (H, W) in pixels.
    ``key``: the cache key, ``"<model id>|<image_id>"`` (the model id names the version, dtype,
    device and weights, so engines may share one cache).
    """

    image_embed: torch.Tensor
    high_res_feats: tuple[torch.Tensor, torch.Tensor]
    original_size: tuple[int, int]
    key: str

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.image_embed, *self.high_res_feats))

    @property
    def image_id(self) -> str:
        """The image's content hash (``sam2flow.engine.cache.content_hash`` of its RGB pixels): the
        same image has the same id on every engine and in every process."""
        return self.key.rsplit("|", 1)[-1]


@dataclass(frozen=True)
class Prediction:
    """Best mask per prompt: ``masks`` (N, H, W) bool, ``scores`` (N,) predicted IoU,
    ``low_res_logits`` (N, 256, 256) float32 clamped to ±32 (usable as a later ``mask_input``)."""

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(frozen=True)
class AutomaticConfig:
    """Settings of automatic mask generation; defaults are the reference's.

    ``points_per_side``: clicks per side of the grid (``points_per_side ** 2`` clicks in all).
    ``points_per_batch``: clicks per decoder call; more is faster on a GPU at the cost of memory
    (each click holds three 256 × 256 float32 candidates: 64 clicks ≈ 50 MB), never different.
    ``pred_iou_thresh``: keep candidates whose predicted IoU is strictly above this (0 keeps all;
    above 1 keeps none).
    ``stability_score_thresh``: keep candidates whose stability score is at least this (0 keeps
    all, even empty masks, whose stability is NaN).
    ``stability_score_offset``: how far above and below ``mask_threshold`` the two cutoffs of the
    stability score lie, in logits.
    ``mask_threshold``: logit cutoff of the returned masks.
    ``box_nms_thresh``: a mask is dropped when its box overlaps a better-scored kept box with IoU
    above this.
    ``min_mask_region_area``: when > 0, holes and specks of at most this many pixels *of the
    256 × 256 low-resolution logits* (8-connected) are filled or erased before upsampling, as in
    the reference (which does this only where its CUDA extension is built, and skips it with a
    warning otherwise).
    ``multimask_output``: three candidates per click (True) or one.

    Crops (the reference's ``crop_n_layers`` > 0) are not implemented: the whole image is one
    crop, so the reference's "box touches a crop edge" filter never removes anything.
    Values are checked on construction (``ValueError`` naming the field), also by
    ``dataclasses.replace(config, ...)``.
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.8
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0
    multimask_output: bool = True

    def __post_init__(self):
        for name in ("points_per_side", "points_per_batch"):
            _check_int(name, getattr(self, name), 1)
        _check_int("min_mask_region_area", self.min_mask_region_area, 0)
        for name in (
            "pred_iou_thresh",
            "stability_score_thresh",
            "stability_score_offset",
            "mask_threshold",
            "box_nms_thresh",
        ):
            value = getattr(self, name)
            number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            if not number or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("pred_iou_thresh", "stability_score_thresh", "stability_score_offset"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.box_nms_thresh <= 1:
            raise ValueError(f"box_nms_thresh must be within [0, 1], got {self.box_nms_thresh!r}")
        if not isinstance(self.multimask_output, (bool, np.bool_)):
            raise ValueError(f"multimask_output must be True or False, got {self.multimask_output!r}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# ---- interfaces --------------------------------------------------------------------------------


class Embedded(Protocol):
    """What ``embed`` hands back for one image: opaque to callers, who only pass it back to the same
    engine, except for the image's ``original_size`` (H, W)."""

    @property
    def original_size(self) -> tuple[int, int]: ...


EmbeddingT = TypeVar("EmbeddingT", bound=Embedded)


@runtime_checkable
class ScoredMasks(Protocol):
    """Masks found in one image: ``masks`` (K, H, W) bool and ``scores`` (K,) float32 predicted IoU.

    ``Prediction`` and ``engine.automatic.AutomaticResult`` (which adds stability, boxes and the
    clicks) are such results; so is ``workflows.remote.RemoteMasks`` (what the server's JSON carries).
    """

    @property
    def masks(self) -> np.ndarray: ...

    @property
    def scores(self) -> np.ndarray: ...


@runtime_checkable
class SegmentingEngine(Protocol[EmbeddingT]):
    """An engine as the step, the runner and the server use it: embed images, then decode.

    ``embed``: RGB uint8 images (H, W, 3), any sizes → one embedding per image, in order (cached by
    content where the engine caches). ``predict_prompts``: any mix of prompts of one image → the best
    mask per prompt, in prompt order, holes and specks of at most ``max_hole_area`` /
    ``max_sprinkle_area`` low-resolution pixels removed (0: masks as decoded). ``automatic``: every
    object in the image (unprompted mode) with ``config`` (``None``: the engine's defaults), best
    first. Bad input raises ``ValueError``.
    """

    def embed(self, images: Sequence[np.ndarray]) -> list[EmbeddingT]: ...

    def predict_prompts(
        self,
        embedding: EmbeddingT,
        prompts: Sequence[Prompt],
        multimask_output: bool = True,
        max_hole_area: int = 0,
        max_sprinkle_area: int = 0,
    ) -> Prediction: ...

    def automatic(self, embedding: EmbeddingT, config: AutomaticConfig | None = None) -> ScoredMasks: ...


@runtime_checkable
class EngineProvider(Protocol):
    """Hands out the engine of a SAM2 version (``hiera_tiny``, ...), loading it if need be."""

    def get(self, version: str) -> SegmentingEngine[Any]: ...


@runtime_checkable
class LowResDecoder(Protocol):
    """Every candidate mask of every prompt before selection: what automatic mask generation needs.

    ``decode_low_res`` returns low-resolution logits (N, C, 256, 256) and predicted IoU (N, C) on
    the engine's device, C = 3 with ``multimask_output`` else 1 (see ``Sam2Engine.decode_low_res``).
    """

    def decode_low_res(
        self, emb: ImageEmbedding, prompts: PromptArrays, multimask_output: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class EmbeddingStorage(Protocol):
    """Embeddings kept beyond one process (``engine.store.EmbeddingStore``), as ``Sam2Engine`` uses them.

    ``get``: the embedding of ``image_id`` made by ``model_id`` (float32 on ``device``, key
    ``"<model_id>|<image_id>"``), ``None`` if there is none; a damaged or foreign entry raises
    ``ValueError`` naming it. ``put`` (only where ``writable``): keep ``embedding`` and return it as
    it will be read back.
    """

    @property
    def writable(self) -> bool: ...

    def get(self, model_id: str, image_id: str, device: str | torch.device = "cpu") -> ImageEmbedding | None: ...

    def put(self, model_id: str, embedding: ImageEmbedding) -> ImageEmbedding: ...
