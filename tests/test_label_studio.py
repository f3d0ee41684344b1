"""sam2flow as Label Studio's ML backend, driven through a real Label Studio.

One Label Studio for the module (the ``label-studio`` package in its own virtual environment, made by
``tools/setup-dev.sh`` at ``.venv-label-studio``, or ``$SAM2FLOW_LABEL_STUDIO_VENV``): SQLite in a
temporary data directory, a loopback port, an admin user with a legacy API token. Its SSRF guards are
off (``ML_BLOCK_LOCAL_IP``, ``SSRF_PROTECTION_ENABLED``), as they must be for any backend on a loopback
or private address. sam2flow runs as ``sam2flow serve`` on the fixture model with an API key, which
Label Studio sends as basic auth; it fetches the tasks' images back from Label Studio with the token.

Everything goes through Label Studio's own API, as its UI does: projects with a label config, images
uploaded as tasks (``/data/upload/...``), the backend connected (``POST /api/ml``), interactive
pre-annotation (``POST /api/ml/{id}/interactive-annotating``, what the UI calls for smart tools) and
"Retrieve predictions" (``POST /api/dm/actions?id=retrieve_tasks_predictions``), whose predictions
Label Studio stores. Masks are decoded with label-studio-sdk's own decoder (brush RLE) or rasterised
from the polygons, and compared with the fixture engine's own masks for the same prompts.
"""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from PIL import Image

from sam2flow import Prompt, Sam2Engine
from sam2flow.engine.automatic import AutomaticConfig
from sam2flow.formats import polygons_to_mask
from sam2flow.images import ImageLimits
from sam2flow.integrations.label_studio import (
    LabelStudioBackend,
    SdkMissing,
    TaskImages,
    interactive_region,
    mask_from_brush_rle,
    parse_label_config,
    task_boxes,
)
from sam2flow.testing import fixture
from sam2flow.testing.scenes import make_scene, mask_to_box

from conftest import SERVER_API_KEY, SERVER_POINTS_PER_SIDE, free_port, mask_iou, start_server, stop_server

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("SAM2FLOW_LABEL_STUDIO_VENV", REPO / ".venv-label-studio"))
LABEL_STUDIO = VENV / "bin" / "label-studio"

TOKEN = "0123456789abcdef0123456789abcdef01234567"  # Label Studio's legacy token: 40 hex digits
SIZE = (240, 320)  # H, W of the scenes
LABELS = ("shape", "other")
SAME_MASK = 0.99


def label_config(output: str) -> str:
    labels = "".join(f'<Label value="{v}"/>' for v in LABELS)
    return (
        '<View><Image name="image" value="$image"/>'
        f'<{output} name="mask" toName="image">{labels}</{output}>'
        f'<KeyPointLabels name="click" toName="image" smart="true">{labels}</KeyPointLabels>'
        f'<RectangleLabels name="box" toName="image" smart="true">{labels}</RectangleLabels></View>'
    )


# ---- Label Studio, sam2flow and the engine ---------------------------------------------------


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """A fresh Label Studio on a loopback port → its API as ``api(method, path, **requests_kwargs)``."""
    if not LABEL_STUDIO.exists():
        pytest.skip(
            f"no Label Studio at {LABEL_STUDIO}: tools/setup-dev.sh makes it (or set SAM2FLOW_LABEL_STUDIO_VENV)"
        )
    pytest.importorskip(
        "label_studio_sdk.converter.brush", reason="label-studio-sdk missing: pip install '.[label-studio]'"
    )
    root = tmp_path_factory.mktemp("label-studio")
    port = free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(root / "base"),
        "DJANGO_DB": "sqlite",
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
    }
    command = [
        str(LABEL_STUDIO),
        "start",
        "--no-browser",
        "--internal-host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(root / "data"),
        "--username",
        "admin@example.com",
        "--password",
        "sam2flow-test-password",
        "--user-token",
        TOKEN,
        "--enable-legacy-api-token",
    ]
    log = root / "label-studio.log"
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Label Studio exited: {log.read_text()[-3000:]}")
            if time.monotonic() - start > 300:
                pytest.fail(f"Label Studio not up after 300 s: {log.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        print(f"Label Studio up in {time.monotonic() - start:.1f} s")

        def api(method: str, path: str, **kwargs):
            r = requests.request(method, url + path, headers={"Authorization": f"Token {TOKEN}"}, timeout=120, **kwargs)
            assert r.status_code < 300, f"{method} {path}: HTTP {r.status_code} {r.text[:500]}"
            return r.json()

        api.url = url
        yield api
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(label_studio, tmp_path_factory):
    """``sam2flow serve`` on the fixture model, pointed at Label Studio → its URL."""
    d = tmp_path_factory.mktemp("ls-server")
    checkpoint = fixture.write_checkpoint(d / "sam2.1_hiera_tiny.pt")
    env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": TOKEN}
    url, proc = start_server(checkpoint, d / "server.log", env)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def engine():
    model, spec = fixture.fixture_model()
    return Sam2Engine(model, spec, device="cpu", dtype="float32")


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def upload(api, output: str, scenes) -> tuple[int, list[dict]]:
    """A project with ``output`` masks and the scenes' images uploaded as tasks → (its id, the tasks in
    scene order)."""
    project = api("POST", "/api/projects", json={"title": f"sam2flow {output}", "label_config": label_config(output)})
    pid = project["id"]
    files = {f"scene{i}.png": (f"scene{i}.png", png(s.image), "image/png") for i, s in enumerate(scenes)}
    api("POST", f"/api/projects/{pid}/import", files=files)
    tasks = api("GET", "/api/tasks", params={"project": pid, "page_size": 100})["tasks"]
    by_name = {re.search(r"scene(\d+)\.png$", t["data"]["image"]).group(1): t for t in tasks}
    assert all(t["data"]["image"].startswith("/data/upload/") for t in tasks)  # relative to Label Studio
    return pid, [by_name[str(i)] for i in range(len(scenes))]


def make_project(api, server: str, output: str, scenes) -> tuple[int, int, list[int]]:
    """``upload``, and sam2flow connected as the project's ML backend (basic auth carrying the API key)
    → (project id, ML backend id, task ids in scene order)."""
    pid, tasks = upload(api, output, scenes)
    backend = api(
        "POST",
        "/api/ml",
        json={
            "url": server,
            "project": pid,
            "title": "sam2flow",
            "is_interactive": True,
            "auth_method": "BASIC_AUTH",
            "basic_auth_user": "label-studio",
            "basic_auth_pass": SERVER_API_KEY,
        },
    )
    assert backend["readable_state"] == "Connected", backend
    assert backend["model_version"] == "sam2flow-hiera_tiny"
    return pid, backend["id"], [t["id"] for t in tasks]


def percent_box(box) -> dict:
    h, w = SIZE
    x1, y1, x2, y2 = (float(v) for v in box)
    return {"x": x1 / w * 100, "y": y1 / h * 100, "width": (x2 - x1) / w * 100, "height": (y2 - y1) / h * 100}


def box_result(box, label: str, from_name: str = "box") -> dict:
    """A ``rectanglelabels`` result as Label Studio's UI serialises it."""
    h, w = SIZE
    value = {**percent_box(box), "rotation": 0, "rectanglelabels": [label]}
    return {"original_width": w, "original_height": h, "image_rotation": 0, "value": value, "id": f"b{id(box)}",
            "from_name": from_name, "to_name": "image", "type": "rectanglelabels", "origin": "manual"}  # fmt: skip


def click_result(xy, positive: bool, label: str) -> dict:
    """A smart ``keypointlabels`` result as Label Studio's UI serialises it (``is_positive``)."""
    h, w = SIZE
    value = {"x": xy[0] / w * 100, "y": xy[1] / h * 100, "width": 0.5, "keypointlabels": [label]}
    return {"original_width": w, "original_height": h, "image_rotation": 0, "value": value, "id": f"k{xy[0]}",
            "from_name": "click", "to_name": "image", "type": "keypointlabels", "origin": "manual",
            "is_positive": positive}  # fmt: skip


def negative_inside(box, mask: np.ndarray) -> list[float]:
    """The pixel centre inside ``box`` farthest from ``mask`` (x, y): a sure background click."""
    x1, y1, x2, y2 = (int(v) for v in box)
    outside = np.zeros(mask.shape, np.uint8)
    outside[y1:y2, x1:x2] = ~mask[y1:y2, x1:x2]
    depth = cv2.distanceTransform(outside, cv2.DIST_L2, 5)
    y, x = np.unravel_index(depth.argmax(), depth.shape)
    return [float(x) + 0.5, float(y) + 0.5]


def region_mask(region: dict) -> np.ndarray:
    """A brush or polygon region → (H, W) bool, read as Label Studio's own tools read it."""
    h, w = region["original_height"], region["original_width"]
    assert (h, w) == SIZE
    if region["type"] == "brushlabels":
        assert region["value"]["format"] == "rle"
        return mask_from_brush_rle(region["value"]["rle"], (h, w))
    points = np.array(region["value"]["points"]) * [w / 100, h / 100] - 0.5  # percent → pixel centres
    return polygons_to_mask([points], h, w)


def regions_mask(regions: list[dict]) -> np.ndarray:
    return np.logical_or.reduce([region_mask(r) for r in regions])


def cache_counts(server: str) -> tuple[float, float]:
    text = requests.get(f"{server}/metrics", timeout=10).text
    hits = float(re.search(r"^sam2flow_embedding_cache_hits_total (\S+)$", text, re.M).group(1))
    misses = float(re.search(r"^sam2flow_embedding_cache_misses_total (\S+)$", text, re.M).group(1))
    return hits, misses


# ---- the tests -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene():
    return make_scene(7_000_001, size=SIZE)


@pytest.mark.parametrize("output", ["BrushLabels", "PolygonLabels"])
def test_interactive_box_and_negative_click_give_the_engines_mask(label_studio, server, engine, scene, output):
    """A box and a negative click (what the smart tools send) → one region of the project's output
    type, with the box's label and a score, whose mask is the engine's own for the same prompt."""
    pid, ml, (task,) = make_project(label_studio, server, output, [scene])
    box, negative, want, k = negative_click_that_matters(engine, scene)
    context = {"result": [box_result(box, "other"), click_result(negative, False, "other")]}
    answer = label_studio("POST", f"/api/ml/{ml}/interactive-annotating", json={"task": task, "context": context})
    prediction = answer["data"]
    regions = prediction["result"]
    assert regions and all(r["type"] == output.lower() and r["value"][output.lower()] == ["other"] for r in regions)
    assert all(r["from_name"] == "mask" and r["to_name"] == "image" for r in regions)
    assert prediction["model_version"] == "sam2flow-hiera_tiny"

    got = regions_mask(regions)
    assert mask_iou(got, want.masks[0]) >= SAME_MASK
    assert regions[0]["score"] == pytest.approx(float(want.scores[0]), abs=1e-3)
    assert not got[int(negative[1]), int(negative[0])]
    print(f"{output}: IoU with the engine {mask_iou(got, want.masks[0]):.4f}, with the true shape "
          f"{mask_iou(got, scene.masks[k]):.3f}")  # fmt: skip


def negative_click_that_matters(engine, scene):
    """The object ``k`` whose box with a background click inside it gives masks that differ most when
    the click is taken as positive instead (the fixture model mostly follows the box): → (box, click,
    the engine's answer with the click negative, k), so a click read with the wrong sign fails."""
    emb = engine.embed([scene.image])[0]
    best = None
    for k, mask in enumerate(scene.masks):
        box = [float(v) for v in mask_to_box(mask)]
        click = negative_inside(box, mask)
        neg, pos = (
            engine.predict_prompts(emb, [Prompt(box=box, points=[click], labels=[sign])], multimask_output=False)
            for sign in (0, 1)
        )
        iou = mask_iou(neg.masks[0], pos.masks[0])
        if best is None or iou < best[0]:
            best = (iou, box, click, neg, k)
    iou, box, click, neg, k = best
    assert iou < 0.97, f"no object of the scene where the click's sign matters (IoU {iou:.3f})"
    return box, click, neg, k


def test_repeated_clicks_on_a_task_reuse_its_embedding(label_studio, server, engine):
    """Three clicks on one task: the first embeds the image, the next two only decode (cache hits)."""
    scene = make_scene(7_000_002, size=SIZE)
    pid, ml, (task,) = make_project(label_studio, server, "BrushLabels", [scene])
    emb = engine.embed([scene.image])[0]
    counts = [cache_counts(server)]
    for k in range(3):
        mask = scene.masks[k % len(scene)]
        ys, xs = np.nonzero(mask)
        click = [float(xs[len(xs) // 2]) + 0.5, float(ys[len(ys) // 2]) + 0.5]
        context = {"result": [click_result(click, True, "shape")]}
        answer = label_studio("POST", f"/api/ml/{ml}/interactive-annotating", json={"task": task, "context": context})
        want = engine.predict_prompts(emb, [Prompt(points=[click], labels=[1])], multimask_output=True)
        assert mask_iou(regions_mask(answer["data"]["result"]), want.masks[0]) >= SAME_MASK
        counts.append(cache_counts(server))
    misses = [m for _, m in counts]
    hits = [h for h, _ in counts]
    assert misses[1] == misses[0] + 1 and misses[3] == misses[1]  # one encoder run, on the first click
    assert hits[3] >= hits[1] + 2


def test_retrieve_predictions_turns_boxes_into_masks_and_the_rest_into_unprompted_masks(label_studio, server, engine):
    """Three tasks holding boxes (two from a detector's predictions, one from a person's annotation) get
    one mask per box with the box's label; a fourth, without boxes, gets the unprompted masks."""
    scenes = [make_scene(7_000_010 + i, size=SIZE) for i in range(4)]
    pid, ml, tasks = make_project(label_studio, server, "BrushLabels", scenes)
    boxes = {}
    for i, (task, scene) in enumerate(zip(tasks[:3], scenes)):
        items = [([float(v) for v in scene.boxes[k]], LABELS[k % 2]) for k in range(min(3, len(scene)))]
        results = [box_result(b, label, "box") for b, label in items]
        if i < 2:
            label_studio(
                "POST", "/api/predictions", json={"task": task, "result": results, "model_version": "detector"}
            )
        else:
            label_studio("POST", f"/api/tasks/{task}/annotations", json={"result": results})
        boxes[task] = items
    label_studio(
        "POST",
        "/api/dm/actions",
        params={"id": "retrieve_tasks_predictions", "project": pid},
        json={"selectedItems": {"all": True, "excluded": []}},
    )
    for task, scene in zip(tasks, scenes):
        stored = [
            p
            for p in label_studio("GET", "/api/predictions", params={"task": task})
            if p["model_version"] == "sam2flow-hiera_tiny"
        ]
        assert len(stored) == 1, f"task {task}: {len(stored)} sam2flow predictions"
        regions = stored[0]["result"]
        emb = engine.embed([scene.image])[0]
        if task in boxes:
            items = boxes[task]
            want = engine.predict_prompts(emb, [Prompt(box=b) for b, _ in items], multimask_output=False)
            assert [r["value"]["brushlabels"] for r in regions] == [[label] for _, label in items]
        else:
            want = engine.automatic(emb, AutomaticConfig(points_per_side=SERVER_POINTS_PER_SIDE))
            assert len(want.masks) > 0
            assert all(r["value"]["brushlabels"] == [LABELS[0]] for r in regions)
        assert len(regions) == len(want.masks)
        for region, mask, score in zip(regions, want.masks, want.scores):
            assert mask_iou(region_mask(region), mask) >= SAME_MASK
            assert region["score"] == pytest.approx(float(score), abs=1e-3)


def test_the_backend_needs_the_key_and_answers_label_studios_health_check(server):
    assert requests.get(f"{server}/health", timeout=10).json() == {"status": "UP", "model_class": "Sam2flow"}
    body = {"project": "1.1", "schema": label_config("BrushLabels")}
    assert requests.post(f"{server}/setup", json=body, timeout=10).status_code == 401
    wrong = requests.post(f"{server}/setup", json=body, auth=("label-studio", "wrong"), timeout=10)
    assert wrong.status_code == 401 and "error" in wrong.json()
    ok = requests.post(f"{server}/setup", json=body, auth=("label-studio", SERVER_API_KEY), timeout=10)
    assert ok.json() == {"model_version": "sam2flow-hiera_tiny"}
    bad = requests.post(
        f"{server}/setup",
        json={**body, "schema": "<View><Text name='t' value='$t'/></View>"},
        auth=("x", SERVER_API_KEY),
    )
    assert bad.status_code == 400 and "BrushLabels or PolygonLabels" in bad.json()["error"]
    hook = requests.post(
        f"{server}/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1}}, auth=("x", SERVER_API_KEY)
    )
    assert hook.status_code == 200


def test_task_images_are_fetched_from_label_studio_with_a_legacy_or_a_personal_access_token(label_studio):
    """The image of an uploaded task, fetched back as the backend does: with the legacy token, with a
    personal access token (exchanged for an access token), and refused with a wrong key."""
    scene = make_scene(7_000_003, size=SIZE)
    _, (task,) = upload(label_studio, "BrushLabels", [scene])
    ref = task["data"]["image"]
    limits = ImageLimits(max_pixels=SIZE[0] * SIZE[1])
    personal = label_studio("POST", "/api/token/")["token"]
    assert personal.count(".") == 2  # a JWT
    for key in (TOKEN, personal):
        images = TaskImages(label_studio.url, key, limits)
        assert np.array_equal(images.load(ref), scene.image)
        assert np.array_equal(images.load(ref), scene.image)  # the personal token's access token, kept
    with pytest.raises(ValueError, match="HTTP 401"):
        TaskImages(label_studio.url, "f" * 40, limits).load(ref)
    with pytest.raises(ValueError, match="refused LABEL_STUDIO_API_KEY"):
        TaskImages(label_studio.url, personal[:-4] + "AAAA", limits).load(ref)
    with pytest.raises(ValueError, match="over the limit"):
        TaskImages(label_studio.url, TOKEN, ImageLimits(max_pixels=1000)).load(ref)


def test_task_images_off_label_studio_are_refused_unless_url_images_are_enabled(label_studio, server):
    body = {
        "tasks": [{"id": 1, "data": {"image": "http://127.0.0.2:9/elsewhere.png"}}],
        "label_config": label_config("BrushLabels"),
        "params": {"context": {"result": [click_result([10.0, 10.0], True, "shape")]}},
    }
    r = requests.post(f"{server}/predict", json=body, auth=("x", SERVER_API_KEY), timeout=30)
    assert r.status_code == 400 and "not on Label Studio's host" in r.json()["error"]


# ---- the protocol without Label Studio -----------------------------------------------------


def test_label_configs_are_read_as_label_studio_writes_them():
    config = parse_label_config(label_config("PolygonLabels"))
    assert (config.output.tag, config.output.name, config.image_name, config.image_key) == (
        "PolygonLabels", "mask", "image", "image"
    )  # fmt: skip
    assert config.output.labels == LABELS
    both = "<view><image name='im' value='$photo'/><polygonlabels name='p' toName='im'/>" \
        "<brushlabels name='b' toname='im'><label value='a'/></brushlabels></view>"  # fmt: skip
    config = parse_label_config(both)  # tags in any case; brush preferred; the image's task key
    assert (config.output.tag, config.output.name, config.image_key, config.output.labels) == (
        "BrushLabels", "b", "photo", ("a",)
    )  # fmt: skip
    with pytest.raises(ValueError, match="label 'x' is not one of"):
        config.output.label_for("x")
    for bad, words in [
        ("<View><Image name='i' value='$i'/><Choices name='c' toName='i'/></View>", "no BrushLabels or PolygonLabels"),
        ("<View><BrushLabels name='b' toName='nowhere'/></View>", "no BrushLabels"),
        ("<View><Image name='i'/><BrushLabels name='b' toName='i'/></View>", "has no value"),
        ("<View><Image", "not well-formed XML"),
        ('<!DOCTYPE v [<!ENTITY a "aaaa">]><View>&a;</View>', "DTD or entity"),
        ("", "missing"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_label_config(bad)


def test_smart_regions_become_one_prompt_in_pixels():
    hw = (200, 400)
    results = [
        {"type": "keypointlabels", "to_name": "image", "value": {"x": 25, "y": 50, "keypointlabels": ["a"]}},
        {"type": "keypointlabels", "to_name": "image", "value": {"x": 50, "y": 10}, "is_positive": False},
        {"type": "rectanglelabels", "to_name": "image",
         "value": {"x": 10, "y": 10, "width": 20, "height": 40, "rotation": 90, "rectanglelabels": ["b"]}},
        {"type": "keypointlabels", "to_name": "other", "value": {"x": 1, "y": 1}},
    ]  # fmt: skip
    region = interactive_region(results, "image", hw)
    assert region.prompt.points == [[100.0, 100.0], [200.0, 20.0]] and region.prompt.labels == [1, 0]
    # 80 x 80 pixels turned 90 degrees clockwise about its top-left corner (40, 20)
    assert np.allclose(region.prompt.box, [-40, 20, 40, 100]) and region.label == "b"
    with pytest.raises(ValueError, match="no box and no positive click"):
        interactive_region(results[1:2], "image", hw)
    with pytest.raises(ValueError, match=r"context.result\[0\].value.x must be a finite number"):
        interactive_region([{"type": "keypointlabels", "value": {"x": "1", "y": 2}}], "image", hw)


def test_a_tasks_boxes_come_from_its_latest_annotation_else_its_latest_prediction():
    def box(x, label):
        return {"type": "rectanglelabels", "to_name": "image",
                "value": {"x": x, "y": 0, "width": 10, "height": 10, "rectanglelabels": [label]}}  # fmt: skip

    hw = (100, 100)
    task = {
        "annotations": [{"result": [box(1, "a")]}, {"result": [box(2, "b")]}, {"result": [], "was_cancelled": True}],
        "predictions": [{"result": [box(3, "c"), box(4, "d")]}],
    }
    assert [(r.prompt.box[0], r.label) for r in task_boxes(task, "image", hw)] == [(2, "b")]
    task["annotations"] = [{"result": []}]
    assert [(r.prompt.box[0], r.label) for r in task_boxes(task, "image", hw)] == [(3, "c"), (4, "d")]
    assert task_boxes({"data": {}}, "image", hw) == []


def test_polygon_answers_in_process_on_a_data_url(engine, scene):
    """The backend without a server: a ``data:`` URL image, polygons, the engine's own mask."""
    backend = LabelStudioBackend(lambda: engine, TaskImages(None, None, ImageLimits()), "v")
    image = "data:image/png;base64," + base64.b64encode(png(scene.image)).decode()
    box = [float(v) for v in mask_to_box(scene.masks[1])]
    body = {
        "tasks": [{"id": 1, "data": {"image": image}}],
        "label_config": label_config("PolygonLabels"),
        "params": {"context": {"result": [box_result(box, "shape")]}},
    }
    (answer,) = backend.predict(body)["results"]
    want = engine.predict_prompts(engine.embed([scene.image])[0], [Prompt(box=box)], multimask_output=False)
    assert mask_iou(regions_mask(answer["result"]), want.masks[0]) >= SAME_MASK
    assert answer["model_version"] == "v" and answer["result"][0]["value"]["polygonlabels"] == ["shape"]
    with pytest.raises(ValueError, match="relative to Label Studio: set LABEL_STUDIO_URL"):
        backend.predict({**body, "tasks": [{"id": 1, "data": {"image": "/data/upload/1/x.png"}}]})


def test_without_label_studio_sdk_brush_projects_are_told_what_to_install(engine, monkeypatch):
    monkeypatch.setitem(sys.modules, "label_studio_sdk.converter.brush", None)  # as if not installed
    backend = LabelStudioBackend(lambda: engine, TaskImages(None, None, ImageLimits()), "v")
    with pytest.raises(SdkMissing, match=r"pip install 'sam2flow\[label-studio\]'"):
        backend.setup({"project": "1.1", "schema": label_config("BrushLabels")})
    assert backend.setup({"project": "1.1", "schema": label_config("PolygonLabels")}) == {"model_version": "v"}
