"""Bounded load test of a running sam2flow server: N concurrent clients for T seconds.

    python tools/load_test.py --url http://127.0.0.1:9001 --clients 8 --seconds 20 [--api-key KEY]
    python tools/load_test.py --mixed --click-rate 4 --image-every 4 --seconds 60

Closed loop (default): each client sends /sam2/segment_image requests (a fresh synthetic image, so
the encoder runs, and --boxes box prompts) back to back. Reports requests/s, images/s and
p50/p90/p99 latency as JSON. Requests stop at the time limit or at --max-requests, whichever first.

Open loop, mixed (``--mixed``): annotators' clicks at --click-rate per second in all on --images
images embedded beforehand (``POST /page/decode`` with ``image_id``, or ``/sam2/segment_image`` with
``--click-route segment``), each click one more point on the current object (1 to 5 points, then a
new object), while a new image (fresh pixels, so the encoder runs) arrives every --image-every
seconds (``POST /sam2/embed_image``). Requests are sent on schedule whatever the server's answers
(open loop), and each latency is counted from its scheduled time, so queueing shows. Reports
p50/p90/p99 of clicks and of embeds and the errors, as JSON.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import threading
import time
from urllib.parse import urlparse

import numpy as np
import requests
from PIL import Image


def synthetic_png(seed: int, h: int = 480, w: int = 640) -> str:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 40, w // 40, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def run(url: str, clients: int, seconds: float, boxes: int, api_key: str | None, max_requests: int) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    prompts = [{"box": {"x": 80 + 40 * i % 480, "y": 120, "width": 120, "height": 160}} for i in range(boxes)]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    counter = iter(range(max_requests))

    def client(k: int) -> None:
        session = requests.Session()
        while time.monotonic() < deadline:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            body = {
                "image": {"type": "base64", "value": synthetic_png(1000 * k + n)},
                "prompts": prompts,
                "format": "rle",
            }
            start = time.perf_counter()
            try:
                r = session.post(f"{url}/sam2/segment_image", json=body, headers=headers, timeout=120)
                ok = r.status_code == 200
                message = "" if ok else f"{r.status_code}: {r.text[:120]}"
            except requests.RequestException as e:
                ok, message = False, str(e)[:120]
            with lock:
                (latencies.append(time.perf_counter() - start) if ok else errors.append(message))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": len(latencies),
        "errors": len(errors),
        "requests_per_s": round(len(latencies) / elapsed, 3),
        "masks_per_s": round(len(latencies) * boxes / elapsed, 3),
        "latency_s": {
            "p50": round(percentile(latencies, 0.5), 3),
            "p90": round(percentile(latencies, 0.9), 3),
            "p99": round(percentile(latencies, 0.99), 3),
            "mean": round(statistics.fmean(latencies), 3) if latencies else None,
        },
        "first_errors": errors[:3],
    }


def _point(rng: np.random.Generator, h: int = 480, w: int = 640) -> list[float]:
    return [float(rng.uniform(20, w - 20)), float(rng.uniform(20, h - 20))]


def _summary(latencies: list[float]) -> dict:
    return {
        "count": len(latencies),
        **{f"p{q}_ms": round(1000 * percentile(latencies, q / 100), 1) for q in (50, 90, 99)},
        "max_ms": round(1000 * max(latencies), 1) if latencies else None,
    }


def run_mixed(
    url: str,
    click_rate: float,
    image_every: float,
    seconds: float,
    images: int,
    route: str,
    api_key: str | None,
    version: str = "hiera_tiny",
) -> dict:
    """Open-loop clicks and embeds for ``seconds``; latencies from each request's scheduled time."""
    from concurrent.futures import ThreadPoolExecutor

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    session = requests.Session()
    ids = []
    for i in range(images):  # the annotators' images, embedded before the clock starts
        body = {"image": {"type": "base64", "value": synthetic_png(10_000 + i)}, "sam2_version_id": version}
        r = session.post(f"{url}/sam2/embed_image", json=body, headers=headers, timeout=300)
        r.raise_for_status()
        ids.append(r.json()["image_id"])
    rng = np.random.default_rng(0)
    clicks: list[float] = []
    embeds: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    local = threading.local()

    def post(path: str, body: dict, scheduled: float, into: list[float]) -> None:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        try:
            r = local.session.post(f"{url}{path}", json=body, headers=headers, timeout=120)
            message = "" if r.status_code == 200 else f"{path} {r.status_code}: {r.text[:120]}"
        except requests.RequestException as e:
            message = f"{path}: {str(e)[:120]}"
        with lock:
            (errors.append(message) if message else into.append(time.monotonic() - scheduled))

    def click_body(n: int) -> tuple[str, dict]:
        obj, k = divmod(n, 5)  # 5 clicks per object, on one of the images
        image_id = ids[obj % len(ids)]
        obj_rng = np.random.default_rng(obj)
        points = [[*_point(obj_rng), 1 if i == 0 else int(obj_rng.integers(0, 2))] for i in range(k + 1)]
        if route == "page":
            return "/page/decode", {"image_id": image_id, "points": points, "sam2_version_id": version}
        prompt = {"points": [{"x": x, "y": y, "positive": bool(lab)} for x, y, lab in points]}
        return "/sam2/segment_image", {
            "image_id": image_id,
            "prompts": [prompt],
            "format": "rle",
            "sam2_version_id": version,
            "load_logits_from_cache": k > 0,
            "save_logits_to_cache": True,
        }

    events = [(i / click_rate, "click", i) for i in range(int(seconds * click_rate))]
    events += [(image_every * (j + 0.5), "image", j) for j in range(int(seconds / image_every))]
    events.sort()
    # New images are made before the clock starts: making one (~90 ms of CPU) would otherwise take
    # a core from the server on a small machine, which a browser on another machine does not.
    pngs = {n: synthetic_png(int(rng.integers(1 << 30))) for at, kind, n in events if kind == "image"}
    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=64) as pool:
        for at, kind, n in events:
            scheduled = began + at
            time.sleep(max(0.0, scheduled - time.monotonic()))
            if kind == "click":
                path, body = click_body(n)
                pool.submit(post, path, body, scheduled, clicks)
            else:
                body = {
                    "image": {"type": "base64", "value": pngs[n]},
                    "sam2_version_id": version,
                }
                pool.submit(post, "/sam2/embed_image", body, scheduled, embeds)
    return {
        "mode": "mixed",
        "route": route,
        "click_rate": click_rate,
        "image_every_s": image_every,
        "seconds": round(time.monotonic() - began, 2),
        "clicks": _summary(clicks),
        "embeds": _summary(embeds),
        "errors": len(errors),
        "first_errors": errors[:3],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:9001")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--boxes", type=int, default=10)
    p.add_argument("--max-requests", type=int, default=10_000)
    p.add_argument("--api-key")
    p.add_argument("--mixed", action="store_true", help="open loop: clicks on cached images + new images")
    p.add_argument("--click-rate", type=float, default=4.0, help="--mixed: clicks per second, in all")
    p.add_argument("--image-every", type=float, default=4.0, help="--mixed: seconds between new images")
    p.add_argument("--images", type=int, default=4, help="--mixed: images embedded beforehand for the clicks")
    p.add_argument(
        "--click-route",
        choices=["page", "segment"],
        default="page",
        help="--mixed: /page/decode or /sam2/segment_image with image_id",
    )
    p.add_argument("--version", default="hiera_tiny")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback server (yours, on purpose)")
    args = p.parse_args()
    host = urlparse(args.url).hostname or ""
    if not args.allow_remote and host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
        print(f"load_test: refusing non-loopback host {host!r} without --allow-remote", file=sys.stderr)
        return 2
    if args.mixed:
        if args.click_rate <= 0 or args.image_every <= 0 or args.images < 1 or args.seconds > 3600:
            print(
                "load_test: --click-rate and --image-every must be > 0, --images >= 1, --seconds <= 3600",
                file=sys.stderr,
            )
            return 2
        print(
            json.dumps(
                run_mixed(
                    args.url,
                    args.click_rate,
                    args.image_every,
                    args.seconds,
                    args.images,
                    args.click_route,
                    args.api_key,
                    args.version,
                ),
                indent=2,
            )
        )
        return 0
    print(json.dumps(run(args.url, args.clients, args.seconds, args.boxes, args.api_key, args.max_requests), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
