"""Unprompted mode: parity with Meta's SAM2AutomaticMaskGenerator on the same random weights, and
the filters' contracts (thresholds, order, boxes, NMS, config checks).

Random weights give flat logits (about ±0.3), so the parity settings use a mask threshold of 0.2
and a small stability offset: at the reference's defaults every candidate would fail the filters.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sam2flow.engine.automatic import AutomaticConfig, AutomaticResult, box_nms, generate_masks, point_grid
from sam2flow.models.registry import get_spec

from conftest import build_reference, connected_components, mask_iou

IOU_BAR = 0.999
SCORE_TOL = 1e-4

# Loosened for random weights; crop_n_layers=0 on the reference side (its default too).
PARITY = dict(
    points_per_side=6,
    pred_iou_thresh=0.5,
    stability_score_thresh=0.05,
    stability_score_offset=0.02,
    mask_threshold=0.2,
    box_nms_thresh=0.7,
)


def shapes_image(h: int = 200, w: int = 296) -> np.ndarray:
    """Three flat shapes on a dark background: random weights give masks of varied extent."""
    im = np.full((h, w, 3), 20, np.uint8)
    im[h // 8 : h // 2, w // 8 : w // 2] = (250, 30, 30)
    yy, xx = np.mgrid[:h, :w]
    im[(yy - 0.7 * h) ** 2 + (xx - 0.7 * w) ** 2 < (0.2 * min(h, w)) ** 2] = (30, 240, 60)
    im[int(0.6 * h) : int(0.9 * h), int(0.1 * w) : int(0.3 * w)] = (240, 240, 240)
    return im


@pytest.fixture(scope="module")
def scene(tiny_engine):
    image = shapes_image()
    return image, tiny_engine.embed([image])[0]


@pytest.fixture(scope="module")
def ours(tiny_engine, scene):
    """Our results per settings, memoised: several tests look at the same run."""
    memo: dict[tuple, AutomaticResult] = {}

    def run(**kw) -> AutomaticResult:
        key = tuple(sorted(kw.items()))
        if key not in memo:
            memo[key] = generate_masks(tiny_engine, scene[1], AutomaticConfig(**kw))
        return memo[key]

    return run


def reference(image, **kw) -> list[dict]:
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    gen = SAM2AutomaticMaskGenerator(build_reference(get_spec("hiera_tiny", "sam2.1")), crop_n_layers=0, **kw)
    assert gen.output_mode == "binary_mask"  # its default: 'segmentation' is an (H, W) bool array
    anns = gen.generate(image)
    return sorted(anns, key=lambda a: -a["predicted_iou"])  # it returns NMS order; sort to be sure


def assert_matches(result: AutomaticResult, anns: list[dict]) -> None:
    assert len(result) == len(anns)
    for i, a in enumerate(anns):
        assert mask_iou(result.masks[i], a["segmentation"]) >= IOU_BAR, f"mask {i}"
        assert abs(result.scores[i] - a["predicted_iou"]) <= SCORE_TOL, f"mask {i}"
        assert abs(result.stability[i] - a["stability_score"]) <= SCORE_TOL, f"mask {i}"
        x, y, w, h = a["bbox"]  # XYWH of the reference's inclusive xyxy box
        np.testing.assert_array_equal(result.boxes[i], [x, y, x + w, y + h], err_msg=f"mask {i}")
        np.testing.assert_allclose(result.points[i], a["point_coords"][0], atol=1e-3, err_msg=f"mask {i}")


def test_point_grid_is_the_references():
    from sam2.utils.amg import build_point_grid

    for n, hw in ((1, (10, 20)), (8, (200, 296)), (32, (333, 517))):
        expected = (build_point_grid(n) * np.array(hw)[None, ::-1]).astype(np.float32)
        np.testing.assert_array_equal(point_grid(n, hw), expected)


def test_parity_with_reference(ours, scene):
    image, _ = scene
    result = ours(**PARITY)
    assert len(result) >= 3, "too few masks for the comparison to prove anything"
    assert len({tuple(b) for b in result.boxes.tolist()}) >= 3
    assert_matches(result, reference(image, **PARITY))


def test_parity_single_mask_output(ours, scene):
    image, _ = scene
    kw = {**PARITY, "points_per_side": 4, "multimask_output": False}
    result = ours(**kw)
    assert len(result) >= 1
    assert_matches(result, reference(image, **kw))


def test_parity_min_mask_region_area(ours, scene, monkeypatch):
    """Hole and speck removal matches the reference's predictor where its CUDA kernel exists."""
    pytest.importorskip("scipy.ndimage")
    calls = []

    def kernel(mask):
        calls.append(mask.shape)
        return connected_components(mask)

    monkeypatch.setattr("sam2.utils.misc.get_connected_components", kernel)
    image, _ = scene
    kw = {**PARITY, "min_mask_region_area": 200}
    result = ours(**kw)
    plain = ours(**PARITY)
    assert len(result) >= 3
    changed = len(result) != len(plain) or any(mask_iou(a, b) < 1.0 for a, b in zip(result.masks, plain.masks))
    assert changed, "the region filter changed nothing: the comparison proves nothing"
    assert_matches(result, reference(image, **kw))
    assert calls, "the reference did not run its region filter"


def test_filters_order_boxes_and_nms(ours):
    cfg = AutomaticConfig(**PARITY)
    r = ours(**PARITY)
    k = len(r)
    assert r.masks.dtype == bool and r.masks.shape == (k, 200, 296)
    assert r.scores.shape == r.stability.shape == (k,) and r.boxes.shape == (k, 4) and r.points.shape == (k, 2)
    assert (r.scores > cfg.pred_iou_thresh).all()
    assert (r.stability >= cfg.stability_score_thresh).all()
    assert (np.diff(r.scores) <= 0).all(), "not sorted by decreasing score"
    for i, m in enumerate(r.masks):  # each box is its mask's first/last pixel column and row
        ys, xs = np.nonzero(m)
        np.testing.assert_array_equal(r.boxes[i], [xs.min(), ys.min(), xs.max(), ys.max()])
    from torchvision.ops import box_iou

    iou = box_iou(torch.from_numpy(r.boxes), torch.from_numpy(r.boxes)).numpy()
    np.fill_diagonal(iou, 0)
    assert (iou <= cfg.box_nms_thresh).all()


def test_impossible_threshold_gives_empty_result(ours):
    r = ours(points_per_side=2, pred_iou_thresh=1.01)
    assert len(r) == 0
    assert r.masks.shape == (0, 200, 296) and r.masks.dtype == bool
    assert r.scores.shape == r.stability.shape == (0,)
    assert r.boxes.shape == (0, 4) and r.points.shape == (0, 2)


def test_batch_size_does_not_change_results(ours):
    kw = {**PARITY, "points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}
    a, b = ours(**kw, points_per_batch=64), ours(**kw, points_per_batch=5)
    assert len(a) == len(b) == 16 * 3  # no filter removes anything: every candidate of every click
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    np.testing.assert_array_equal(a.points, b.points)
    assert (np.diff(a.scores) <= 0).all()
    # NMS at the usual threshold removes some of these overlapping candidates
    assert 0 < len(box_nms(a.boxes, a.scores, 0.7)) < len(a)


def test_box_nms_matches_torchvision():
    from torchvision.ops import nms

    rng = np.random.default_rng(0)
    for n in (0, 1, 50, 400):
        xy = rng.integers(0, 300, (n, 2))
        wh = rng.integers(0, 120, (n, 2))  # some zero-area boxes
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        scores = rng.random(n).astype(np.float32)
        for thr in (0.0, 0.3, 0.7, 1.0):
            expected = nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).numpy()
            np.testing.assert_array_equal(box_nms(boxes, scores, thr), expected)


@pytest.mark.parametrize(
    "field, value",
    [
        ("points_per_side", 0),
        ("points_per_side", 2.5),
        ("points_per_side", True),
        ("points_per_batch", 0),
        ("pred_iou_thresh", -0.1),
        ("pred_iou_thresh", float("nan")),
        ("stability_score_thresh", -1),
        ("stability_score_offset", -0.5),
        ("mask_threshold", float("inf")),
        ("box_nms_thresh", 1.5),
        ("box_nms_thresh", -0.1),
        ("min_mask_region_area", -1),
        ("min_mask_region_area", 1.5),
        ("multimask_output", "yes"),
    ],
)
def test_bad_config_raises(field, value):
    with pytest.raises(ValueError, match=field):
        AutomaticConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(AutomaticConfig(), **{field: value})


def test_defaults_are_the_references():
    import inspect

    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    ref = inspect.signature(SAM2AutomaticMaskGenerator.__init__).parameters
    for f in dataclasses.fields(AutomaticConfig):
        assert f.default == ref[f.name].default, f.name
    assert ref["crop_n_layers"].default == 0  # the only crop setting we implement


def test_config_type_checked(tiny_engine, scene):
    with pytest.raises(ValueError, match="AutomaticConfig"):
        generate_masks(tiny_engine, scene[1], {"points_per_side": 4})
