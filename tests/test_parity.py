"""Parity with Meta's SAM2ImagePredictor on the same weights, images and prompts (float32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam2flow import Sam2Engine
from sam2flow.models.registry import get_spec

from conftest import build_reference, connected_components, mask_iou, random_image

IOU_BAR = 0.999
SCORE_TOL = 1e-4


def reference_best(predictor, **prompt):
    """Run the reference the way its docs show, then pick the best of the candidates by score."""
    masks, scores, logits = predictor.predict(**prompt)
    if masks.ndim == 3:  # one prompt: no batch axis
        masks, scores, logits = masks[None], scores[None], logits[None]
    best = scores.argmax(axis=1)
    rows = np.arange(len(best))
    return masks[rows, best].astype(bool), scores[rows, best], logits[rows, best]


def assert_parity(ours, ref):
    masks, scores, logits = ref
    assert ours.masks.shape == masks.shape
    for i in range(len(scores)):
        assert mask_iou(ours.masks[i], masks[i]) >= IOU_BAR, f"prompt {i}"
    np.testing.assert_allclose(ours.scores, scores, atol=SCORE_TOL)
    np.testing.assert_allclose(ours.low_res_logits, logits, atol=1e-3)


def make_pair(make_checkpoint, version, family):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    spec = get_spec(version, family)
    path = make_checkpoint(version, family)
    engine = Sam2Engine.from_pretrained(version, family, checkpoint=str(path), device="cpu", dtype="float32")
    return engine, SAM2ImagePredictor(build_reference(spec))


# (h, w), boxes (x1, y1, x2, y2), click prompts: points (N, P, 2) and labels (N, P)
SCENES = {
    "odd_333x517": (
        (333, 517),
        [[10, 20, 200, 300], [0, 0, 517, 333], [300.5, 40.25, 510, 120], [250, 150, 400, 333]],
        [[[100, 100], [300, 200]], [[400, 50], [20, 300]]],
        [[1, 0], [1, 1]],
    ),
    "wide_480x640": (
        (480, 640),
        [[0, 0, 64, 48], [600, 400, 640, 480], [100, 100, 500, 380]],
        [[[320, 240], [10, 10]], [[600, 20], [320, 470]], [[5, 470], [620, 240]]],
        [[1, 0], [0, 1], [1, 1]],
    ),
}


def run_battery(engine, predictor, image, boxes, points, labels, full=True):
    """Every prompt kind the issue lists, checked against the reference."""
    predictor.set_image(image)
    emb = engine.embed([image])[0]
    ref_embed = predictor._features["image_embed"][0]
    assert torch.allclose(torch.as_tensor(emb.image_embed), ref_embed, atol=1e-4)  # a tensor, or numpy (GraphEngine)
    boxes = np.asarray(boxes, np.float32)
    points = np.asarray(points, np.float32)
    labels = np.asarray(labels)
    nonempty = 0
    modes = (True, False) if full else (True,)
    for multimask in modes:
        # many boxes at once
        ours = engine.predict(emb, boxes=boxes, multimask_output=multimask)
        assert_parity(ours, reference_best(predictor, box=boxes, multimask_output=multimask))
        nonempty += sum(0 < m.sum() < m.size for m in ours.masks)
        if not full:
            continue
        # a single box
        ours = engine.predict(emb, boxes=boxes[:1], multimask_output=multimask)
        assert_parity(ours, reference_best(predictor, box=boxes[0], multimask_output=multimask))
        # clicks with negative labels, one prompt
        ours = engine.predict(emb, points=points[0], point_labels=labels[0], multimask_output=multimask)
        ref = reference_best(predictor, point_coords=points[0], point_labels=labels[0], multimask_output=multimask)
        assert_parity(ours, ref)
    # box plus clicks, batched: one object per box, each with its own clicks
    n = min(len(boxes), len(points))
    ours = engine.predict(emb, boxes=boxes[:n], points=points[:n], point_labels=labels[:n])
    ref = reference_best(predictor, box=boxes[:n], point_coords=points[:n], point_labels=labels[:n])
    assert_parity(ours, ref)
    assert nonempty > 0, "random weights gave only empty or full masks: the comparison proves nothing"


@pytest.mark.parametrize("family", ["sam2.1", "sam2"])
@pytest.mark.parametrize("scene", list(SCENES))
def test_tiny_parity(make_checkpoint, family, scene):
    engine, predictor = make_pair(make_checkpoint, "hiera_tiny", family)
    hw, boxes, points, labels = SCENES[scene]
    run_battery(engine, predictor, random_image(*hw, seed=len(scene)), boxes, points, labels)


def test_mask_input_parity(make_checkpoint):
    """Feeding back low-resolution logits (the click-to-refine loop) matches the reference."""
    run_mask_input_battery(*make_pair(make_checkpoint, "hiera_tiny", "sam2.1"))


def run_mask_input_battery(engine, predictor):
    """Low-resolution logits fed back for two boxes, then for one click prompt, against the reference."""
    image = random_image(300, 400, seed=3)
    predictor.set_image(image)
    emb = engine.embed([image])[0]
    boxes = np.array([[20, 30, 200, 250], [150, 10, 390, 290]], np.float32)
    first = engine.predict(emb, boxes=boxes)
    for multimask in (False, True):
        ours = engine.predict(emb, boxes=boxes, mask_input=first.low_res_logits, multimask_output=multimask)
        mask_input = first.low_res_logits[:, None]
        assert_parity(ours, reference_best(predictor, box=boxes, mask_input=mask_input, multimask_output=multimask))
    # One prompt (a click refining an object: its own fast path) with a positive and a negative point.
    click = {"point_coords": np.array([[100, 140], [60, 40]], np.float32), "point_labels": np.array([1, 0])}
    ours = engine.predict(
        emb,
        points=click["point_coords"][None],
        point_labels=click["point_labels"][None],
        mask_input=first.low_res_logits[:1],
        multimask_output=False,
    )
    assert_parity(ours, reference_best(predictor, **click, mask_input=first.low_res_logits[:1], multimask_output=False))


@pytest.mark.parametrize("hole, sprinkle", [(60, 0), (0, 60), (400, 400)])
def test_hole_and_sprinkle_removal_match_the_reference(make_checkpoint, monkeypatch, hole, sprinkle):
    """``max_hole_area`` / ``max_sprinkle_area`` equal Meta's predictor built with the same values, its
    CUDA connected-components kernel replaced by an equivalent CPU one."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    calls = []

    def kernel(mask):
        calls.append(mask.shape)
        return connected_components(mask)

    monkeypatch.setattr("sam2.utils.misc.get_connected_components", kernel)
    engine, _ = make_pair(make_checkpoint, "hiera_tiny", "sam2.1")
    predictor = SAM2ImagePredictor(
        build_reference(get_spec("hiera_tiny", "sam2.1")), max_hole_area=hole, max_sprinkle_area=sprinkle
    )
    hw, boxes, points, labels = SCENES["odd_333x517"]
    image = random_image(*hw, seed=11)
    predictor.set_image(image)
    emb = engine.embed([image])[0]
    boxes = np.asarray(boxes, np.float32)
    ours = engine.predict(emb, boxes=boxes, max_hole_area=hole, max_sprinkle_area=sprinkle)
    assert_parity(ours, reference_best(predictor, box=boxes))
    assert calls, "the reference did not run its post-processing"
    plain = engine.predict(emb, boxes=boxes)
    assert any(mask_iou(a, b) < 1.0 for a, b in zip(ours.masks, plain.masks)), "nothing was removed: proves nothing"
    np.testing.assert_array_equal(ours.low_res_logits, plain.low_res_logits)  # logits are returned as decoded


@pytest.mark.parametrize("multimask", [True, False])
def test_fused_decoder_equals_transformers_decoder(tiny_checkpoint, multimask):
    """Many prompts (several chunks), clicks, boxes with clicks and mask inputs: the fused decoder
    gives the reference decoder's logits within float32 rounding."""
    from sam2flow.engine.engine import DECODE_CHUNK
    from sam2flow.engine.prompts import PromptArrays

    fused = Sam2Engine.from_pretrained("hiera_tiny", checkpoint=str(tiny_checkpoint), device="cpu", dtype="float32")
    plain = Sam2Engine.from_pretrained(
        "hiera_tiny", checkpoint=str(tiny_checkpoint), device="cpu", dtype="float32", fused_decoder=False
    )
    image = random_image(300, 500, seed=5)
    emb = fused.embed([image])[0]
    rng = np.random.default_rng(1)
    n = 2 * DECODE_CHUNK + 3
    xy = rng.uniform(0, 300, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 200, (n, 2))], 1).astype(np.float32)
    clicks = rng.uniform(0, 300, (n, 2, 2)).astype(np.float32)
    labels = rng.integers(0, 2, (n, 2)).astype(np.int32)
    masks_in = rng.normal(0, 4, (n, 1, 256, 256)).astype(np.float32)
    for prompts in (
        PromptArrays(boxes, None, None, None),
        PromptArrays(None, clicks, labels, None),
        PromptArrays(boxes, clicks, labels, None),
        PromptArrays(boxes, None, None, masks_in),
    ):
        got_logits, got_iou = fused.decode_low_res(emb, prompts, multimask)
        want_logits, want_iou = plain.decode_low_res(emb, prompts, multimask)
        assert got_logits.shape == want_logits.shape == (n, 3 if multimask else 1, 256, 256)
        assert torch.allclose(got_logits, want_logits, atol=1e-4, rtol=0)
        assert torch.allclose(got_iou, want_iou, atol=1e-5, rtol=0)
        assert ((got_logits > 0) != (want_logits > 0)).float().mean() < 1e-5


def test_batched_embedding_matches_single(tiny_engine):
    """Images of different sizes embedded in one batch equal the same images embedded alone."""
    images = [random_image(240, 320, 1), random_image(333, 517, 2), random_image(512, 200, 3)]
    tiny_engine.cache.clear()
    together = tiny_engine.embed(images, use_cache=False)
    for image, emb in zip(images, together):
        alone = tiny_engine.embed([image], use_cache=False)[0]
        assert alone.original_size == emb.original_size == image.shape[:2]
        assert torch.allclose(alone.image_embed, emb.image_embed, atol=1e-4)


@pytest.mark.large
@pytest.mark.parametrize(
    "family, version",
    [("sam2.1", "hiera_small"), ("sam2.1", "hiera_b_plus"), ("sam2.1", "hiera_large"), ("sam2", "hiera_small")],
)
def test_larger_sizes_parity(make_checkpoint, version, family):
    """One image per size: many boxes, and boxes with clicks. Every size in SAM 2.1; SAM 2's image path
    has 2.1's architecture (only video-memory weights differ: models/registry.py), so besides the full
    tiny battery above one more size of it is enough (hiera_large in both families cost ~80 s in CI)."""
    engine, predictor = make_pair(make_checkpoint, version, family)
    hw, boxes, points, labels = SCENES["odd_333x517"]
    run_battery(engine, predictor, random_image(*hw, seed=7), boxes, points, labels, full=False)
