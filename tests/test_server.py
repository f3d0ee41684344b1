"""The HTTP server, live on a loopback port, driven by the real ``inference-sdk`` client."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from sam2flow import Prompt
from sam2flow.formats import rle_to_mask

from conftest import BOXES_WORKFLOW, mask_iou, random_image
from conftest import SERVER_API_KEY as API_KEY

inference_sdk = pytest.importorskip("inference_sdk")


@pytest.fixture(scope="module")
def server(live_server):
    return live_server


@pytest.fixture(scope="module")
def client(server):
    from inference_sdk import InferenceConfiguration, InferenceHTTPClient

    return InferenceHTTPClient(api_url=server, api_key=API_KEY).configure(
        InferenceConfiguration(api_key_transport="header")
    )


IMAGE = random_image(240, 320, seed=41)
BOXES = [[40, 30, 160, 150], [170, 60, 300, 220]]


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    """The client sends files byte for byte (numpy arrays it re-encodes as lossy JPEG, as BGR)."""
    path = tmp_path_factory.mktemp("img") / "image.png"
    Image.fromarray(IMAGE).save(path)
    return str(path)


def box_prompt(b):
    return {"box": {"x": (b[0] + b[2]) / 2, "y": (b[1] + b[3]) / 2, "width": b[2] - b[0], "height": b[3] - b[1]}}


def test_health_ready_info_and_openapi(server):
    assert requests.get(f"{server}/healthz").json() == {"status": "ok"}
    assert requests.get(f"{server}/readyz").json()["models"] == ["hiera_tiny"]
    assert requests.get(f"{server}/info").json()["models"] == ["hiera_tiny"]
    spec = requests.get(f"{server}/openapi.json").json()
    assert {"/sam2/segment_image", "/sam2/embed_image", "/workflows/run"} <= set(spec["paths"])


def test_sdk_boxes_and_points_equal_the_engine(client, tiny_engine, image_path):
    emb = tiny_engine.embed([IMAGE])[0]
    prompts = [box_prompt(b) for b in BOXES] + [
        {"points": [{"x": 100, "y": 90, "positive": True}, {"x": 250, "y": 200, "positive": False}]}
    ]
    result = client.sam2_segment_image(image_path, prompts=prompts, mask_input_format="rle")
    want = tiny_engine.predict_prompts(
        emb, [Prompt(box=b) for b in BOXES] + [Prompt(points=[[100, 90], [250, 200]], labels=[1, 0])]
    )
    assert len(result["predictions"]) == 3
    for p, mask, score in zip(result["predictions"], want.masks, want.scores):
        assert p["format"] == "rle"
        assert np.array_equal(rle_to_mask(p["masks"]), mask)
        assert p["confidence"] == pytest.approx(float(score), abs=1e-5)
    polygons = client.sam2_segment_image(image_path, prompts=prompts[:1])
    assert polygons["predictions"][0]["format"] == "polygon"  # their shapes: test_fixture_model.py


def test_sdk_workflow_forwards_classes(client, image_path):
    dets = {
        "image": {"width": 320, "height": 240},
        "predictions": [
            {"x": 100, "y": 90, "width": 120, "height": 120, "class": "cup", "class_id": 3, "detection_id": "u1"},
            {"x": 235, "y": 140, "width": 130, "height": 160, "class": "bowl", "class_id": 5, "detection_id": "u2"},
        ],
    }
    out = client.run_workflow(specification=BOXES_WORKFLOW, images={"image": image_path}, parameters={"boxes": dets})
    preds = out[0]["masks"]["predictions"]
    assert [(p["class"], p["class_id"], p["parent_id"]) for p in preds] == [("cup", 3, "u1"), ("bowl", 5, "u2")]


def post(server, route, body, key=API_KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{server}{route}", json=body, headers=headers, timeout=120, **kw)


def b64(image, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_embed_then_segment_by_image_id_and_refine_with_cached_logits(server, tiny_engine):
    r = post(server, "/sam2/embed_image", {"image": {"type": "base64", "value": b64(IMAGE)}, "image_id": "photo-1"})
    assert r.status_code == 200 and r.json()["image_id"] == "photo-1"
    first = {
        "image_id": "photo-1",
        "prompts": {"prompts": [{"points": [{"x": 100, "y": 90, "positive": True}]}]},
        "format": "rle",
        "save_logits_to_cache": True,
    }
    r1 = post(server, "/sam2/segment_image", first)
    assert r1.status_code == 200, r1.text
    emb = tiny_engine.embed([IMAGE])[0]
    want1 = tiny_engine.predict_prompts(emb, [Prompt(points=[[100, 90]], labels=[1])])
    assert np.array_equal(rle_to_mask(r1.json()["predictions"][0]["masks"]), want1.masks[0])
    # A second click extends the first prompt: the previous logits become the mask prompt.
    second = {
        **first,
        "prompts": {
            "prompts": [{"points": [{"x": 100, "y": 90, "positive": True}, {"x": 60, "y": 50, "positive": False}]}]
        },
        "load_logits_from_cache": True,
        "multimask_output": False,
    }
    r2 = post(server, "/sam2/segment_image", second)
    assert r2.status_code == 200, r2.text
    want2 = tiny_engine.predict_prompts(
        emb,
        [Prompt(points=[[100, 90], [60, 50]], labels=[1, 0], mask_input=want1.low_res_logits[0])],
        multimask_output=False,
    )
    assert np.array_equal(rle_to_mask(r2.json()["predictions"][0]["masks"]), want2.masks[0])
    binary = post(server, "/sam2/segment_image", {**first, "format": "binary"})
    arrays = np.load(io.BytesIO(binary.content))
    assert np.array_equal(arrays["masks"][0], want1.masks[0]) and arrays["low_res_logits"].shape == (1, 256, 256)


def test_embed_without_image_id_answers_the_content_hash(server, tiny_engine):
    from sam2flow.engine.cache import content_hash

    image = random_image(120, 150, seed=43)
    r = post(server, "/sam2/embed_image", {"image": {"type": "base64", "value": b64(image)}})
    assert r.status_code == 200 and r.json()["image_id"] == content_hash(image)
    r = post(
        server,
        "/sam2/segment_image",
        {"image_id": r.json()["image_id"], "format": "rle", "prompts": [box_prompt([20, 30, 110, 100])]},
    )
    assert r.status_code == 200, r.text
    want = tiny_engine.predict(tiny_engine.embed([image])[0], boxes=[[20, 30, 110, 100]])
    assert np.array_equal(rle_to_mask(r.json()["predictions"][0]["masks"]), want.masks[0])


def test_concurrent_clients_get_correct_answers_in_batches(server, tiny_engine):
    n = 8  # concurrent clients: enough for batches of several images
    images = [random_image(200 + 8 * i, 260, seed=100 + i) for i in range(n)]
    box = [30, 30, 150, 150]

    def call(i):
        body = {
            "image": {"type": "base64", "value": b64(images[i])},
            "format": "rle",
            "prompts": [box_prompt(box)] if i % 2 == 0 else [{"points": [{"x": 80, "y": 70, "positive": True}]}],
        }
        r = post(server, "/sam2/segment_image", body)
        return r.status_code, r.json()

    with ThreadPoolExecutor(n) as ex:
        results = list(ex.map(call, range(n)))
    for i, (status, payload) in enumerate(results):
        assert status == 200, payload
        emb = tiny_engine.embed([images[i]])[0]
        prompt = Prompt(box=box) if i % 2 == 0 else Prompt(points=[[80, 70]], labels=[1])
        want = tiny_engine.predict_prompts(emb, [prompt]).masks[0]
        assert mask_iou(rle_to_mask(payload["predictions"][0]["masks"]), want) >= 0.99
    text = requests.get(f"{server}/metrics").text
    count = float(next(l.split()[-1] for l in text.splitlines() if l.startswith("sam2flow_embed_batch_size_count")))
    ones = float(
        next(l.split()[-1] for l in text.splitlines() if l.startswith('sam2flow_embed_batch_size_bucket{le="1.0"}'))
    )
    assert count > ones, "no embedding batch held more than one image"
    assert "sam2flow_embedding_cache_hits_total" in text and 'sam2flow_model_load_seconds{version="hiera_tiny"}' in text
    assert 'sam2flow_requests_total{route="/sam2/segment_image",status="200"}' in text


GOOD = {"image": {"type": "base64", "value": b64(IMAGE)}, "prompts": [box_prompt(BOXES[0])]}
HUGE = np.zeros((2100, 2100, 3), np.uint8)


@pytest.mark.parametrize(
    "name, route, body, status, message",
    [
        ("malformed json", "/sam2/segment_image", b"{not json", 422, "the request body is not valid JSON"),
        ("missing image", "/sam2/segment_image", {"prompts": [box_prompt(BOXES[0])]}, 400, "no image"),
        ("corrupt base64", "/sam2/segment_image", {**GOOD, "image": {"type": "base64", "value": "@@@"}}, 400, "base64"),
        (
            "not an image",
            "/sam2/segment_image",
            {**GOOD, "image": {"type": "base64", "value": base64.b64encode(b"hello world").decode()}},
            400,
            "not a readable",
        ),
        (
            "1x1 image",
            "/sam2/segment_image",
            {**GOOD, "image": {"type": "base64", "value": b64(IMAGE[:1, :1])}},
            400,
            "smaller than",
        ),
        (
            "oversized image",
            "/sam2/segment_image",
            {**GOOD, "image": {"type": "base64", "value": b64(HUGE)}},
            413,
            "over the limit",
        ),
        (
            "nan box",
            "/sam2/segment_image",
            {**GOOD, "prompts": [{"box": {"x": "NaN", "y": 1, "width": 4, "height": 4}}]},
            422,
            "finite",
        ),
        (
            "inverted box",
            "/sam2/segment_image",
            {**GOOD, "prompts": [{"box": {"x": 50, "y": 50, "width": -10, "height": 10}}]},
            400,
            "inverted",
        ),
        (
            "box outside",
            "/sam2/segment_image",
            {**GOOD, "prompts": [{"box": {"x": 1000, "y": 1000, "width": 10, "height": 10}}]},
            400,
            "outside",
        ),
        (
            "non-numeric",
            "/sam2/segment_image",
            {**GOOD, "prompts": [{"box": {"x": "a", "y": 1, "width": 4, "height": 4}}]},
            422,
            "prompts.0.box.x: Input should be a valid number",
        ),
        (
            "too many prompts",
            "/sam2/segment_image",
            {**GOOD, "prompts": [box_prompt(BOXES[0])] * 21},
            413,
            "21 prompts is more than this server's limit of 20 per image",
        ),
        ("unknown version", "/sam2/segment_image", {**GOOD, "sam2_version_id": "hiera_huge"}, 400, "hiera_huge"),
        ("unknown format", "/sam2/segment_image", {**GOOD, "format": "tiff"}, 422, "format"),
        # URL images are off on this server; test_server_hardening.py runs one with them on
        (
            "file url",
            "/sam2/segment_image",
            {**GOOD, "image": {"type": "url", "value": "file:///etc/passwd"}},
            400,
            "URL images are disabled",
        ),
        (
            "ftp url",
            "/sam2/embed_image",
            {"image": {"type": "url", "value": "ftp://x/y.png"}},
            400,
            "URL images are disabled",
        ),
        (
            "negative hole area",
            "/sam2/segment_image",
            {**GOOD, "max_hole_area": -1},
            422,
            "max_hole_area: Input should be greater than or equal to 0",
        ),
        (
            "bad selector",
            "/workflows/run",
            {
                "specification": {
                    "inputs": [{"type": "WorkflowImage", "name": "image"}],
                    "steps": [{"type": "roboflow_core/segment_anything@v1", "name": "s", "images": "$inputs.nope"}],
                    "outputs": [{"type": "JsonField", "name": "o", "selector": "$steps.s.predictions"}],
                },
                "inputs": {"image": {"type": "base64", "value": b64(IMAGE)}},
            },
            400,
            "unknown input",
        ),
        ("body too large", "/sam2/segment_image", {**GOOD, "padding": "x" * (9 << 20)}, 413, "body"),
    ],
)
def test_bad_requests_get_clear_4xx_and_the_server_survives(server, name, route, body, status, message):
    if isinstance(body, bytes):
        r = requests.post(
            f"{server}{route}",
            data=body,
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
            timeout=60,
        )
    else:
        r = post(server, route, body)
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    assert message in r.json()["error"], r.json()
    ok = post(server, "/sam2/segment_image", GOOD)
    assert ok.status_code == 200


def test_api_key_is_required(server):
    assert post(server, "/sam2/segment_image", GOOD, key=None).status_code == 401
    assert post(server, "/sam2/segment_image", GOOD, key="wrong").status_code == 401
    r = requests.post(f"{server}/sam2/segment_image?api_key={API_KEY}", json=GOOD, timeout=60)
    assert r.status_code == 200
    assert requests.get(f"{server}/healthz").status_code == 200


def _request_count(server: str, route: str, status: int) -> float:
    """``sam2flow_requests_total`` for ``route`` and ``status`` on the live server's ``/metrics``."""
    label = f'sam2flow_requests_total{{route="{route}",status="{status}"}}'
    text = requests.get(f"{server}/metrics", timeout=60).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(label + " "))


def test_metrics_count_each_request_by_route_and_status(server):
    """The metrics middleware (pure ASGI) sees every answer's status, refusals included."""
    route = "/sam2/segment_image"
    before = {status: _request_count(server, route, status) for status in (200, 400, 401)}
    assert post(server, route, GOOD).status_code == 200
    for _ in range(2):
        assert post(server, route, {**GOOD, "image_id": "nope", "image": None}).status_code == 400
    assert post(server, route, GOOD, key="wrong").status_code == 401
    after = {status: _request_count(server, route, status) for status in (200, 400, 401)}
    assert {s: after[s] - before[s] for s in after} == {200: 1, 400: 2, 401: 1}
    text = requests.get(f"{server}/metrics", timeout=60).text
    assert f'sam2flow_request_seconds_count{{route="{route}"}}' in text


def test_a_loaded_model_is_frozen_out_of_the_garbage_collector(tiny_checkpoint):
    """A full collection walks every tracked object (~180 ms with hiera_tiny loaded, the GIL held,
    a click waiting); the server freezes what exists once a model has loaded."""
    code = (
        "import gc, json; from sam2flow.server.app import create_app; "
        "from sam2flow.server.settings import ServerSettings; "
        f"app = create_app(ServerSettings(checkpoint={str(tiny_checkpoint)!r}, preload=['hiera_tiny'])); "
        "before = gc.get_freeze_count(); app.state.sam2flow.preload(); assert app.state.sam2flow.ready.is_set(); "
        "print(json.dumps([before, gc.get_freeze_count(), len(gc.get_objects())]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    before, frozen, tracked = json.loads(done.stdout.splitlines()[-1])
    assert before == 0 and frozen > 100_000 and tracked < frozen / 20, (before, frozen, tracked)


def test_freezing_the_heap_again_frees_what_became_garbage_since():
    """An evicted engine is cyclic garbage inside the frozen heap: the next model load must free it."""
    import gc
    import weakref

    from sam2flow.server.app import freeze_heap

    class Node:
        pass

    node = Node()
    node.self = node  # a reference cycle: only the cyclic collector frees it
    alive = weakref.ref(node)
    try:
        freeze_heap()
        del node
        freeze_heap()
        assert alive() is None, "garbage made before the last freeze stayed frozen"
    finally:
        gc.unfreeze()


def test_partly_outside_box_is_clipped(server, tiny_engine):
    body = {**GOOD, "format": "rle", "prompts": [{"box": {"x": 300, "y": 220, "width": 100, "height": 80}}]}
    r = post(server, "/sam2/segment_image", body)
    assert r.status_code == 200
    emb = tiny_engine.embed([IMAGE])[0]
    want = tiny_engine.predict_prompts(emb, [Prompt(box=[250, 180, 320, 240])]).masks[0]
    assert np.array_equal(rle_to_mask(r.json()["predictions"][0]["masks"]), want)


def test_mask_cleanup_options_reach_the_engine(server, tiny_engine):
    """``max_hole_area`` / ``max_sprinkle_area`` on /sam2/segment_image and as the step's extra fields
    give the engine's masks for the same values (random weights: ragged masks, so they change)."""
    emb = tiny_engine.embed([IMAGE])[0]
    want = tiny_engine.predict_prompts(emb, [Prompt(box=b) for b in BOXES], max_hole_area=60, max_sprinkle_area=60)
    plain = tiny_engine.predict_prompts(emb, [Prompt(box=b) for b in BOXES])
    assert any(not np.array_equal(a, b) for a, b in zip(want.masks, plain.masks)), "nothing to clean: proves nothing"
    body = {
        **GOOD,
        "format": "rle",
        "prompts": [box_prompt(b) for b in BOXES],
        "max_hole_area": 60,
        "max_sprinkle_area": 60,
    }
    r = post(server, "/sam2/segment_image", body)
    assert r.status_code == 200, r.text[:300]
    for p, mask in zip(r.json()["predictions"], want.masks):
        assert np.array_equal(rle_to_mask(p["masks"]), mask)
    spec = {**BOXES_WORKFLOW, "steps": [{**BOXES_WORKFLOW["steps"][0], "max_hole_area": 60, "max_sprinkle_area": 60}]}
    dets = {
        "image": {"width": 320, "height": 240},
        "predictions": [
            {**box_prompt(b)["box"], "class": "a", "class_id": 0, "detection_id": f"b{i}"} for i, b in enumerate(BOXES)
        ],
    }
    r = post(server, "/workflows/run", {"specification": spec, "inputs": {"image": GOOD["image"], "boxes": dets}})
    assert r.status_code == 200, r.text[:300]
    preds = r.json()["outputs"][0]["masks"]["predictions"]
    from sam2flow.formats import detections_to_predictions, predictions_to_detections
    from sam2flow.workflows.step import StepParameters, segment_images

    local = segment_images(
        tiny_engine,
        [IMAGE],
        ["image"],
        [predictions_to_detections(dets, IMAGE.shape[:2])],
        StepParameters(max_hole_area=60, max_sprinkle_area=60),
    )[0]
    expected = detections_to_predictions(local)
    assert len(preds) == len(expected) >= 1
    for got, exp in zip(preds, expected):
        for key in ("x", "y", "width", "height", "confidence", "points"):
            assert got[key] == pytest.approx(exp[key], abs=1e-4), key


def test_wait_ready_reports_why_a_server_never_became_ready(tmp_path):
    """``wait_ready`` (the Ray launcher's, the tests' and the benchmarks' one way to wait for a server)
    names the failure: a checkpoint that is not one, and a port nobody answers on."""
    import subprocess
    import sys

    from sam2flow.server.ready import wait_ready

    from conftest import free_port, stop_server

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    log, port = tmp_path / "server.log", free_port()
    command = [sys.executable, "-m", "sam2flow", "serve", "--port", str(port), "--preload", "hiera_tiny"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*command, "--checkpoint", str(bad), "--device", "cpu"], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        with pytest.raises(ValueError, match="could not load its model|exited with code") as failure:
            wait_ready(f"http://127.0.0.1:{port}", 120, proc, log, name="the test server")
        assert "the test server" in str(failure.value) and "bad.pt" in str(failure.value)
    finally:
        stop_server(proc)
    with pytest.raises(ValueError, match="not ready after 1 s"):
        wait_ready(f"http://127.0.0.1:{free_port()}", 1)
