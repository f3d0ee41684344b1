"""``sam2flow batch``: a directory in, JSON Lines out; bad files reported, interrupted runs resumed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sam2flow.engine.automatic import AutomaticConfig
from sam2flow.formats import rle_to_mask
from sam2flow.scale.batch import run_batch
from sam2flow.workflows.step import StepParameters

from conftest import random_image, write_mixed_images

BOX = {"x": 60, "y": 50, "width": 80, "height": 60, "class": "thing", "class_id": 1, "detection_id": "t1"}


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "images"
    write_mixed_images(d)
    Image.fromarray(random_image(80, 100, seed=5)).save(d / "e_rgb.jpg", quality=95)
    boxes = tmp_path / "boxes"
    boxes.mkdir()
    for stem in ("a_rgb", "b_gray", "c_rgba", "e_rgb"):
        (boxes / f"{stem}.json").write_text(json.dumps({"predictions": [BOX]}))
    return d, boxes


def read(out):
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_cli_segments_good_images_and_reports_the_bad_one(folder, tiny_checkpoint, tiny_engine, tmp_path):
    images, boxes = folder
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sam2flow",
            "batch",
            str(images),
            "--boxes",
            str(boxes),
            "--out",
            str(out),
            "--checkpoint",
            str(tiny_checkpoint),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--batch-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    records = {r["file"]: r for r in read(out)}
    assert set(records) == {"a_rgb.png", "b_gray.png", "c_rgba.png", "d_corrupt.png", "e_rgb.jpg"}
    assert "error" in records["d_corrupt.png"] and "d_corrupt.png" in proc.stderr
    assert "4 segmented, 1 failed" in proc.stderr
    for name in ("a_rgb.png", "b_gray.png", "c_rgba.png", "e_rgb.jpg"):
        r = records[name]
        assert [p["class"] for p in r["predictions"]] == ["thing"] and r["predictions"][0]["parent_id"] == "t1"
    image = np.asarray(Image.open(images / "a_rgb.png").convert("RGB"))
    want = tiny_engine.predict(tiny_engine.embed([image])[0], boxes=[[20, 20, 100, 80]]).masks[0]
    assert np.array_equal(rle_to_mask(records["a_rgb.png"]["predictions"][0]["rle"]), want)


def test_interrupted_run_resumes_without_duplicates(folder, tiny_engine, tmp_path):
    images, boxes = folder
    full = tmp_path / "full.jsonl"
    run_batch(tiny_engine, str(images), full, str(boxes), batch_size=2, progress=False)
    lines = full.read_text().splitlines()
    # An interruption: two records made it to disk, the third only halfway.
    out = tmp_path / "resumed.jsonl"
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])
    summary = run_batch(tiny_engine, str(images), out, str(boxes), batch_size=2, progress=False)
    assert summary.skipped == 2 and summary.done + len(summary.failed) == 3
    records = [json.loads(l) for l in out.read_text().splitlines() if l.strip().endswith("}")]
    names = [r["file"] for r in records]
    assert sorted(names) == sorted(json.loads(l)["file"] for l in lines) and len(names) == len(set(names))
    again = run_batch(tiny_engine, str(images), out, str(boxes), progress=False)
    assert again.skipped == 5 and again.done == 0


def test_unprompted_glob_and_bad_arguments(folder, tiny_engine, tmp_path):
    images, _ = folder
    out = tmp_path / "auto.jsonl"
    config = AutomaticConfig(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    summary = run_batch(
        tiny_engine,
        str(images / "*_rgb.*"),
        out,
        None,
        "polygon",
        params=StepParameters(),
        progress=False,
        automatic_config=config,
    )
    assert summary.done == 2
    for r in read(out):
        assert r["predictions"] and all(p["class"] == str(p["class_id"]) for p in r["predictions"])
    with pytest.raises(ValueError, match="no images"):
        run_batch(tiny_engine, str(tmp_path / "nothing-*.png"), out, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        run_batch(tiny_engine, str(images), out, str(tmp_path / "missing.jsonl"), progress=False)
