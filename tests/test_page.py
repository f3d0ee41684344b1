"""The labelling page (``GET /``) in a real browser: the system's headless Chromium driven by Selenium.

Against a live ``sam2flow serve`` with the fixture model: a box dragged over a generated shape and a
negative click outside it give the engine's own answer to that prompt (the box's low-resolution
logits fed back as mask input) and the true shape; undo restores the box's mask; two objects with two
classes export to a COCO file that pycocotools loads with those categories. Folder mode saves as it
goes and resumes after a server restart, and answers 404 for any name outside the folder.

Nothing is downloaded: Chromium and chromedriver come from the operating system's packages
(``tools/setup-dev.sh``), and Selenium Manager is off (``SE_OFFLINE``). ``SAM2FLOW_PAGE_SCREENSHOT=FILE``
saves a screenshot of the page mid-labelling (``docs/page.png``).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from PIL import Image
from pycocotools.coco import COCO

from sam2flow import Prompt, Sam2Engine
from sam2flow.formats import predictions_to_detections, rle_to_mask
from sam2flow.testing import fixture
from sam2flow.testing.scenes import make_scene

from conftest import SERVER_API_KEY, mask_iou, start_server, stop_server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCENE_SEED = 1_000_102  # polygons and a rectangle, 360 x 480
# The refined shape: its box's mask fed back as mask input with a negative click keeps it (IoU 0.91 with the
# truth). The fixture model's mask-input path is weak on shape 0 (box 0.96, box + click + mask input 0.15).
REFINED = 2
LABELS = "cat,dog"

webdriver = pytest.importorskip("selenium.webdriver")
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("needs Chromium and chromedriver from the OS packages (tools/setup-dev.sh)", allow_module_level=True)

from selenium.webdriver.common.actions.action_builder import ActionBuilder  # noqa: E402
from selenium.webdriver.common.actions.mouse_button import MouseButton  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return fixture.write_checkpoint(tmp_path_factory.mktemp("page-fixture") / "sam2.1_hiera_tiny.pt")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    s = make_scene(SCENE_SEED, size=(360, 480))
    path = tmp_path_factory.mktemp("page-scene") / "scene.png"
    Image.fromarray(s.image).save(path)
    return s, path


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    url, proc = start_server(
        checkpoint, tmp_path_factory.mktemp("page-server") / "server.log", {"SAM2FLOW_LABELS": LABELS}
    )
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager fetch a browser or driver
    profile = tempfile.mkdtemp(prefix="sam2flow-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1280,800",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(120)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def engine():
    model, spec = fixture.fixture_model()
    return Sam2Engine(model, spec, device="cpu", dtype="float32")


# ---------------------------------------------------------------- driving the page
def js(driver, expr: str):
    """Evaluate ``expr`` in the page; promises are awaited."""
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"Promise.resolve().then(() => ({expr})).then(v => done(v), e => done({{error: String(e)}}));"
    )


def wait_for(driver, expr: str, timeout: float = 60):
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: d.execute_script(f"return {expr}"))


def open_page(driver, url: str, key: str | None = SERVER_API_KEY):
    driver.get(url + "/page/config")  # same origin: forget the key an earlier test gave
    driver.execute_script("sessionStorage.clear()")
    driver.get(url + "/")
    wait_for(
        driver,
        "window.sam2flowPage && window.sam2flowPage.state.config !== null || "
        "document.getElementById('key-dialog').open",
    )
    if key is not None:
        wait_for(driver, "document.getElementById('key-dialog').open")
        driver.find_element(By.ID, "key-input").send_keys(key + "\n")
        wait_for(driver, "!document.getElementById('key-dialog').open")


def load_image(driver, path: Path):
    field = driver.find_element(By.ID, "file")
    driver.execute_script("arguments[0].hidden = false", field)
    field.send_keys(str(path))
    driver.execute_script("arguments[0].hidden = true", field)
    wait_for(driver, "window.sam2flowPage.state.image && window.sam2flowPage.state.image.imageId")


def mouse(driver, x: float, y: float, x2: float | None = None, y2: float | None = None, button=MouseButton.LEFT):
    """A click at image pixel (x, y), or a drag from there to (x2, y2), with the real mouse."""
    start = driver.execute_script("return window.sam2flowPage.toClient(arguments[0], arguments[1])", x, y)
    actions = ActionBuilder(driver)
    actions.pointer_action.move_to_location(round(start[0]), round(start[1])).pointer_down(button)
    if x2 is not None:
        end = driver.execute_script("return window.sam2flowPage.toClient(arguments[0], arguments[1])", x2, y2)
        actions.pointer_action.move_to_location(round((start[0] + end[0]) / 2), round((start[1] + end[1]) / 2))
        actions.pointer_action.move_to_location(round(end[0]), round(end[1]))
    actions.pointer_action.pointer_up(button)
    actions.perform()
    assert js(driver, "window.sam2flowPage.idle().then(() => true)") is True


def objects(driver) -> list[dict]:
    return driver.execute_script("return JSON.parse(JSON.stringify(window.sam2flowPage.state.objects))")


def status_text(driver) -> str:
    return driver.find_element(By.ID, "status-text").text


def set_label(driver, label: str):
    """Deselect (New object), then type the class the next object gets."""
    driver.find_element(By.ID, "new-object").click()
    field = driver.find_element(By.ID, "label")
    field.clear()
    field.send_keys(label + "\n")


def box_around(scene, k: int, margin: int = 3) -> list[float]:
    """Shape ``k``'s box with a margin, inside the image (a drag must start on the canvas)."""
    h, w = scene.masks.shape[1:]
    x1, y1, x2, y2 = scene.boxes[k]
    return [
        float(max(x1 - margin, 1)),
        float(max(y1 - margin, 1)),
        float(min(x2 + 1 + margin, w - 2)),
        float(min(y2 + 1 + margin, h - 2)),
    ]


def outside_point(scene, k: int) -> tuple[float, float]:
    """A pixel inside shape ``k``'s box but off the shape (near its top left corner)."""
    x1, y1, _, _ = scene.boxes[k]
    x, y = float(x1 + 4), float(y1 + 4)
    assert not scene.masks[k][int(y), int(x)]
    return x, y


# ---------------------------------------------------------------- tests
def test_box_then_negative_click_gives_the_engines_mask_and_undo_restores(server, browser, scene, engine):
    s, path = scene
    open_page(browser, server)
    load_image(browser, path)
    box = box_around(s, REFINED)
    mouse(browser, box[0], box[1], box[2], box[3])
    (after_box,) = objects(browser)
    x, y = outside_point(s, REFINED)
    mouse(browser, x, y, button=MouseButton.RIGHT)
    (obj,) = objects(browser)
    assert browser.execute_script("return window.sam2flowPage.state.lastDecode.refined") is True
    assert obj["points"] and obj["points"][-1][2] == 0 and obj["box"] == after_box["box"]

    emb = engine.embed([s.image])[0]
    first = engine.predict_prompts(emb, [Prompt(box=obj["box"])], True)
    points = [p[:2] for p in obj["points"]]
    labels = [int(p[2]) for p in obj["points"]]
    refined = engine.predict_prompts(
        emb, [Prompt(obj["box"], points, labels, first.low_res_logits[0])], len(points) <= 1
    )
    page_mask = rle_to_mask(obj["rle"])
    assert mask_iou(rle_to_mask(after_box["rle"]), first.masks[0]) >= 0.98
    assert mask_iou(page_mask, refined.masks[0]) >= 0.98, mask_iou(page_mask, refined.masks[0])
    assert mask_iou(page_mask, s.masks[REFINED]) >= 0.85, mask_iou(page_mask, s.masks[REFINED])
    assert "decoded in" in status_text(browser)

    browser.find_element(By.TAG_NAME, "body").send_keys("\ue009z")  # Ctrl+Z (the page's shortcut)
    (undone,) = objects(browser)
    assert undone["rle"] == after_box["rle"] and undone["points"] == []
    browser.find_element(By.ID, "redo").click()
    assert objects(browser)[0]["rle"] == obj["rle"]


def test_two_objects_with_two_classes_export_to_coco(server, browser, scene, tmp_path):
    s, path = scene
    open_page(browser, server)
    load_image(browser, path)
    for k, label in ((0, "cat"), (1, "dog")):
        set_label(browser, label)
        mouse(browser, *box_around(s, k))
    if os.environ.get("SAM2FLOW_PAGE_SCREENSHOT"):
        browser.execute_script("window.sam2flowPage.select(window.sam2flowPage.state.objects[1].id)")
        browser.save_screenshot(os.environ["SAM2FLOW_PAGE_SCREENSHOT"])
    doc = js(browser, "window.sam2flowPage.exportJson('coco')")
    (tmp_path / "coco.json").write_text(json.dumps(doc))
    coco = COCO(str(tmp_path / "coco.json"))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert sorted(names.values()) == ["cat", "dog"]
    anns = coco.loadAnns(coco.getAnnIds())
    assert [names[a["category_id"]] for a in anns] == ["cat", "dog"]
    for k, ann in enumerate(anns):
        assert mask_iou(coco.annToMask(ann), s.masks[k]) >= 0.85

    preds = js(browser, "window.sam2flowPage.exportJson('roboflow')")
    dets = predictions_to_detections(preds["predictions"], image_hw=(360, 480))
    assert list(dets.data["class_name"]) == ["cat", "dog"]


def test_a_wrong_key_is_asked_again_then_the_image_embeds(server, browser, scene):
    s, path = scene
    open_page(browser, server, key="wrong-key")
    field = browser.find_element(By.ID, "file")
    browser.execute_script("arguments[0].hidden = false", field)
    field.send_keys(str(path))  # the embed request is refused (401): the page asks for the key again
    wait_for(browser, "document.getElementById('key-dialog').open")
    assert "refused" in browser.find_element(By.ID, "key-error").text
    browser.find_element(By.ID, "key-input").send_keys(SERVER_API_KEY + "\n")
    wait_for(browser, "window.sam2flowPage.state.image && window.sam2flowPage.state.image.imageId")
    assert "Ready" in status_text(browser)


# ---------------------------------------------------------------- folder mode
def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (no client-side normalisation of ``..``)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", path, headers={"Authorization": f"Bearer {SERVER_API_KEY}"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_folder_mode_saves_resumes_and_stays_inside(checkpoint, browser, scene, tmp_path):
    s, _ = scene
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(s.image).save(root / "a.png")
    Image.fromarray(make_scene(SCENE_SEED + 1, size=(240, 320)).image).save(root / "sub" / "b.png")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for clients")
    (root / "link.png").symlink_to(secret)
    out = tmp_path / "labels.coco.json"
    env = {"SAM2FLOW_IMAGES": str(root), "SAM2FLOW_LABELS": LABELS, "SAM2FLOW_ANNOTATIONS": str(out)}

    url, proc = start_server(checkpoint, tmp_path / "server1.log", env)
    try:
        for bad in (
            "/page/folder/file/../secret.png",
            "/page/folder/file/%2e%2e/secret.png",
            "/page/folder/file/sub/../../secret.png",
            f"/page/folder/file/{secret}",
            f"/page/folder/file/{secret.as_posix().replace('/', '%2F')}",
            "/page/folder/file/link.png",
            "/page/folder/objects/../secret.png",
            "/page/folder/file//etc/passwd",
        ):
            status, body = raw_get(url, bad)
            assert status == 404 and json.loads(body) == {"error": "no such image in the folder"}, (bad, status, body)
        r = requests.post(
            f"{url}/page/folder/embed",
            json={"name": str(secret)},
            headers={"Authorization": f"Bearer {SERVER_API_KEY}"},
            timeout=30,
        )
        assert r.status_code == 404
        assert raw_get(url, "/page/folder/file/sub/b.png")[0] == 200

        open_page(browser, url)
        wait_for(browser, "window.sam2flowPage.state.image && window.sam2flowPage.state.image.imageId")
        assert browser.execute_script("return window.sam2flowPage.state.image.name") == "a.png"
        set_label(browser, "dog")
        mouse(browser, *box_around(s, 0))
        (saved,) = objects(browser)
        doc = json.loads(out.read_text())
        assert [c["name"] for c in doc["categories"]] == ["cat", "dog"]
        assert [a["category_id"] for a in doc["annotations"]] == [2]
    finally:
        stop_server(proc)

    url, proc = start_server(checkpoint, tmp_path / "server2.log", env)
    try:
        open_page(browser, url)
        wait_for(browser, "window.sam2flowPage.state.image && window.sam2flowPage.state.image.imageId")
        # resumes on the first image not yet labelled; the labelled one comes back with its object
        assert browser.execute_script("return window.sam2flowPage.state.image.name") == "sub/b.png"
        browser.find_element(By.TAG_NAME, "body").send_keys("a")
        wait_for(browser, "window.sam2flowPage.state.image.name === 'a.png' && window.sam2flowPage.state.image.imageId")
        (back,) = objects(browser)
        assert back["label"] == "dog" and back["rle"] == saved["rle"] and back["box"] == saved["box"]
        assert mask_iou(rle_to_mask(back["rle"]), s.masks[0]) >= 0.85
    finally:
        stop_server(proc)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # atomic writes leave nothing behind
