"""SAM2 as a CVAT serverless function, called through nuclio's own SDK types with CVAT's request bodies.

The bodies are built as CVAT's lambda manager builds them (``cvat/apps/lambda_manager/views.py``,
``LambdaFunction.invoke``, cvat-ai/cvat e4c12a27d406): an interactor gets ``{"image", "pos_points",
"neg_points", "obj_bbox"}`` (``obj_bbox`` null without a box; clicks as ``[[x, y], ...]`` from the
UI's ``convertShapesForInteractor``), a detector ``{"image"}`` and ``"threshold"`` only when the
user set one. ``image`` is the base64 of the frame's encoded file (PNG here: lossless, so the
function sees the scene's exact pixels). Each handler answer also goes through nuclio's
``Response.from_entrypoint_output``, as nuclio's Python wrapper does before replying.

Models: the trained fixture model (one engine for the module: each hiera_tiny embedding costs
seconds on this CPU), a second one loaded by the deployed ``main.py`` from the function.yaml's
environment, and a live ``sam2flow serve`` for the forwarding mode. The fixture's mask-prompt path
(``mask_input``) is not trained, so click-to-refine is checked against the engine's own answer only.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import logging
import sys
from pathlib import Path

import cv2
import nuclio_sdk
import nuclio_sdk.test
import numpy as np
import pytest
import yaml
from PIL import Image

from sam2flow import Prompt, Sam2Engine
from sam2flow.engine.automatic import AutomaticConfig
from sam2flow.integrations import cvat
from sam2flow.testing import fixture
from sam2flow.testing.scenes import make_scene
from sam2flow.workflows.remote import RemoteEngine

from conftest import SERVER_API_KEY, free_port, mask_iou, start_server, stop_server

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "cvat"
FUNCTION_FILES = sorted((DEPLOY / "sam2").glob("function*.yaml"))
SCENE_SEED = 1_000_101
TRUE_SHAPE_BAR = 0.85
DETECTOR_GRID = AutomaticConfig(points_per_side=4)  # 16 clicks: the unprompted path, cheaply


# ---- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    model, spec = fixture.fixture_model()
    return Sam2Engine(model, spec, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def scene():
    return make_scene(SCENE_SEED, size=(360, 480))


@pytest.fixture(scope="module")
def frame(scene) -> str:
    return png_base64(scene.image)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return fixture.write_checkpoint(tmp_path_factory.mktemp("cvat-fixture") / "sam2.1_hiera_tiny.pt")


def png_base64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def nuclio_context(function: cvat.CvatFunction | None = None) -> nuclio_sdk.Context:
    logger = nuclio_sdk.Logger(logging.DEBUG, "test-cvat")
    logger.set_handler("default", sys.stderr, nuclio_sdk.logger.HumanReadableFormatter())
    context = nuclio_sdk.Context(logger, nuclio_sdk.test.Platform())
    context.user_data.function = function
    return context


def event(body) -> nuclio_sdk.Event:
    return nuclio_sdk.Event(body=body, content_type="application/json", method="POST", path="/")


def call(context, body, handler=cvat.handler) -> tuple[int, object]:
    """Run the handler and what nuclio's wrapper does with its answer; → (status, parsed JSON body)."""
    response = handler(context, event(body))
    assert isinstance(response, nuclio_sdk.Response)
    wire = nuclio_sdk.Response.from_entrypoint_output(json.dumps, response)
    assert wire["content_type"] == "application/json" and wire["body_encoding"] == "text"
    return wire["status_code"], json.loads(wire["body"])


def interactor_body(image_b64: str, pos, neg=(), box=None) -> dict:
    return {
        "image": image_b64,
        "pos_points": [list(p) for p in pos],
        "neg_points": [list(p) for p in neg],
        "obj_bbox": box,
    }


def interior(mask: np.ndarray) -> list[float]:
    """The pixel centre deepest inside a mask (x, y)."""
    depth = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    y, x = np.unravel_index(depth.argmax(), depth.shape)
    return [float(x) + 0.5, float(y) + 0.5]


def check_interactor_answer(answer: dict, hw: tuple[int, int]) -> np.ndarray:
    """CVAT's UI format: rows of 0/255 inside inclusive integer bounds; → the (H, W) mask."""
    assert set(answer) == {"mask", "bounds"}
    x0, y0, x1, y1 = answer["bounds"]
    assert all(isinstance(v, int) for v in answer["bounds"])
    rows = answer["mask"]
    assert len(rows) == y1 - y0 + 1 and all(len(r) == x1 - x0 + 1 for r in rows)
    assert set(np.unique(rows).tolist()) <= {0, 255}
    mask = cvat.mask_from_interactor_answer(answer, hw)
    ys, xs = np.nonzero(mask)
    assert [x0, y0, x1, y1] == [xs.min(), ys.min(), xs.max(), ys.max()]  # the tight box, inclusive
    return mask


class EncoderCounter:
    """Counts forward passes of the engine's image encoder (a torch forward hook)."""

    def __init__(self, engine):
        self.calls = 0
        self._hook = engine.model.vision_encoder.register_forward_hook(self._count)

    def _count(self, module, inputs, output):
        self.calls += 1

    def close(self):
        self._hook.remove()


# ---- interactor ----------------------------------------------------------------------------


def test_one_click_per_shape_gives_the_engines_mask_and_the_shape(engine, scene, frame):
    context = nuclio_context(cvat.CvatFunction(engine))
    emb = engine.embed([scene.image])[0]
    for k, truth in enumerate(scene.masks):
        click = interior(truth)
        status, answer = call(context, interactor_body(frame, [click]))
        assert status == 200, answer
        got = check_interactor_answer(answer, scene.size)
        want = engine.predict_prompts(emb, [Prompt(points=[click], labels=[1])], multimask_output=True).masks[0]
        assert mask_iou(got, want) >= 0.99, k
        assert mask_iou(got, truth) >= TRUE_SHAPE_BAR, (k, mask_iou(got, truth))


def test_second_click_only_decodes_and_refines_the_first(engine, scene):
    """A frame not seen before (the scene mirrored): the first click embeds it, the second only decodes
    and, extending the first, is decoded with the first answer's logits as mask prompt."""
    image = np.ascontiguousarray(scene.image[:, ::-1])
    truth = scene.masks[0][:, ::-1]
    frame = png_base64(image)
    context = nuclio_context(cvat.CvatFunction(engine))
    first_click, second_click = interior(truth), [5.5, 5.5]  # then a negative click on the background
    counter = EncoderCounter(engine)
    try:
        status, first = call(context, interactor_body(frame, [first_click]))
        assert status == 200 and counter.calls == 1
        status, second = call(context, interactor_body(frame, [first_click], [second_click]))
        assert status == 200 and counter.calls == 1  # the second click ran no encoder
    finally:
        counter.close()
    emb = engine.embed([image])[0]
    before = engine.predict_prompts(emb, [Prompt(points=[first_click], labels=[1])], multimask_output=True)
    assert mask_iou(check_interactor_answer(first, scene.size), before.masks[0]) >= 0.99
    assert mask_iou(before.masks[0], truth) >= TRUE_SHAPE_BAR
    both = dict(points=[first_click, second_click], labels=[1, 0])
    refined = engine.predict_prompts(emb, [Prompt(**both, mask_input=before.low_res_logits[0])], False).masks[0]
    fresh = engine.predict_prompts(emb, [Prompt(**both)], False).masks[0]
    assert (refined != fresh).sum() > 100  # the mask prompt matters here, so the check below can tell
    assert np.array_equal(check_interactor_answer(second, scene.size), refined)
    # The same request again gets the same answer; clicks that do not extend the last ones start afresh.
    assert call(context, interactor_body(frame, [first_click], [second_click])) == (200, second)
    status, other = call(context, interactor_body(frame, [second_click, first_click]))
    assert status == 200
    alone = engine.predict_prompts(emb, [Prompt(points=[second_click, first_click], labels=[1, 1])], False)
    assert np.array_equal(check_interactor_answer(other, scene.size), alone.masks[0])


def test_box_first_variant(engine, scene, frame):
    """``startswith_box``: the box alone, corners as drawn (here bottom-right first), then a click."""
    context = nuclio_context(cvat.CvatFunction(engine))
    emb = engine.embed([scene.image])[0]
    for k, truth in enumerate(scene.masks):
        x0, y0, x1, y1 = (float(v) for v in scene.boxes[k])
        box = [[x1 + 1, y1 + 1], [x0, y0]]
        status, answer = call(context, interactor_body(frame, [], box=box))
        assert status == 200, answer
        got = check_interactor_answer(answer, scene.size)
        want = engine.predict_prompts(emb, [Prompt(box=[x0, y0, x1 + 1, y1 + 1])], multimask_output=True).masks[0]
        assert mask_iou(got, want) >= 0.99, k
        assert mask_iou(got, truth) >= TRUE_SHAPE_BAR, (k, mask_iou(got, truth))
    status, answer = call(context, interactor_body(frame, [interior(truth)], box=box))
    assert status == 200 and check_interactor_answer(answer, scene.size).any()


# ---- detector ------------------------------------------------------------------------------


def test_detector_answers_mask_shapes_that_decode_to_the_engines_masks(engine, scene, frame):
    context = nuclio_context(cvat.CvatFunction(engine, "detector", "thing", automatic_config=DETECTOR_GRID))
    status, shapes = call(context, {"image": frame})
    assert status == 200
    want = engine.automatic(engine.embed([scene.image])[0], DETECTOR_GRID)
    kept = [i for i, m in enumerate(want.masks) if m.any()]
    assert len(shapes) == len(kept) >= 2
    for shape, i in zip(shapes, kept):
        assert shape["type"] == "mask" and shape["label"] == "thing"
        assert shape["confidence"] == pytest.approx(float(want.scores[i]))
        assert np.array_equal(cvat.mask_from_detector_shape(shape, scene.size), want.masks[i])
        ys, xs = np.nonzero(want.masks[i])
        x0, y0, x1, y1 = shape["mask"][-4:]
        assert [x0, y0, x1, y1] == [xs.min(), ys.min(), xs.max(), ys.max()]  # the tight box, inclusive
        crop = want.masks[i][y0 : y1 + 1, x0 : x1 + 1]
        assert shape["mask"][:-4] == crop.astype(int).ravel().tolist()  # row by row, as CVAT's to_cvat_mask
        outline = np.array(shape["points"]).reshape(-1, 2)
        assert len(outline) >= 3 and want.masks[i][outline[:, 1].astype(int), outline[:, 0].astype(int)].all()
    cut = float(np.median(want.scores[kept]))
    status, some = call(context, {"image": frame, "threshold": cut})
    assert status == 200 and len(some) == sum(want.scores[i] >= cut for i in kept) < len(shapes)


# ---- bad input -----------------------------------------------------------------------------


NOT_AN_IMAGE = base64.b64encode(b"GIF89a but not really an image").decode()


@pytest.mark.parametrize(
    "change, status, words",
    [
        (dict(pos_points=[]), 400, "no positive points"),
        (dict(pos_points=[], neg_points=[[10, 10]]), 400, "no positive points"),
        (dict(pos_points=[[490, 10]]), 400, "pos_points[0] [490, 10] lies outside the 480x360 image"),
        (dict(neg_points=[[10, -1]]), 400, "neg_points[0]"),
        (dict(pos_points=[[10]]), 400, "pos_points[0] must be [x, y]"),
        (dict(pos_points=[[10, float("nan")]]), 400, "pos_points[0] must be [x, y]"),
        (dict(pos_points=None), 400, "missing field 'pos_points'"),
        (dict(neg_points="none"), 400, "field 'neg_points' must be a list"),
        (dict(image=None), 400, "missing field 'image'"),
        (dict(image=12), 400, "field 'image' must be a base64 string"),
        (dict(image="@@not base64@@"), 400, "not valid base64"),
        (dict(image=NOT_AN_IMAGE), 400, "not a readable image"),
        (dict(obj_bbox=[[1, 2]]), 400, "obj_bbox must be"),
        (dict(obj_bbox=[[500, 400], [600, 450]]), 400, "outside"),
        (dict(threshold=2), 400, "threshold must be a number within [0, 1]"),
    ],
)
def test_bad_interactor_requests_get_a_4xx_naming_the_problem(engine, scene, frame, change, status, words):
    context = nuclio_context(cvat.CvatFunction(engine))
    body = {**interactor_body(frame, [interior(scene.masks[0])]), **change}
    got_status, answer = call(context, body)
    assert got_status == status and words in answer["error"], answer


@pytest.mark.parametrize(
    "body, words",
    [
        (b"{not json", "not JSON"),
        ([1, 2], "must be a JSON object"),
        ({"frame": 3}, "missing field 'image'"),
    ],
)
def test_bodies_that_are_no_request(engine, body, words):
    for kind in cvat.KINDS:
        status, answer = call(nuclio_context(cvat.CvatFunction(engine, kind)), body)
        assert status == 400 and words in answer["error"], answer


class BrokenEngine:
    """An engine failing as a real one can (out of memory): the worker must answer, not crash."""

    def embed(self, images):
        raise RuntimeError("CUDA out of memory")


def test_limits_and_failures_are_answered_not_raised(engine, scene, frame):
    small = nuclio_context(cvat.CvatFunction(engine, max_pixels=100 * 100))
    status, answer = call(small, interactor_body(frame, [interior(scene.masks[0])]))
    assert status == 413 and "480x360" in answer["error"] and "limit of 10000" in answer["error"]
    status, answer = call(nuclio_context(cvat.CvatFunction(engine, "detector")), {"image": NOT_AN_IMAGE})
    assert status == 400 and "not a readable image" in answer["error"]
    status, answer = call(
        nuclio_context(cvat.CvatFunction(engine)),
        {**interactor_body(frame, [interior(scene.masks[0])]), "threshold": 1.0},
    )
    assert status == 422 and "below threshold" in answer["error"]
    status, answer = call(nuclio_context(cvat.CvatFunction(BrokenEngine())), interactor_body(frame, [[10, 10]]))
    assert status == 500 and answer["error"] == "internal error: RuntimeError: CUDA out of memory"
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    remote = cvat.CvatFunction(RemoteEngine(url, "hiera_tiny", retries=1), reuse_logits=False)
    status, answer = call(nuclio_context(remote), interactor_body(frame, [[10, 10]]))
    assert status == 502 and url in answer["error"]


# ---- function.yaml -------------------------------------------------------------------------


def annotations_as_nuclio_keeps_them(meta: dict) -> dict:
    """nuclio stores annotations as strings (YAML ``2`` arrives as ``"2"``, an empty value as "")."""
    return {k: "" if v is None else (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in meta.items()}


def test_function_yaml_has_what_cvats_lambda_manager_reads():
    configs = {p.name: yaml.safe_load(p.read_text()) for p in FUNCTION_FILES}
    assert set(configs) == {"function.yaml", "function-box.yaml", "function-detector.yaml"}
    names = [c["metadata"]["name"] for c in configs.values()]
    assert len(set(names)) == 3 and all(c["metadata"]["namespace"] == "cvat" for c in configs.values())
    main = load_main()
    deploy_script = (DEPLOY / "deploy.sh").read_text()
    for file, config in configs.items():
        spec, ann = config["spec"], annotations_as_nuclio_keeps_them(config["metadata"]["annotations"])
        env = {e["name"]: e["value"] for e in spec.get("env", [])}
        assert ann["type"] == env["SAM2FLOW_CVAT_KIND"] == cvat.FunctionConfig.from_env(env).kind, file
        assert ann["name"] and spec["description"], file
        labels = json.loads(ann.get("spec") or "[]")  # CVAT reads the label spec as JSON
        assert len({label["name"] for label in labels}) == len(labels), file
        module, entry = spec["handler"].split(":")
        assert module == "main" and callable(getattr(main, entry)) and callable(main.init_context)
        major, minor = map(int, spec["runtime"].removeprefix("python:").split("."))
        assert spec["runtime"].startswith("python:") and (major, minor) >= (3, 10), file  # sam2flow's floor
        assert spec["eventTimeout"].endswith("s")
        http = [t for t in spec["triggers"].values() if t["kind"] == "http"]
        assert len(http) == 1 and http[0]["numWorkers"] == 1, file  # one process: one embedding cache
        assert http[0]["attributes"]["maxRequestBodySize"] >= 32 << 20
        assert spec["build"]["baseImage"] in deploy_script and spec["build"]["image"], file
        if ann["type"] == "interactor":
            assert int(ann.get("version", "1")) >= 2, file  # CVAT's UI refuses older interactor APIs
            assert int(ann["min_pos_points"]) >= 0 and int(ann["min_neg_points"]) >= 0, file
            assert ann["help_message"], file
        else:
            assert labels == [{"id": 0, "name": env["SAM2FLOW_CVAT_LABEL"], "type": "mask"}], file
    clicks = annotations_as_nuclio_keeps_them(configs["function.yaml"]["metadata"]["annotations"])
    box = annotations_as_nuclio_keeps_them(configs["function-box.yaml"]["metadata"]["annotations"])
    # CVAT takes bool() of the string: any value, "false" too, would turn the box on.
    assert "startswith_box" not in clicks and int(clicks["min_pos_points"]) == 1
    assert box["startswith_box"] == "true" and int(box["min_pos_points"]) == 0


def test_environment_settings_are_checked():
    assert cvat.FunctionConfig.from_env({}) == cvat.FunctionConfig()
    with pytest.raises(ValueError, match="SAM2FLOW_CVAT_KIND"):
        cvat.FunctionConfig.from_env({"SAM2FLOW_CVAT_KIND": "tracker"})
    with pytest.raises(ValueError, match="SAM2FLOW_MAX_IMAGE_PIXELS must be an integer"):
        cvat.FunctionConfig.from_env({"SAM2FLOW_MAX_IMAGE_PIXELS": "lots"})
    with pytest.raises(ValueError, match="set it on the server"):
        cvat.FunctionConfig.from_env(
            {"SAM2FLOW_REMOTE_URL": "http://x:9001", "SAM2FLOW_AUTOMATIC_POINTS_PER_SIDE": "8"}
        )


# ---- the deployed entry point, and forwarding to a server ----------------------------------


def load_main():
    """deploy/cvat/sam2/main.py as a module (registered: nuclio's test platform looks its handler's module up)."""
    spec = importlib.util.spec_from_file_location("sam2flow_cvat_main", DEPLOY / "sam2" / "main.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_deployed_main_loads_the_model_from_the_function_yaml_environment(
    engine, scene, frame, checkpoint, monkeypatch
):
    """nuclio's own test platform calls main.init_context once, then main.handler."""
    config = yaml.safe_load((DEPLOY / "sam2" / "function.yaml").read_text())
    for item in config["spec"]["env"]:
        monkeypatch.setenv(item["name"], str(item["value"]))
    local = {"SAM2FLOW_CHECKPOINT": str(checkpoint), "SAM2FLOW_DEVICE": "cpu", "SAM2FLOW_DTYPE": "float32"}
    for name, value in local.items():
        monkeypatch.setenv(name, value)
    main = load_main()
    platform = nuclio_sdk.test.Platform()
    click = interior(scene.masks[1])
    response = platform.call_handler(main.handler, event(interactor_body(frame, [click])))
    assert response.status_code == 200, response.body
    got = check_interactor_answer(json.loads(response.body), scene.size)
    want = engine.predict_prompts(engine.embed([scene.image])[0], [Prompt(points=[click], labels=[1])]).masks[0]
    assert mask_iou(got, want) >= 0.99 and mask_iou(got, scene.masks[1]) >= TRUE_SHAPE_BAR
    response = platform.call_handler(main.handler, event(interactor_body(frame, [])))
    assert response.status_code == 400 and "no positive points" in json.loads(response.body)["error"]


def test_forwarding_to_a_running_sam2flow_server(engine, scene, frame, checkpoint, tmp_path):
    url, proc = start_server(checkpoint, tmp_path / "server.log")
    try:
        context = nuclio_context()
        cvat.init_context(context, {"SAM2FLOW_REMOTE_URL": url, "SAM2FLOW_API_KEY": SERVER_API_KEY})
        emb = engine.embed([scene.image])[0]
        for k in (0, 2):
            click = interior(scene.masks[k])
            status, answer = call(context, interactor_body(frame, [click]))
            assert status == 200, answer
            got = check_interactor_answer(answer, scene.size)
            want = engine.predict_prompts(emb, [Prompt(points=[click], labels=[1])]).masks[0]
            assert mask_iou(got, want) >= 0.99 and mask_iou(got, scene.masks[k]) >= TRUE_SHAPE_BAR
        # A click extending the last ones: the server keeps its logits, so none are sent along.
        status, answer = call(context, interactor_body(frame, [click], [[5.5, 5.5]]))
        assert status == 200, answer
        want = engine.predict_prompts(emb, [Prompt(points=[click, [5.5, 5.5]], labels=[1, 0])], False).masks[0]
        assert mask_iou(check_interactor_answer(answer, scene.size), want) >= 0.99
        status, answer = call(context, interactor_body(frame, [[490, 10]]))
        assert status == 400 and "outside" in answer["error"]  # checked here, before any upload
    finally:
        stop_server(proc)
