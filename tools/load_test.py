"""Bounded load test of a running sam2flow server: N concurrent clients for T seconds.

    python tools/load_test.py --url http://127.0.0.1:9001 --clients 8 --seconds 20 [--api-key KEY]

Each client sends /sam2/segment_image requests (a fresh synthetic image, so the encoder runs, and
--boxes box prompts) back to back. Reports requests/s, images/s and p50/p90/p99 latency as JSON.
Requests stop at the time limit or at --max-requests, whichever comes first.
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
            body = {"image": {"type": "base64", "value": synthetic_png(1000 * k + n)}, "prompts": prompts,
                    "format": "rle"}
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
        "clients": clients, "seconds": round(elapsed, 2), "requests": len(latencies), "errors": len(errors),
        "requests_per_s": round(len(latencies) / elapsed, 3),
        "masks_per_s": round(len(latencies) * boxes / elapsed, 3),
        "latency_s": {"p50": round(percentile(latencies, 0.5), 3), "p90": round(percentile(latencies, 0.9), 3),
                      "p99": round(percentile(latencies, 0.99), 3),
                      "mean": round(statistics.fmean(latencies), 3) if latencies else None},
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
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback server (yours, on purpose)")
    args = p.parse_args()
    host = urlparse(args.url).hostname or ""
    if not args.allow_remote and host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
        print(f"load_test: refusing non-loopback host {host!r} without --allow-remote", file=sys.stderr)
        return 2
    print(json.dumps(run(args.url, args.clients, args.seconds, args.boxes, args.api_key, args.max_requests), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
