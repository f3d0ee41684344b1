"""Throughput of the Ray Serve deployment on this machine, for 1, 2, ... local replicas.

    python tools/ray_throughput.py --checkpoint sam2.1_hiera_tiny.pt --replicas 1 2 --clients 4 --seconds 60

For each replica count: a fresh local Ray cluster (``--cpus`` CPUs, no GPU), ``sam2flow.scale.
ray_serve.build_app`` with that many CPU replicas of ``--cpus-per-replica`` CPUs each, one warm-up
request per replica, then ``tools/load_test.py``'s bounded load (fresh 640x480 images, so every
request runs the encoder) against the Serve endpoint on a loopback port. ``--plain`` adds the plain
server (uvicorn, all cores) under the same load, for comparison. Prints one JSON object per run,
with the load average of the machine before it started. Ray workers run at nice 0 here (Ray's
default is 15), as the plain server does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_test  # noqa: E402  (tools/ is not a package)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_ray(args, replicas: int) -> dict:
    import ray
    from ray import serve

    from sam2flow.scale.ray_serve import APP_NAME, build_app, wait_ready
    from sam2flow.server.settings import ServerSettings

    ray.init(num_cpus=args.cpus, object_store_memory=500 << 20, include_dashboard=False, logging_level=logging.WARNING)
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = ServerSettings(
            preload=[args.version],
            checkpoint=args.checkpoint,
            device="cpu",
            dtype=args.dtype,
            max_batch_size=args.max_batch_size,
        )
        serve.run(
            build_app(settings, replicas=replicas, num_gpus_per_replica=0, num_cpus_per_replica=args.cpus_per_replica),
            name=APP_NAME,
            route_prefix="/",
            logging_config={"enable_access_log": False},
        )
        wait_ready(url)
        load_test.run(url, replicas, 0.1, args.boxes, None, replicas)  # one warm-up request per replica
        load = round(os.getloadavg()[0], 2)
        result = load_test.run(url, args.clients, args.seconds, args.boxes, None, args.max_requests)
        return {
            "server": "ray-serve",
            "replicas": replicas,
            "cpus_per_replica": args.cpus_per_replica,
            "load_before": load,
            **result,
        }
    finally:
        serve.shutdown()
        ray.shutdown()


def measure_plain(args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sam2flow",
            "serve",
            "--port",
            str(port),
            "--preload",
            args.version,
            "--checkpoint",
            args.checkpoint,
            "--device",
            "cpu",
            "--dtype",
            args.dtype,
            "--max-batch-size",
            str(args.max_batch_size),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        from sam2flow.scale.ray_serve import wait_ready

        wait_ready(url)
        load_test.run(url, 1, 0.1, args.boxes, None, 1)
        load = round(os.getloadavg()[0], 2)
        result = load_test.run(url, args.clients, args.seconds, args.boxes, None, args.max_requests)
        return {"server": "plain", "threads": os.cpu_count(), "load_before": load, **result}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="weights for --version (a .pt, HF directory or Hub id)")
    p.add_argument("--version", default="hiera_tiny")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray cluster")
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--boxes", type=int, default=10)
    p.add_argument("--max-requests", type=int, default=10_000)
    p.add_argument("--plain", action="store_true", help="also measure the plain server")
    args = p.parse_args()
    args.checkpoint = str(Path(args.checkpoint).resolve()) if Path(args.checkpoint).exists() else args.checkpoint
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray runs its workers at nice 15, below anything else on a shared machine (here a training job
    # at nice 5-10): the replicas get the plain server's priority, so the runs compare like for like.
    os.environ.setdefault("RAY_worker_niceness", "0")
    if args.plain:
        print(json.dumps(measure_plain(args)), flush=True)
    for n in args.replicas:
        print(json.dumps(measure_ray(args, n)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
