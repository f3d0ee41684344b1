"""The ``sam2flow segment`` command, run as a user runs it: a subprocess on files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sam2flow import Sam2Engine
from sam2flow.cli import main
from sam2flow.formats import mask_to_polygons, polygons_to_mask, rle_to_mask

from conftest import mask_iou, random_image

BOXES = [[10, 20, 200, 300], [300, 40, 510, 120]]


def run_cli(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "sam2flow", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "scene.png"
    image = random_image(333, 517, seed=11)
    Image.fromarray(image).save(path)
    return path, image


@pytest.fixture(scope="module")
def expected(tiny_checkpoint, image_file):
    """The engine's own answer for the prompts the CLI tests send."""
    engine = Sam2Engine.from_pretrained(checkpoint=str(tiny_checkpoint), device="cpu")
    emb = engine.embed([image_file[1]])[0]
    return {
        "boxes": engine.predict(emb, boxes=np.array(BOXES, np.float32)),
        "box_clicks": engine.predict(
            emb, boxes=np.array(BOXES[:1], np.float32), points=[[[50, 60], [150, 250]]], point_labels=[[1, 0]]
        ),
    }


def test_boxes_rle_and_annotation(tiny_checkpoint, image_file, expected, tmp_path):
    out, png = tmp_path / "out.json", tmp_path / "ann.png"
    args = [image_file[0], "--checkpoint", tiny_checkpoint, "--format", "rle", "--out", out, "--annotate", png]
    for box in BOXES:
        args += ["--box", ",".join(map(str, box))]
    run_cli("segment", *args)
    payload = json.loads(out.read_text())
    assert payload["image"] == {"width": 517, "height": 333}
    preds = payload["predictions"]
    want = expected["boxes"]
    assert [p["class_id"] for p in preds] == [0, 1] and [p["class"] for p in preds] == ["0", "1"]
    assert len({p["detection_id"] for p in preds}) == 2
    for i, p in enumerate(preds):
        assert p["rle"]["size"] == [333, 517]
        # dtype "auto" is bf16 on a CPU with AMX: two processes' kernels may round a few edge pixels
        # apart (one CI run of many: oneDNN/MKL results can depend on memory alignment), so not bit for bit
        assert mask_iou(rle_to_mask(p["rle"]), want.masks[i]) >= 0.995
        assert p["confidence"] == pytest.approx(float(want.scores[i]), abs=2e-3)
        ys, xs = np.nonzero(want.masks[i])
        assert p["x"] == pytest.approx((xs.min() + xs.max()) / 2, abs=1)
    annotated = np.asarray(Image.open(png))
    assert annotated.shape == (333, 517, 3) and not np.array_equal(annotated, image_file[1])


def test_box_with_clicks_to_stdout_as_polygons(tiny_checkpoint, image_file, expected):
    proc = run_cli(
        "segment",
        image_file[0],
        "--checkpoint",
        tiny_checkpoint,
        "--box",
        "10,20,200,300",
        "--point",
        "50,60",
        "--point",
        "150,250,0",
    )
    preds = json.loads(proc.stdout)["predictions"]
    assert len(preds) == 1  # clicks joined the single box: one object
    p = preds[0]
    polygons = p.get("polygons") or [[[q["x"], q["y"]] for q in p["points"]]]
    # Random weights give ragged masks with holes that outlines cannot carry (test_formats checks
    # polygon fidelity on real shapes); here the CLI's outlines must be the engine mask's outlines.
    want = polygons_to_mask(mask_to_polygons(expected["box_clicks"].masks[0]), 333, 517)
    assert mask_iou(polygons_to_mask(polygons, 333, 517), want) == 1.0


def test_boxes_file_carries_classes_and_parents(tiny_checkpoint, image_file, tmp_path):
    detections = {
        "predictions": [
            {
                "x": 105,
                "y": 160,
                "width": 190,
                "height": 280,
                "class": "cat",
                "class_id": 7,
                "detection_id": "a1",
                "confidence": 0.9,
            },
            {
                "x": 405,
                "y": 80,
                "width": 210,
                "height": 80,
                "class": "dog",
                "class_id": 3,
                "detection_id": "b2",
                "confidence": 0.8,
            },
        ]
    }
    boxes = tmp_path / "dets.json"
    boxes.write_text(json.dumps(detections))
    proc = run_cli("segment", image_file[0], "--checkpoint", tiny_checkpoint, "--boxes", boxes, "--single-mask")
    preds = json.loads(proc.stdout)["predictions"]
    assert [(p["class"], p["class_id"], p["parent_id"]) for p in preds] == [("cat", 7, "a1"), ("dog", 3, "b2")]
    assert all(p["detection_id"] not in ("a1", "b2") for p in preds)


def test_threshold_drops_low_scores(tiny_checkpoint, image_file, expected):
    scores = expected["boxes"].scores
    cut = float((scores[0] + scores[1]) / 2)
    args = ["segment", image_file[0], "--checkpoint", tiny_checkpoint, "--threshold", cut]
    for box in BOXES:
        args += ["--box", ",".join(map(str, box))]
    preds = json.loads(run_cli(*args).stdout)["predictions"]
    assert [p["class_id"] for p in preds] == [int(np.argmax(scores))]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--box", "10,20,5,300"], "inverted"),
        (["--box", "1,2,3"], "--box"),
        (["--box", "a,b,c,d"], "--box"),
        (["--point", "5,6,2"], "label"),
        ([], "no prompts"),
        (["--box", "nan,2,30,40"], "NaN"),
        (["--box", "600,400,700,500"], "outside"),
        (["--boxes", "/nonexistent.json"], "nonexistent"),
    ],
)
def test_bad_input_is_one_line_on_stderr(image_file, args, message, capsys):
    # In-process (the same main() the console script runs) to keep the suite fast.
    try:
        code = main(["segment", str(image_file[0]), *args])
    except SystemExit as e:  # argparse rejects malformed values itself
        code = e.code
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert code != 0 and len(lines) == 1 and message in lines[0]
    assert "Traceback" not in err


def test_unreadable_image_and_missing_weights(tmp_path, monkeypatch):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    proc = run_cli("segment", bad, "--box", "1,2,3,4", check=False)
    assert proc.returncode == 1 and "bad.png: not a readable image" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    good = tmp_path / "good.png"
    Image.fromarray(random_image(64, 64)).save(good)
    monkeypatch.setenv("SAM2FLOW_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    proc = run_cli("segment", good, "--box", "1,2,30,40", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "sam2.1_hiera_tiny.pt" in proc.stderr and "--checkpoint" in proc.stderr
