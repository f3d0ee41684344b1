"""``sam2flow.images``: the one image-decoding module, its forms and its limits (no model needed)."""

from __future__ import annotations

import base64
import io
import resource
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from sam2flow import images
from sam2flow.images import ImageLimits, ImageTooLarge, decode_image_bytes, fetch_url, load_image, load_wire_image

from conftest import random_image

IMAGE = random_image(40, 60, seed=3)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def b64(image: np.ndarray) -> str:
    return base64.b64encode(png(image)).decode()


def bomb_png(side: int = 12000) -> bytes:
    """A black ``side`` x ``side`` PNG: ~140 KB on disk, ``side``² × 3 bytes once decoded to RGB."""
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    path.write_bytes(png(IMAGE))
    return path


def test_every_local_form_gives_the_same_pixels(image_file):
    forms = [
        IMAGE,
        image_file,
        str(image_file),
        b64(IMAGE),
        f"data:image/png;base64,{b64(IMAGE)}",
        {"type": "base64", "value": b64(IMAGE)},
        {"type": "numpy", "value": IMAGE.tolist()},
        {"type": "file", "value": str(image_file)},
    ]
    for form in forms:
        out = load_image(form)
        assert out.dtype == np.uint8 and out.shape == (40, 60, 3)
        np.testing.assert_array_equal(out, IMAGE)


def test_wire_forms_decode(image_file):
    limits = ImageLimits(max_pixels=10_000)
    for form in ({"type": "base64", "value": b64(IMAGE)}, {"type": "numpy", "value": IMAGE.tolist()}):
        np.testing.assert_array_equal(load_wire_image(form, "image", limits), IMAGE)


def test_wire_refuses_local_forms_with_one_message_and_reads_nothing(image_file, tmp_path, monkeypatch):
    """Paths and file references never travel over HTTP, and the answer does not say if a path exists."""
    opened = []
    real_read = images.read_image_file
    monkeypatch.setattr(images, "read_image_file", lambda *a, **k: opened.append(a) or real_read(*a, **k))
    missing = tmp_path / "nope.png"
    forms = [
        str(image_file),
        str(missing),
        image_file,
        b64(IMAGE),
        {"type": "file", "value": str(image_file)},
        {"type": "file", "value": str(missing)},
        {"type": "s3", "value": "x"},
        {"value": b64(IMAGE)},
        {"type": "base64"},
        [{"type": "base64", "value": b64(IMAGE)}],
        None,
        3,
        IMAGE,
    ]
    messages = set()
    for form in forms:
        with pytest.raises(ValueError) as e:
            load_wire_image(form, "image", ImageLimits())
        messages.add(str(e.value))
    assert messages == {'image: an image must be {"type": "base64" | "numpy" | "url", "value": ...}'}
    assert not opened


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    data = bomb_png()
    assert len(data) < 300_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageTooLarge, match="12000x12000 pixels is over the limit of 1000000"):
        images.decode_image_bytes(data, "image", ImageLimits(max_pixels=1_000_000))
    with pytest.raises(ImageTooLarge, match="over the limit"):
        load_wire_image(
            {"type": "base64", "value": base64.b64encode(data).decode()}, "image", ImageLimits(max_pixels=1_000_000)
        )
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 100 << 10, f"peak memory grew by {grown_kib} KiB: pixels were decoded"


def test_limits_on_arrays_and_sides():
    with pytest.raises(ImageTooLarge, match="60x40 pixels is over the limit of 100"):
        load_wire_image({"type": "numpy", "value": IMAGE.tolist()}, "image", ImageLimits(max_pixels=100))
    with pytest.raises(ValueError, match="smaller than 50 pixels a side"):
        load_image(IMAGE, "image", ImageLimits(min_side=50))
    with pytest.raises(ValueError, match="not a rectangular array"):
        load_wire_image({"type": "numpy", "value": [[1, 2], [3]]}, "image", ImageLimits())


@pytest.mark.parametrize(
    "value, message",
    [
        ("@@@", "not valid base64"),
        (base64.b64encode(b"hello world").decode(), "not a readable image"),
        (base64.b64encode(png(IMAGE)[:60]).decode(), "not a readable image"),
    ],
)
def test_undecodable_images(value, message):
    with pytest.raises(ValueError, match=message):
        load_wire_image({"type": "base64", "value": value}, "image", ImageLimits())


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        images.read_image_file(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png: not a readable image"):
        images.read_image_file(tmp_path / "bad.png")


def test_urls_are_off_unless_enabled_and_only_http():
    with pytest.raises(ValueError, match="URL images are disabled"):
        load_wire_image({"type": "url", "value": "http://example.com/a.png"}, "image", ImageLimits())
    on = ImageLimits(allow_urls=True)
    for url in ("file:///etc/passwd", "ftp://example.com/a.png", "gopher://x/", "http:///nohost"):
        with pytest.raises(ValueError, match="only http"):
            load_wire_image({"type": "url", "value": url}, "image", on)


SEEN: list[tuple[int, str, str | None]] = []  # (port, path, Authorization header) of each request


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        SEEN.append((self.server.server_address[1], self.path, self.headers.get("Authorization")))
        if self.path.startswith("/redirect-to/"):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/redirect-to/"))
            self.end_headers()
        elif self.path == "/ok.png":
            body = png(IMAGE)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/to-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


def _serve():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


@pytest.fixture(scope="module")
def loopback():
    httpd, url = _serve()
    yield url
    httpd.shutdown()


def test_headers_go_to_the_first_urls_origin_only(loopback):
    """Credentials (Label Studio's token) reach the host they are for, never a host it redirects to."""
    other, elsewhere = _serve()
    try:
        allowed = ImageLimits(allow_urls=True, url_hosts=("127.0.0.1",))
        SEEN.clear()
        fetch_url(f"{loopback}/ok.png", "image", allowed, {"Authorization": "Token t"})
        fetch_url(f"{loopback}/redirect-to/{loopback}/ok.png", "image", allowed, {"Authorization": "Token t"})
        data = fetch_url(f"{loopback}/redirect-to/{elsewhere}/ok.png", "image", allowed, {"Authorization": "Token t"})
        np.testing.assert_array_equal(decode_image_bytes(data, "image"), IMAGE)
        port = int(elsewhere.rsplit(":", 1)[1])
        assert [(p == port, auth) for p, _, auth in SEEN] == [(False, "Token t")] * 4 + [(True, None)]
    finally:
        other.shutdown()


def test_local_addresses_need_the_operators_allowance(loopback):
    ref = {"type": "url", "value": f"{loopback}/ok.png"}
    with pytest.raises(ValueError, match="local or private address"):
        load_wire_image(ref, "image", ImageLimits(allow_urls=True))
    allowed = ImageLimits(allow_urls=True, url_hosts=("127.0.0.1",))
    np.testing.assert_array_equal(load_wire_image(ref, "image", allowed), IMAGE)
    with pytest.raises(ValueError, match="only http"):
        load_wire_image({"type": "url", "value": f"{loopback}/to-file"}, "image", allowed)
    with pytest.raises(ValueError, match="HTTP 404"):
        load_wire_image({"type": "url", "value": f"{loopback}/missing"}, "image", allowed)
    np.testing.assert_array_equal(load_image(ref), IMAGE)  # the Python API: the user's own network
