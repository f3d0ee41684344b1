"""Hostile requests against a live server: no file of the server's is read, no bomb is decoded, no
limit is skipped, no host the operator did not allow is fetched; the server stays up.

Every request goes over real HTTP to a ``sam2flow serve`` subprocess (API key set, 20 prompts
per image, 40 per request, 4 M pixels).
"""

from __future__ import annotations

import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from sam2flow.formats import rle_to_mask

from conftest import (
    BOXES_WORKFLOW,
    SERVER_API_KEY,
    SERVER_MAX_PROMPTS,
    SERVER_MAX_REQUEST_PROMPTS,
    random_image,
    start_server,
    stop_server,
)

IMAGE = random_image(120, 160, seed=61)
WIRE_MESSAGE = 'an image must be {"type": "base64" | "numpy" | "url", "value": ...}'
URL_MAX_BYTES = 100_000
URL_TIMEOUT_S = 2


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bomb_png(side: int = 12000) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG", optimize=True)  # ~140 KB, 432 MB as RGB
    return buf.getvalue()


def post(url: str, route: str, body, key: str | None = SERVER_API_KEY, timeout: float = 120):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{url}{route}", json=body, headers=headers, timeout=timeout)


def detections(n: int, hw=(120, 160)) -> dict:
    h, w = hw
    return {
        "image": {"width": w, "height": h},
        "predictions": [
            {
                "x": 40 + i % 60,
                "y": 40 + i % 30,
                "width": 30,
                "height": 30,
                "class": "thing",
                "class_id": 0,
                "detection_id": f"d{i}",
            }
            for i in range(n)
        ],
    }


def workflow(image_input, boxes=None) -> dict:
    return {"specification": BOXES_WORKFLOW, "inputs": {"image": image_input, "boxes": boxes or detections(2)}}


GOOD_IMAGE = {"type": "base64", "value": b64(png(IMAGE))}


def assert_serves(url: str) -> None:
    """The server is up and answers a valid request with masks."""
    r = post(url, "/workflows/run", workflow(GOOD_IMAGE))
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["outputs"][0]["masks"]["predictions"]) >= 1


@pytest.fixture(scope="module")
def server(live_server_process):
    return live_server_process


@pytest.fixture(scope="module")
def server_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("server-files") / "secret.png"
    path.write_bytes(png(IMAGE))
    return path


def test_a_valid_workflow_request_is_served(server):
    assert_serves(server[0])


@pytest.mark.parametrize(
    "form",
    ["path", "file", "missing path", "missing file", "path in a list", "nested batch", "bare base64", "other type"],
)
def test_workflow_images_are_only_wire_forms(server, server_png, form):
    """Server paths get the same 4xx as any unsupported input: nothing read, nothing revealed."""
    url, _ = server
    missing = str(server_png.parent / "missing.png")
    image = {
        "path": str(server_png),
        "file": {"type": "file", "value": str(server_png)},
        "missing path": missing,
        "missing file": {"type": "file", "value": missing},
        "path in a list": [GOOD_IMAGE, str(server_png)],
        "nested batch": [[GOOD_IMAGE]],
        "bare base64": b64(png(IMAGE)),
        "other type": {"type": "s3", "value": "bucket/key.png"},
    }[form]
    boxes = [detections(2), detections(2)] if isinstance(image, list) else None
    r = post(url, "/workflows/run", workflow(image, boxes))
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error.endswith(WIRE_MESSAGE) and error.startswith("input 'image'["), error
    assert str(server_png.parent) not in error
    assert_serves(url)


@pytest.mark.parametrize("route", ["/sam2/segment_image", "/sam2/embed_image"])
@pytest.mark.parametrize("form", ["path", "file"])
def test_model_routes_refuse_paths_with_the_same_message(server, server_png, route, form):
    url, _ = server
    image = str(server_png) if form == "path" else {"type": "file", "value": str(server_png)}
    r = post(url, route, {"image": image, "prompts": [{"box": {"x": 60, "y": 60, "width": 40, "height": 40}}]})
    assert r.status_code == 422 and r.json()["error"] == f"image: {WIRE_MESSAGE}", r.text[:300]


def _peak_rss_reset(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak resident set size becomes the current one


def _peak_rss_mib(pid: int) -> float:
    line = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


@pytest.mark.parametrize("where", ["workflow bare", "workflow wrapped", "segment_image"])
def test_a_decompression_bomb_is_refused_from_its_header(server, where):
    """A 140 KB PNG of 12000 x 12000 pixels: refused before a pixel is decoded, memory flat."""
    url, proc = server
    data = bomb_png()
    _peak_rss_reset(proc.pid)
    before = _peak_rss_mib(proc.pid)
    if where == "segment_image":
        r = post(
            url,
            "/sam2/segment_image",
            {
                "image": {"type": "base64", "value": b64(data)},
                "prompts": [{"box": {"x": 60, "y": 60, "width": 40, "height": 40}}],
            },
        )
    else:
        r = post(
            url,
            "/workflows/run",
            workflow(b64(data) if where == "workflow bare" else {"type": "base64", "value": b64(data)}),
        )
    grown = _peak_rss_mib(proc.pid) - before
    if where == "workflow bare":
        assert r.status_code == 400 and r.json()["error"].endswith(WIRE_MESSAGE), r.text[:300]
    else:
        assert r.status_code == 413 and "12000x12000 pixels is over the limit" in r.json()["error"], r.text[:300]
    assert grown < 100, f"the server's peak memory grew by {grown:.0f} MiB"
    assert_serves(url)


def test_workflow_prompts_per_image_are_limited(server):
    url, _ = server
    r = post(url, "/workflows/run", workflow(GOOD_IMAGE, detections(200)))
    assert r.status_code == 413, r.text[:300]
    error = r.json()["error"]
    assert f"200 prompts is more than this server's limit of {SERVER_MAX_PROMPTS} per image" in error, error
    assert_serves(url)


def test_workflow_prompts_per_request_are_limited(server):
    url, _ = server
    per_image = SERVER_MAX_PROMPTS - 5
    n = SERVER_MAX_REQUEST_PROMPTS // per_image + 1
    body = workflow([GOOD_IMAGE] * n, [detections(per_image)] * n)
    metrics_before = requests.get(f"{url}/metrics").text
    r = post(url, "/workflows/run", body)
    assert r.status_code == 413, r.text[:300]
    error = r.json()["error"]
    assert (
        f"{n * per_image} prompts in one request is more than this server's limit of "
        f"{SERVER_MAX_REQUEST_PROMPTS}" in error
    ), error
    # refused before any model work: no image was embedded
    count = [
        l for l in requests.get(f"{url}/metrics").text.splitlines() if l.startswith("sam2flow_embed_batch_size_count")
    ]
    assert count == [l for l in metrics_before.splitlines() if l.startswith("sam2flow_embed_batch_size_count")]
    assert_serves(url)


def test_segment_image_prompt_limit_names_it(server):
    url, _ = server
    box = {"box": {"x": 60, "y": 60, "width": 40, "height": 40}}
    r = post(url, "/sam2/segment_image", {"image": GOOD_IMAGE, "prompts": [box] * (SERVER_MAX_PROMPTS + 1)})
    assert r.status_code == 413 and f"limit of {SERVER_MAX_PROMPTS} per image" in r.json()["error"], r.text[:300]


@pytest.mark.parametrize("route", ["/sam2/segment_image", "/sam2/embed_image", "/workflows/run"])
@pytest.mark.parametrize("key", [None, "wrong"])
def test_every_model_route_needs_the_key(server, route, key):
    body = workflow(GOOD_IMAGE) if route == "/workflows/run" else {"image": GOOD_IMAGE}
    r = post(server[0], route, body, key=key)
    assert r.status_code == 401 and r.json() == {"error": "missing or wrong API key"}


def test_url_images_are_refused_when_disabled(server):
    url, _ = server
    for value in ("http://example.com/a.png", "file:///etc/passwd", "ftp://example.com/a.png"):
        r = post(
            url,
            "/sam2/segment_image",
            {
                "image": {"type": "url", "value": value},
                "prompts": [{"box": {"x": 60, "y": 60, "width": 40, "height": 40}}],
            },
        )
        assert r.status_code == 400 and "URL images are disabled" in r.json()["error"]


# ---- URL images enabled: a loopback HTTP server plays the image host ------------------------


class _ImageHost(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        route = self.path
        if route == "/ok.png":
            self._send(png(IMAGE))
        elif route == "/big.png":
            self._send(b"\0" * (URL_MAX_BYTES + 1))
        elif route == "/big-undeclared":  # no Content-Length: the limit must hold while reading
            self.send_response(200)
            self.end_headers()
            for _ in range(30):
                self.wfile.write(b"\0" * (URL_MAX_BYTES // 10))
        elif route == "/slow.png":  # a trickle: every read is quick, the whole download is not
            body = png(IMAGE)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for i in range(0, len(body), 64):
                self.wfile.write(body[i : i + 64])
                self.wfile.flush()
                time.sleep(0.25)
        elif route == "/text":
            self._send(b"<html>not an image</html>")
        elif route.startswith("/to-"):
            self.send_response(302)
            self.send_header(
                "Location",
                {"/to-file": "file:///etc/passwd", "/to-ftp": "ftp://127.0.0.1/x.png", "/to-ok": "/ok.png"}[route],
            )
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHost)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


@pytest.fixture(scope="module")
def url_server(tiny_checkpoint, tmp_path_factory):
    env = {
        "SAM2FLOW_ALLOW_URL_IMAGES": "true",
        "SAM2FLOW_URL_HOSTS": "127.0.0.1",
        "SAM2FLOW_URL_MAX_BYTES": str(URL_MAX_BYTES),
        "SAM2FLOW_URL_TIMEOUT_S": str(URL_TIMEOUT_S),
    }
    url, proc = start_server(tiny_checkpoint, tmp_path_factory.mktemp("url-server") / "server.log", env)
    yield url
    stop_server(proc)


def _segment_url(server: str, image_url: str):
    return post(
        server,
        "/sam2/segment_image",
        {
            "image": {"type": "url", "value": image_url},
            "format": "rle",
            "prompts": [{"box": {"x": 60, "y": 60, "width": 40, "height": 40}}],
        },
    )


def test_enabled_url_images_are_fetched_and_equal_the_same_image_sent_inline(url_server, image_host):
    inline = post(
        url_server,
        "/sam2/segment_image",
        {"image": GOOD_IMAGE, "format": "rle", "prompts": [{"box": {"x": 60, "y": 60, "width": 40, "height": 40}}]},
    )
    for route in ("/ok.png", "/to-ok"):
        r = _segment_url(url_server, f"http://127.0.0.1:{image_host}{route}")
        assert r.status_code == 200, r.text[:300]
        assert np.array_equal(
            rle_to_mask(r.json()["predictions"][0]["masks"]), rle_to_mask(inline.json()["predictions"][0]["masks"])
        )
    wf = post(url_server, "/workflows/run", workflow({"type": "url", "value": f"http://127.0.0.1:{image_host}/ok.png"}))
    assert wf.status_code == 200, wf.text[:300]


@pytest.mark.parametrize(
    "route, status, message",
    [
        ("/big.png", 413, f"over the limit of {URL_MAX_BYTES} bytes"),
        ("/big-undeclared", 413, f"over the limit of {URL_MAX_BYTES} bytes"),
        ("/slow.png", 400, f"took longer than {URL_TIMEOUT_S} s"),
        ("/text", 400, "not a readable image"),
        ("/to-file", 400, "only http(s) URLs are allowed, got 'file:///etc/passwd'"),
        ("/to-ftp", 400, "only http(s) URLs are allowed, got 'ftp://"),
        ("/missing", 400, "answered HTTP 404"),
    ],
)
def test_enabled_url_images_keep_their_limits(url_server, image_host, route, status, message):
    start = time.monotonic()
    r = _segment_url(url_server, f"http://127.0.0.1:{image_host}{route}")
    assert r.status_code == status and message in r.json()["error"], (r.status_code, r.text[:300])
    assert time.monotonic() - start < URL_TIMEOUT_S + 20
    assert_serves(url_server)


@pytest.mark.parametrize(
    "image_url, message",
    [
        ("file:///etc/passwd", "only http(s) URLs are allowed"),
        ("ftp://127.0.0.1/x.png", "only http(s) URLs are allowed"),
        ("http://localhost:{port}/ok.png", "local or private address"),  # only 127.0.0.1 is allowed by name
    ],
)
def test_enabled_url_images_reach_no_other_scheme_or_host(url_server, image_host, image_url, message):
    r = _segment_url(url_server, image_url.format(port=image_host))
    assert r.status_code == 400 and message in r.json()["error"], r.text[:300]
