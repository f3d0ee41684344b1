"""Bad input gets a clear ValueError naming the problem; odd but valid input is converted."""

from __future__ import annotations

import numpy as np
import pytest

from sam2flow import Prompt
from sam2flow.engine import transforms as T
from sam2flow.engine.prompts import check_boxes

from conftest import mask_iou, random_image

H, W = 120, 160
IMAGE = random_image(H, W, seed=21)  # shared with test_cache / test_loading: one embedding
BOX = np.array([[10, 12, 110, 100]], np.float32)


@pytest.fixture(scope="module")
def emb(tiny_engine):
    return tiny_engine.embed([IMAGE])[0]


def _same(a, b, exact=True):
    assert a.masks.shape == b.masks.shape and a.masks.dtype == bool
    if exact:
        np.testing.assert_array_equal(a.masks, b.masks)
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.low_res_logits, b.low_res_logits)
    else:  # the same prompt decoded in a batch of another size: float rounding only
        for m, n in zip(a.masks, b.masks):
            assert mask_iou(m, n) >= 0.999
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
        np.testing.assert_allclose(a.low_res_logits, b.low_res_logits, atol=1e-3)


# ---- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((0, 10), np.uint8), "empty"),
        (np.zeros((0, 10, 3), np.uint8), "empty"),
        (np.zeros((10, 0, 3), np.uint8), "empty"),
        (np.zeros((10, 10, 2), np.uint8), r"unsupported shape \(10, 10, 2\)"),
        (np.zeros((10, 10, 3, 1), np.uint8), r"unsupported shape \(10, 10, 3, 1\)"),
        (np.zeros((10,), np.uint8), "unsupported shape"),
        (np.zeros((10, 10, 0), np.uint8), "unsupported shape"),
        (np.zeros((10, 10, 3), np.float32), "uint8.*float32"),
        (np.full((10, 10, 3), 0.5), "uint8.*float64"),
        (np.full((10, 10, 3), 300, np.int16), "uint8"),
        (np.full((10, 10, 3), -1, np.int32), "uint8"),
        (np.zeros((10, 10, 3), bool), "uint8"),
        ([[[0, 0, 0]]], "numpy array.*list"),
        (None, "numpy array.*NoneType"),
    ],
    ids=[
        "empty-2d",
        "empty-h",
        "empty-w",
        "2-channels",
        "4d",
        "1d",
        "0-channels",
        "float32",
        "float01",
        "int-over-255",
        "negative",
        "bool",
        "list",
        "none",
    ],
)
def test_bad_image(tiny_engine, image, match):
    with pytest.raises(ValueError, match=match):
        tiny_engine.embed([image])
    with pytest.raises(ValueError, match=match):
        tiny_engine.segment(image, boxes=BOX)


def test_bad_image_is_named_by_index(tiny_engine):
    with pytest.raises(ValueError, match="image 2"):
        tiny_engine.embed([IMAGE, IMAGE, np.zeros((4, 4, 2), np.uint8)])


def test_embed_wants_a_list(tiny_engine):
    with pytest.raises(ValueError, match="list"):
        tiny_engine.embed(IMAGE)


def test_integer_images_in_range_are_accepted():
    out = T.as_rgb_uint8(IMAGE.astype(np.int64))
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, IMAGE)


def test_grayscale_is_replicated(tiny_engine, emb):
    gray = IMAGE.mean(axis=2).astype(np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(T.as_rgb_uint8(gray), rgb)
    np.testing.assert_array_equal(T.as_rgb_uint8(gray[:, :, None]), rgb)
    # Embedded independently (no cache): the same masks as the RGB image.
    g2 = tiny_engine.embed([gray], use_cache=False)[0]
    ref = tiny_engine.embed([rgb])[0]
    assert g2.original_size == (H, W)
    expected = tiny_engine.predict(ref, boxes=BOX)
    assert 0 < expected.masks.sum() < expected.masks.size
    _same(tiny_engine.predict(g2, boxes=BOX), expected)
    g3 = tiny_engine.embed([gray[:, :, None]])[0]
    assert g3.key == ref.key  # content-identical after conversion
    _same(tiny_engine.predict(g3, boxes=BOX), expected)
    # ... and not the masks of the colour image, or the comparison proves nothing.
    assert ref.key != emb.key


def test_rgba_drops_alpha(tiny_engine, emb):
    alpha = np.random.default_rng(0).integers(0, 256, (H, W, 1), dtype=np.uint8)
    rgba = np.concatenate([IMAGE, alpha], axis=2)
    np.testing.assert_array_equal(T.as_rgb_uint8(rgba), IMAGE)
    e = tiny_engine.embed([rgba])[0]
    assert e.key == emb.key and e.original_size == (H, W)
    _same(tiny_engine.predict(e, boxes=BOX), tiny_engine.predict(emb, boxes=BOX))


# ---- boxes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "boxes, match",
    [
        ([[10, 10, np.nan, 50]], "box 0 .*NaN"),
        ([[10, 10, 50, np.inf]], "box 0 .*infinite"),
        ([[50, 10, 10, 50]], "box 0 .*inverted"),
        ([[10, 50, 50, 10]], "box 0 .*inverted"),
        ([[10, 10, 10, 50]], "box 0 .*zero area"),
        ([[10, 10, 50, 10]], "box 0 .*zero area"),
        ([[170, 10, 300, 50]], f"box 0 .*outside the {W}x{H} image"),
        ([[10, 130, 50, 200]], "outside"),
        ([[-50, -50, -10, -10]], "outside"),
        ([[160, 10, 200, 50]], "outside"),  # starts on the right edge: no pixel inside
        ([[10, 10, 50, 50], [60, 60, 20, 80]], "box 1 .*inverted"),
        ([[1, 2, 3]], r"shape \(N, 4\).*\(1, 3\)"),
        ([1, 2, 3, 4, 5], r"shape \(N, 4\)"),
        (np.zeros((2, 1, 4)), r"shape \(N, 4\)"),
        ([["a", 1, 2, 3]], "numbers"),
        ([[0, 0, 1, 2], [1, 2]], "numbers"),
    ],
)
def test_bad_boxes(tiny_engine, emb, boxes, match):
    with pytest.raises(ValueError, match=match):
        tiny_engine.predict(emb, boxes=boxes)


def test_box_partly_outside_is_clipped(tiny_engine, emb):
    overhang = np.array([[-20, -10, 100, 200], [100, 50, 400, 90]], np.float32)
    clipped = np.array([[0, 0, 100, H], [100, 50, W, 90]], np.float32)
    np.testing.assert_array_equal(check_boxes(overhang, (H, W)), clipped)
    assert np.array_equal(overhang[0], [-20, -10, 100, 200]), "the caller's array was modified"
    _same(tiny_engine.predict(emb, boxes=overhang), tiny_engine.predict(emb, boxes=clipped))
    assert overhang[1, 2] == 400, "predict() clipped the caller's array in place"


def test_single_box_as_flat_list(tiny_engine, emb):
    _same(tiny_engine.predict(emb, boxes=[10, 12, 110, 100]), tiny_engine.predict(emb, boxes=BOX))


# ---- points ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "points, labels, match",
    [
        ([[40, 50]], None, "without point_labels"),
        ([[40, 50]], [2], r"0 \(negative\) or 1 \(positive\).*\[2\]"),
        ([[40, 50], [60, 60]], [1, -1], r"0 \(negative\) or 1 \(positive\).*-1"),
        ([[40, 50]], [0.5], "0 .*or 1"),
        ([[40, 50], [60, 60]], [1], "point_labels shape .* does not match"),
        ([[[40, 50], [60, 60]]], [[1, 0, 1]], "point_labels shape .* does not match"),
        ([[[40, 50]], [[60, 60]]], [[1]], "point_labels shape .* does not match"),
        ([[40, np.nan]], [1], "point prompt 0 .*NaN"),
        ([[[40, 50]], [[np.inf, 5]]], [[1], [1]], "point prompt 1 .*infinite"),
        ([40, 50], [1], r"shape \(N, P, 2\)"),
        (np.zeros((0, 2)), np.zeros(0), "P >= 1"),
        ([[40, 50, 1]], [1], r"shape \(N, P, 2\)"),
        ([["x", 50]], [1], "numbers"),
    ],
)
def test_bad_points(tiny_engine, emb, points, labels, match):
    with pytest.raises(ValueError, match=match):
        tiny_engine.predict(emb, points=points, point_labels=labels)


def test_boxes_and_points_must_pair(tiny_engine, emb):
    boxes = np.array([[10, 10, 60, 60], [50, 50, 150, 110]], np.float32)
    points = np.array([[[20, 20]], [[70, 70]], [[100, 100]]], np.float32)
    with pytest.raises(ValueError, match="2 boxes but 3 point prompts"):
        tiny_engine.predict(emb, boxes=boxes, points=points, point_labels=np.ones((3, 1)))


def test_nothing_to_predict(tiny_engine, emb):
    with pytest.raises(ValueError, match="needs boxes, points"):
        tiny_engine.predict(emb)
    with pytest.raises(ValueError, match="needs boxes, points"):
        tiny_engine.segment(IMAGE)


@pytest.mark.parametrize(
    "mask, match",
    [
        (np.zeros((1, 128, 128), np.float32), r"mask_input must have shape \(1, 256, 256\)"),
        (np.zeros((2, 256, 256), np.float32), r"mask_input must have shape \(1, 256, 256\)"),
        (np.zeros((256, 256), np.float32), "mask_input must have shape"),
        (np.zeros((1, 2, 256, 256), np.float32), "mask_input must have shape"),
        (np.full((1, 256, 256), np.nan, np.float32), "mask_input 0 .*NaN"),
    ],
    ids=["small", "count", "2d", "2-channels", "nan"],
)
def test_bad_mask_input(tiny_engine, emb, mask, match):
    with pytest.raises(ValueError, match=match):
        tiny_engine.predict(emb, boxes=BOX, mask_input=mask)


# ---- Prompt lists ---------------------------------------------------------------------------


def test_mixed_prompts_equal_each_alone(tiny_engine, emb):
    earlier = tiny_engine.predict(emb, boxes=[[60, 30, 150, 118]])
    prompts = [
        Prompt(box=[10, 12, 110, 100]),
        Prompt(points=[[40, 50], [120, 90]], labels=[1, 0]),
        Prompt(box=[60, 30, 150, 118], points=[[100, 60]], labels=[1]),
        Prompt(box=[5, 60, 70, 115]),  # a second box-only prompt: decoded with the first
        Prompt(box=[60, 30, 150, 118], mask_input=earlier.low_res_logits[0]),
        Prompt(points=[[30, 100]], labels=[1]),
    ]
    together = tiny_engine.predict_prompts(emb, prompts)
    assert together.masks.shape == (len(prompts), H, W) and together.masks.dtype == bool
    assert together.scores.shape == (len(prompts),) and together.low_res_logits.shape == (len(prompts), 256, 256)
    for i, p in enumerate(prompts):
        alone = tiny_engine.predict(
            emb,
            boxes=None if p.box is None else [p.box],
            points=None if p.points is None else [p.points],
            point_labels=None if p.labels is None else [p.labels],
            mask_input=None if p.mask_input is None else p.mask_input[None],
        )
        assert len(alone) == 1
        one = type(alone)(together.masks[i : i + 1], together.scores[i : i + 1], together.low_res_logits[i : i + 1])
        _same(one, alone, exact=False)
    # Results really differ per prompt, so an order mix-up would be caught.
    assert len({round(float(s), 4) for s in together.scores}) == len(prompts)


def test_empty_prompt_list(tiny_engine, emb):
    out = tiny_engine.predict_prompts(emb, [])
    assert len(out) == 0
    assert out.masks.shape == (0, H, W) and out.masks.dtype == bool
    assert out.scores.shape == (0,) and out.low_res_logits.shape == (0, 256, 256)


@pytest.mark.parametrize(
    "prompts, match",
    [
        ([Prompt()], "prompt 0: .*neither a box nor points"),
        ([Prompt(box=[1, 1, 50, 50]), Prompt()], "prompt 1: .*neither a box nor points"),
        ([Prompt(points=[], labels=[])], "prompt 0: .*neither a box nor points"),
        ([Prompt(points=[[10, 10]])], "prompt 0: .*points without labels"),
        (
            [Prompt(box=[1, 1, 50, 50]), Prompt(points=[[10, 10]], labels=[1]), Prompt(points=[[5, 5]])],
            "prompt 2: .*points without labels",
        ),
        ([Prompt(box=[1, 1, 50, 50], labels=[1])], "prompt 0: labels were given without points"),
        (
            [Prompt(box=[1, 1, 50, 50]), Prompt(points=[[1, 1]], labels=[1]), Prompt(box=[np.nan, 1, 5, 5])],
            "prompt 2: box .*NaN",
        ),
        ([Prompt(points=[[10, 10]], labels=[3])], r"0 \(negative\) or 1 \(positive\)"),
        ([Prompt(points=[[10, 10], [20, 20]], labels=[1])], "does not match"),
        ([Prompt(box=[50, 50, 10, 10])], "inverted"),
        ([Prompt(box=[1, 1, 50])], r"shape \(N, 4\)"),
        ([Prompt(box=[1, 1, 50, 50], mask_input=np.zeros((64, 64), np.float32))], "mask_input must have shape"),
        ([Prompt(box=[1, 1, 50, 50], mask_input=np.zeros((3, 256, 256), np.float32))], "mask_input must have shape"),
    ],
)
def test_bad_prompts(tiny_engine, emb, prompts, match):
    with pytest.raises(ValueError, match=match):
        tiny_engine.predict_prompts(emb, prompts)


def test_no_boxes_is_an_empty_prediction(tiny_engine, emb):
    """A detector that found nothing hands over an empty (0, 4) array: no masks, no error."""
    out = tiny_engine.predict(emb, boxes=np.zeros((0, 4), np.float32))
    h, w = emb.original_size
    assert out.masks.shape == (0, h, w) and out.scores.shape == (0,)
