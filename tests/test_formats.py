"""Tests for sam2flow.formats: COCO RLE, polygons and the JSON prediction format."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
import supervision as sv

from sam2flow.formats import (
    cxcywh_to_xyxy,
    detections_to_predictions,
    mask_iou,
    mask_to_polygons,
    mask_to_rle,
    polygons_to_mask,
    predictions_to_detections,
    rle_to_mask,
    xyxy_to_cxcywh,
)

# pycocotools' own Cython decode trips a NumPy 2 copy-keyword DeprecationWarning.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

H, W = 333, 517


def ellipse(center, axes, angle, hw=(H, W)) -> np.ndarray:
    canvas = np.zeros(hw, dtype=np.uint8)
    cv2.ellipse(canvas, center, axes, angle, 0, 360, 1, thickness=-1)
    return canvas.astype(bool)


def rotated_rect(center, size, angle, hw=(H, W)) -> np.ndarray:
    canvas = np.zeros(hw, dtype=np.uint8)
    corners = cv2.boxPoints((center, size, angle))
    cv2.fillPoly(canvas, [np.rint(corners).astype(np.int32)], 1)
    return canvas.astype(bool)


SHAPES = {
    "ellipse_small": ellipse((100, 80), (12, 7), 20),
    "ellipse_large": ellipse((260, 170), (200, 120), 35),
    "ellipse_thin": ellipse((300, 100), (90, 4), 70),
    "rect_rotated": rotated_rect((250, 160), (180, 60), 27.5),
    "rect_small": rotated_rect((60, 60), (25, 14), 60),
    "rect_border": rotated_rect((10, 10), (140, 90), 15),  # clipped by the image border
}


def occluded_ellipse() -> np.ndarray:
    """An ellipse cut in two by a vertical occluder bar."""
    mask = ellipse((260, 170), (180, 90), 10)
    mask[:, 240:275] = False
    return mask


def make_detections(masks: np.ndarray) -> sv.Detections:
    xyxy = np.array([sv.mask_to_xyxy(m[None])[0] for m in masks], dtype=np.float64)
    return sv.Detections(
        xyxy=xyxy,
        mask=masks,
        confidence=np.array([0.91, 0.5, 0.123456789])[: len(masks)],
        class_id=np.array([3, 0, 7])[: len(masks)],
        data={
            "class_name": np.array(["dog", "cat", "car"])[: len(masks)],
            "detection_id": np.array(["d0", "d1", "d2"], dtype=object)[: len(masks)],
            "parent_id": np.array(["img-1", None, "img-1"], dtype=object)[: len(masks)],
        },
    )


# ---------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------


def test_box_conversions_round_trip():
    xyxy = np.array([[10.0, 20.0, 110.0, 70.0], [0.5, 0.5, 1.5, 3.5]])
    cxcywh = xyxy_to_cxcywh(xyxy)
    np.testing.assert_allclose(cxcywh, [[60, 45, 100, 50], [1, 2, 1, 3]])
    np.testing.assert_allclose(cxcywh_to_xyxy(cxcywh), xyxy)
    assert xyxy_to_cxcywh(np.empty((0, 4))).shape == (0, 4)
    assert cxcywh_to_xyxy([]).shape == (0, 4)
    with pytest.raises(ValueError, match="shape"):
        xyxy_to_cxcywh(np.zeros((2, 3)))


# ---------------------------------------------------------------------------
# Mask IoU
# ---------------------------------------------------------------------------


def test_mask_iou_counts_pixels_and_broadcasts():
    a, b = SHAPES["ellipse_large"], SHAPES["rect_rotated"]
    want = (a & b).sum() / (a | b).sum()  # the definition, on pycocotools' side too:
    coco = mask_utils.iou(
        [mask_utils.encode(np.asfortranarray(a.astype(np.uint8)))],
        [mask_utils.encode(np.asfortranarray(b.astype(np.uint8)))],
        [0],
    )[0, 0]
    assert 0.1 < want < 0.9 and mask_iou(a, b) == pytest.approx(want) == pytest.approx(coco)
    assert mask_iou(a.astype(np.uint8) * 255, a) == 1.0  # non-zero is True
    empty = np.zeros((H, W), bool)
    assert mask_iou(empty, empty) == 1.0 and mask_iou(empty, a) == 0.0
    stack = np.stack([a, b, empty])
    np.testing.assert_allclose(mask_iou(stack, stack[::-1]), [mask_iou(a, empty), 1.0, mask_iou(empty, a)])
    np.testing.assert_allclose(mask_iou(stack, a), [1.0, want, 0.0])  # (N, H, W) against one (H, W)
    torch = pytest.importorskip("torch")
    got = mask_iou(torch.from_numpy(stack), torch.from_numpy(a))
    assert got.dtype == torch.float32 and np.allclose(got.numpy(), [1.0, want, 0.0])


# ---------------------------------------------------------------------------
# RLE
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((H, W), dtype=bool),
        np.ones((H, W), dtype=bool),
        SHAPES["ellipse_large"],
        SHAPES["rect_border"],
        np.random.default_rng(0).random((H, W)) < 0.5,
        np.random.default_rng(1).random((7, 3)) < 0.3,
    ],
    ids=["empty", "full", "ellipse", "touching_border", "noise", "tiny"],
)
def test_rle_round_trip_is_exact(mask):
    rle = mask_to_rle(mask)
    assert rle["size"] == list(mask.shape)
    assert isinstance(rle["counts"], str)
    json.dumps(rle)  # JSON-ready
    decoded = rle_to_mask(rle)
    assert decoded.dtype == bool and decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, mask)


def test_rle_all_borders_touching_mask():
    mask = np.zeros((H, W), dtype=bool)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    mask[0, 0] = False  # starts with a background run of 1
    np.testing.assert_array_equal(rle_to_mask(mask_to_rle(mask)), mask)


def test_rle_counts_match_pycocotools():
    mask = SHAPES["rect_rotated"] | SHAPES["ellipse_small"]
    expected = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle = mask_to_rle(mask)
    assert rle["counts"] == expected["counts"].decode("ascii")
    assert rle["size"] == list(expected["size"]) == [H, W]
    # pycocotools can decode ours, and we decode theirs (bytes counts).
    np.testing.assert_array_equal(mask_utils.decode({**rle}).astype(bool), mask)
    np.testing.assert_array_equal(rle_to_mask(expected), mask)


def test_rle_accepts_uncompressed_counts():
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 2:4] = True  # column-major runs: 9 off, 2 on, 2 off, 2 on, 5 off
    np.testing.assert_array_equal(rle_to_mask({"size": [4, 5], "counts": [9, 2, 2, 2, 5]}), mask)


def test_rle_accepts_non_bool_masks():
    mask = np.zeros((5, 6), dtype=np.uint8)
    mask[2:4, 1:5] = 255
    np.testing.assert_array_equal(rle_to_mask(mask_to_rle(mask)), mask > 0)


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 4), bool), np.zeros(5, bool)])
def test_mask_to_rle_rejects_non_2d(bad):
    with pytest.raises(ValueError, match="2-D"):
        mask_to_rle(bad)


@pytest.mark.parametrize(
    "rle, field",
    [
        ({"size": [4], "counts": "0"}, "size"),
        ({"size": "4x5", "counts": "0"}, "size"),
        ({"size": [4.0, 5], "counts": "0"}, "size"),
        ({"size": [-1, 5], "counts": "0"}, "size"),
        ({"counts": "0"}, "size"),
        ({"size": [4, 5], "counts": 17}, "counts"),
        ({"size": [4, 5]}, "counts"),
        ({"size": [4, 5], "counts": "zz"}, "counts"),  # invalid characters
        ({"size": [4, 5], "counts": "4"}, "counts"),  # too few pixels
        ({"size": [4, 5], "counts": [9, 2, 2]}, "counts"),  # too few pixels
        ({"size": [4, 5], "counts": [25, -5]}, "counts"),  # negative run
        ({"size": [4, 5], "counts": "9"}, "counts"),  # ends mid-number
    ],
)
def test_rle_to_mask_validates(rle, field):
    with pytest.raises(ValueError, match=field):
        rle_to_mask(rle)


def test_rle_to_mask_rejects_non_dict():
    with pytest.raises(ValueError, match="dict"):
        rle_to_mask("0")


# ---------------------------------------------------------------------------
# Polygons
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_polygon_round_trip_iou(name):
    mask = SHAPES[name]
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 1
    assert polygons[0].dtype == np.float64 and polygons[0].shape[1] == 2
    assert mask_iou(polygons_to_mask(polygons, H, W), mask) >= 0.98


def test_polygon_convention_is_pixel_centres():
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:6, 3:8] = True  # rows 2..5, columns 3..7
    (outline,) = mask_to_polygons(mask)
    assert outline[:, 0].min() == 3 and outline[:, 0].max() == 7
    assert outline[:, 1].min() == 2 and outline[:, 1].max() == 5
    np.testing.assert_array_equal(polygons_to_mask([outline], 10, 10), mask)
    # A hand-written square with pixel-centre corners covers those pixels inclusively.
    square = polygons_to_mask([[[1, 1], [4, 1], [4, 4], [1, 4]]], 6, 6)
    assert square.sum() == 16 and square[1:5, 1:5].all()


def test_polygon_round_trip_beats_half_pixel_offsets():
    """The chosen convention (no offset) is the tightest of 0 / +0.5 / -0.5 px."""
    mask = SHAPES["rect_rotated"]
    polygons = mask_to_polygons(mask)
    scores = {
        offset: mask_iou(polygons_to_mask([p + offset for p in polygons], H, W), mask) for offset in (0.0, 0.5, -0.5)
    }
    assert scores[0.0] == max(scores.values()) == 1.0


def test_polygon_two_parts_largest_first():
    mask = occluded_ellipse()
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 2
    areas = [cv2.contourArea(p.astype(np.float32)) for p in polygons]
    assert areas[0] >= areas[1] > 0
    assert mask_iou(polygons_to_mask(polygons, H, W), mask) >= 0.98
    # Each outline lies on its own side of the occluder (columns 240..274).
    sides = sorted((p[:, 0].max() < 240, p[:, 0].min() >= 275) for p in polygons)
    assert sides == [(False, True), (True, False)]


def test_polygons_drop_specks_and_empty_masks():
    mask = np.zeros((20, 20), dtype=bool)
    assert mask_to_polygons(mask) == []
    mask[5, 5] = True  # 1 pixel: 1-point outline
    mask[10, 10:12] = True  # 2 pixels: 2-point outline
    assert mask_to_polygons(mask) == []
    mask[15:18, 15:18] = True
    assert len(mask_to_polygons(mask)) == 1


def test_polygons_to_mask_ignores_short_polygons_and_validates():
    assert not polygons_to_mask([[[1, 1], [3, 3]], []], 5, 5).any()
    with pytest.raises(ValueError, match="shape"):
        polygons_to_mask([[1, 2, 3]], 5, 5)
    with pytest.raises(ValueError, match="non-finite"):
        polygons_to_mask([[[1, 1], [3, float("nan")], [3, 1]]], 5, 5)
    with pytest.raises(ValueError, match="height and width"):
        polygons_to_mask([], -1, 5)
    with pytest.raises(ValueError, match="2-D"):
        mask_to_polygons(np.zeros((1, 4, 4), bool))


# ---------------------------------------------------------------------------
# Detections <-> predictions
# ---------------------------------------------------------------------------


def assert_same_detections(actual: sv.Detections, expected: sv.Detections, min_iou: float):
    np.testing.assert_allclose(actual.xyxy, expected.xyxy, atol=1e-9)
    np.testing.assert_allclose(actual.confidence, expected.confidence)
    np.testing.assert_array_equal(actual.class_id, expected.class_id)
    for key in ("class_name", "detection_id", "parent_id"):
        assert list(actual.data[key]) == list(expected.data[key]), key
        assert actual.data[key].dtype == object
    assert actual.mask.shape == expected.mask.shape
    for got, want in zip(actual.mask, expected.mask, strict=True):
        assert mask_iou(got, want) >= min_iou


def test_polygon_predictions_round_trip():
    masks = np.stack([SHAPES["ellipse_large"], occluded_ellipse(), SHAPES["rect_small"]])
    detections = make_detections(masks)
    predictions = detections_to_predictions(detections)
    predictions = json.loads(json.dumps(predictions))  # survives JSON

    first, split, _ = predictions
    assert first["class"] == "dog" and first["class_id"] == 3
    assert first["detection_id"] == "d0" and first["parent_id"] == "img-1"
    assert "parent_id" not in split
    assert "polygons" not in first and len(first["points"]) > 3
    assert set(first["points"][0]) == {"x", "y"}
    assert len(split["polygons"]) == 2  # occluded shape: one detection, two parts
    assert split["points"] == [{"x": x, "y": y} for x, y in split["polygons"][0]]
    box = xyxy_to_cxcywh(detections.xyxy[:1])[0]
    assert [first[k] for k in ("x", "y", "width", "height")] == pytest.approx(box.tolist())

    back = predictions_to_detections(predictions, image_hw=(H, W))
    assert_same_detections(back, detections, min_iou=0.98)
    assert back.data["parent_id"][1] is None


def test_rle_predictions_round_trip_is_exact():
    masks = np.stack([SHAPES["ellipse_thin"], occluded_ellipse()])
    detections = make_detections(masks)
    predictions = json.loads(json.dumps(detections_to_predictions(detections, "rle")))
    assert all("points" not in p and "polygons" not in p for p in predictions)
    assert predictions[0]["rle"]["size"] == [H, W]
    back = predictions_to_detections(predictions)  # size comes from the rle
    assert_same_detections(back, detections, min_iou=1.0)
    np.testing.assert_array_equal(back.mask, masks)


def test_compact_mask_detections():
    masks = np.stack([SHAPES["ellipse_small"], SHAPES["rect_rotated"]])
    dense = make_detections(masks)
    compact = make_detections(masks)
    compact.mask = sv.CompactMask.from_dense(masks, compact.xyxy, image_shape=(H, W))
    assert detections_to_predictions(compact, "rle") == detections_to_predictions(dense, "rle")


def test_predictions_without_masks_or_optional_fields():
    detections = sv.Detections(xyxy=np.array([[0.0, 0.0, 10.0, 20.0], [5, 5, 6, 6]]))
    predictions = detections_to_predictions(detections, "rle")
    for index, prediction in enumerate(predictions):
        assert prediction["confidence"] is None
        assert prediction["class_id"] == index and prediction["class"] == str(index)
        assert isinstance(prediction["detection_id"], str) and prediction["detection_id"]
        assert not {"points", "polygons", "rle", "parent_id"} & set(prediction)
    assert predictions[0]["detection_id"] != predictions[1]["detection_id"]
    back = predictions_to_detections(predictions, image_hw=(30, 30))
    assert back.mask is None and back.confidence is None
    np.testing.assert_allclose(back.xyxy, detections.xyxy)
    assert list(back.data["class_name"]) == ["0", "1"]
    assert "parent_id" not in back.data


def test_mask_format_is_validated():
    with pytest.raises(ValueError, match="mask_format"):
        detections_to_predictions(sv.Detections.empty(), "coco")


def test_empty_round_trip():
    assert detections_to_predictions(sv.Detections.empty()) == []
    for empty in ([], {"predictions": []}, {"image": {"width": 4, "height": 3}, "predictions": []}):
        detections = predictions_to_detections(empty)
        assert len(detections) == 0
        assert detections.xyxy.shape == (0, 4)


def test_enclosing_dict_gives_image_size():
    mask = SHAPES["rect_small"]
    (prediction,) = detections_to_predictions(make_detections(mask[None]))
    payload = {"image": {"width": W, "height": H}, "predictions": [prediction]}
    detections = predictions_to_detections(payload)
    assert detections.mask.shape == (1, H, W)
    assert mask_iou(detections.mask[0], mask) >= 0.98
    assert predictions_to_detections({"predictions": [prediction]}).mask is None
    with pytest.raises(ValueError, match="image_hw"):
        predictions_to_detections(payload, image_hw=(H + 1, W))
    with pytest.raises(ValueError, match="image height/width"):
        predictions_to_detections({"image": {"width": W}, "predictions": []})
    with pytest.raises(ValueError, match="'predictions'"):
        predictions_to_detections({"image": {"width": W, "height": H}})


def test_parse_defaults():
    predictions = [
        {"x": 5, "y": 5, "width": 2, "height": 4, "confidence": 0.3},
        {"x": 1, "y": 1, "width": 0, "height": 0, "confidence": 1, "class": "cat", "class_id": 2.0},
        {"x": 8, "y": 8, "width": 2, "height": 2, "confidence": 0.8, "points": []},
    ]
    detections = predictions_to_detections(predictions, image_hw=(10, 10))
    np.testing.assert_array_equal(detections.class_id, [0, 2, 2])
    assert list(detections.data["class_name"]) == ["0", "cat", "2"]
    np.testing.assert_allclose(detections.xyxy[0], [4, 3, 6, 7])
    # Only the third has a mask source: the others get empty masks; points=[] is empty too.
    assert detections.mask.shape == (3, 10, 10) and not detections.mask.any()
    assert "detection_id" not in detections.data


BASE = {"x": 10, "y": 10, "width": 4, "height": 4, "confidence": 0.5, "class": "a", "class_id": 0}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"x": None}, "'x'"),
        ({"y": "3"}, "'y'"),
        ({"width": float("nan")}, "'width'"),
        ({"height": float("inf")}, "'height'"),
        ({"width": -1}, "'width'"),
        ({"height": -0.5}, "'height'"),
        ({"x": True}, "'x'"),
        ({"confidence": "high"}, "'confidence'"),
        ({"confidence": float("nan")}, "'confidence'"),
        ({"class": 3}, "'class'"),
        ({"class_id": 1.5}, "'class_id'"),
        ({"class_id": "1"}, "'class_id'"),
        ({"detection_id": 7}, "'detection_id'"),
        ({"parent_id": ["p"]}, "'parent_id'"),
        ({"points": [{"x": 1}]}, "'points'"),
        ({"points": {"x": 1, "y": 2}}, "'points'"),
        ({"polygons": [[1, 2, 3]]}, "'polygons'"),
        ({"polygons": "none"}, "'polygons'"),
        ({"rle": {"size": [20, 20], "counts": 5}}, "'rle'"),
        ({"rle": {"size": [20, 20], "counts": "0"}}, "'rle'"),
        ({"rle": {"size": [21, 20], "counts": mask_to_rle(np.zeros((21, 20)))["counts"]}}, "'rle'"),
    ],
)
def test_prediction_validation_names_index_and_field(change, field):
    predictions = [dict(BASE), {**BASE, **change}]
    with pytest.raises(ValueError) as info:
        predictions_to_detections(predictions, image_hw=(20, 20))
    message = str(info.value)
    assert "prediction 1" in message and field in message, message


@pytest.mark.parametrize("key", ["x", "y", "width", "height"])
def test_missing_box_field(key):
    prediction = {k: v for k, v in BASE.items() if k != key}
    with pytest.raises(ValueError, match=f"prediction 0: missing '{key}'"):
        predictions_to_detections([prediction])


def test_mixed_confidence_and_bad_containers():
    with pytest.raises(ValueError, match="prediction 1: 'confidence'"):
        predictions_to_detections([dict(BASE), {**BASE, "confidence": None}])
    with pytest.raises(ValueError, match="prediction 0 must be a dict"):
        predictions_to_detections([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="predictions must be a list"):
        predictions_to_detections("[]")
    with pytest.raises(ValueError, match="image_hw"):
        predictions_to_detections([], image_hw=(10,))


def test_confidence_none_written_as_null():
    detections = sv.Detections(xyxy=np.array([[1.0, 2.0, 3.0, 4.0]]), class_id=np.array([4]))
    (prediction,) = detections_to_predictions(detections)
    assert json.loads(json.dumps(prediction))["confidence"] is None
    assert prediction["class"] == "4"
    assert not math.isnan(prediction["x"])
