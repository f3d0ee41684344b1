"""``--ray``: Ray Data batch mode and Ray Serve, on a local Ray cluster these tests start (2 CPUs).

The records of ``sam2flow batch --ray`` must be those of plain batch mode, and the Serve deployment
must answer the real ``inference-sdk`` client exactly as the plain server does. Without Ray
installed only the first test runs: the flags then fail in one line.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml
from PIL import Image

from sam2flow import Prompt
from sam2flow.cli import main
from sam2flow.formats import rle_to_mask
from sam2flow.scale.batch import run_batch

from conftest import BOXES_WORKFLOW, SERVER_API_KEY, free_port, random_image, write_mixed_images

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed (sam2flow[ray])")
ROOT = Path(__file__).resolve().parents[1]
BOX = {"x": 60, "y": 50, "width": 80, "height": 60, "class": "thing", "class_id": 1, "detection_id": "t1"}


def test_without_ray_the_flags_fail_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed: `import ray` fails
    Image.fromarray(random_image(40, 40)).save(tmp_path / "a.png")
    for argv in (["batch", str(tmp_path), "--out", str(tmp_path / "out.jsonl"), "--ray"], ["serve", "--ray"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("sam2flow: error: ")
        assert err.rstrip().endswith("pip install 'sam2flow[ray]'")
    assert not (tmp_path / "out.jsonl").exists()


@needs_ray
def test_actor_plan_follows_the_cluster():
    from sam2flow.scale.ray_batch import actor_plan

    assert actor_plan({"CPU": 16, "GPU": 4}) == (4, 1.0, 1.0)
    assert actor_plan({"CPU": 16, "GPU": 4}, gpus_per_actor=0.5) == (8, 0.5, 1.0)
    assert actor_plan({"CPU": 2}) == (1, 0.0, 1.0)  # one CPU stays with the read tasks
    assert actor_plan({"CPU": 9}, cpus_per_actor=2) == (4, 0.0, 2)
    for bad in ({"actors": 0}, {"actors": 2}, {"cpus_per_actor": 2}):  # the last two would stall the pipeline
        with pytest.raises(ValueError):
            actor_plan({"CPU": 2}, **bad)
    with pytest.raises(ValueError):
        actor_plan({"CPU": 8, "GPU": 1}, actors=2)


def test_serve_batcher_isolates_a_failing_image():
    # The function Serve's batches run, as the plain server's batcher does (serve.batch itself
    # works only inside a replica: see the Serve test below for the whole path).
    from sam2flow.server.batching import embed_each

    class Engine:
        calls = []

        def embed(self, images):
            self.calls.append(len(images))
            if any(im is None for im in images):
                raise ValueError("bad image")
            return [f"emb{im}" for im in images]

    engine = Engine()
    a, bad, c = embed_each(engine, [1, None, 3])
    assert (a, c) == ("emb1", "emb3") and isinstance(bad, ValueError)
    assert engine.calls == [3, 1, 1, 1]  # one batch of three, then each alone
    assert embed_each(engine, [4, 5]) == ["emb4", "emb5"] and engine.calls[-1] == 2


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, object_store_memory=500 << 20, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    if ray.is_initialized():
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-batch")
    d = root / "images"
    write_mixed_images(d)
    boxes = root / "boxes"
    boxes.mkdir()
    for stem in ("a_rgb", "b_gray", "c_rgba"):
        (boxes / f"{stem}.json").write_text(json.dumps({"predictions": [BOX]}))
    return d, boxes


def read(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def comparable(records: list[dict]) -> dict[str, dict]:
    """Records by file, without what differs between any two runs: new detection ids, and the last
    bits of confidences (a Ray actor runs torch on its own thread count, and float32 sums round
    differently across threads), which ``same_confidences`` compares within 1e-5."""
    out = {}
    for r in records:
        r = json.loads(json.dumps(r))
        for p in r.get("predictions", []):
            p.pop("detection_id")
            p.pop("confidence")
        out[r["file"]] = r
    return out


def same_confidences(got: list[dict], want: list[dict]) -> None:
    def by_file(records):
        return {r["file"]: [p["confidence"] for p in r.get("predictions", [])] for r in records}

    g, w = by_file(got), by_file(want)
    assert g.keys() == w.keys()
    for name in g:
        np.testing.assert_allclose(g[name], w[name], rtol=1e-5, err_msg=name)


@needs_ray
def test_ray_batch_gives_the_records_of_plain_batch(cluster, folder, tiny_checkpoint, tiny_engine, tmp_path, capsys):
    images, boxes = folder
    plain = tmp_path / "plain.jsonl"
    run_batch(tiny_engine, str(images), plain, str(boxes), batch_size=2, progress=False)
    out = tmp_path / "ray.jsonl"
    argv = [
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
        "--ray",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "3 segmented, 1 failed, 0 already done" in err and "unreadable: d_corrupt.png" in err
    records = read(out)
    assert len(records) == 4 and comparable(records) == comparable(read(plain))
    same_confidences(records, read(plain))
    assert [p["class"] for p in comparable(records)["b_gray.png"]["predictions"]] == ["thing"]
    # Masks are real masks, not only equal strings: the first equals the engine's own.
    image = np.asarray(Image.open(images / "c_rgba.png").convert("RGB"))
    want = tiny_engine.predict(tiny_engine.embed([image])[0], boxes=[[20, 20, 100, 80]]).masks[0]
    got = next(r for r in records if r["file"] == "c_rgba.png")["predictions"][0]["rle"]
    assert np.array_equal(rle_to_mask(got), want)
    # Resumable as plain mode: everything is done, nothing is appended.
    assert main(argv) == 0
    assert "0 segmented, 0 failed, 4 already done" in capsys.readouterr().err and len(read(out)) == 4


@needs_ray
def test_ray_embed_stores_what_the_engine_computes_and_resumes(
    cluster, folder, tiny_checkpoint, tiny_engine, tmp_path, capsys
):
    from sam2flow.engine.cache import content_hash
    from sam2flow.engine.store import EmbeddingStore
    from sam2flow.scale.batch import read_image_file

    images, _ = folder
    store_dir = tmp_path / "store"
    argv = ["embed", str(images), "--store", str(store_dir), "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]
    argv += ["--dtype", "float32", "--batch-size", "2", "--ray"]
    assert main(argv) == 1  # d_corrupt.png failed; the others are stored
    err = capsys.readouterr().err
    assert "3 embedded, 0 already stored, 1 failed" in err and "skipped" in err and "d_corrupt.png" in err
    store = EmbeddingStore(store_dir)
    pixels = {f: read_image_file(images / f) for f in ("a_rgb.png", "b_gray.png", "c_rgba.png")}
    assert all((tiny_engine.store_id, content_hash(im)) in store for im in pixels.values())
    want = tiny_engine.embed([pixels["c_rgba.png"]])[0]
    got = store.get(tiny_engine.store_id, want.image_id)
    for a, b in zip((got.image_embed, *got.high_res_feats), (want.image_embed, *want.high_res_feats)):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3)  # the engine's own, within float16 rounding
    assert main(argv) == 1 and "0 embedded, 3 already stored, 1 failed" in capsys.readouterr().err


@needs_ray
def test_ray_batch_writes_parquet_and_resumes_it(cluster, folder, tiny_checkpoint, tiny_engine, tmp_path, capsys):
    import pyarrow.parquet as pq

    from sam2flow.scale.ray_batch import read_parquet_records

    images, _ = folder
    boxes = tmp_path / "boxes.jsonl"  # the other form of --boxes: one JSONL keyed by file
    boxes.write_text(json.dumps({"file": "a_rgb.png", "predictions": [BOX]}) + "\n")
    pattern = str(images / "[ad]_*")
    plain = tmp_path / "plain.jsonl"
    run_batch(tiny_engine, pattern, plain, str(boxes), "polygon", batch_size=2, progress=False)
    out = tmp_path / "masks.parquet"
    argv = [
        "batch",
        pattern,
        "--boxes",
        str(boxes),
        "--out",
        str(out),
        "--format",
        "polygon",
        "--checkpoint",
        str(tiny_checkpoint),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--batch-size",
        "2",
        "--ray",
    ]
    assert main(argv) == 0
    assert "1 segmented, 1 failed" in capsys.readouterr().err
    table = pq.read_table(out)  # the directory reads as one table
    assert table.num_rows == 2 and table.column_names == ["file", "width", "height", "predictions", "error"]
    assert comparable(read_parquet_records(out)) == comparable(read(plain))
    same_confidences(read_parquet_records(out), read(plain))
    assert main(argv) == 0 and "2 already done" in capsys.readouterr().err
    assert pq.read_table(out).num_rows == 2


def box_prompt(b):
    return {"box": {"x": (b[0] + b[2]) / 2, "y": (b[1] + b[3]) / 2, "width": b[2] - b[0], "height": b[3] - b[1]}}


@needs_ray
def test_ray_serve_answers_the_sdk_as_the_plain_server_does(cluster, tiny_checkpoint, tiny_engine, tmp_path):
    from inference_sdk import InferenceConfiguration, InferenceHTTPClient
    from ray import serve

    from sam2flow.scale.ray_serve import APP_NAME, app_builder, wait_ready

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # The documented config's application, on this machine: CPU, one replica, the test checkpoint.
    config = yaml.safe_load((ROOT / "deploy" / "ray-serve.yaml").read_text())
    args = {
        **config["applications"][0]["args"],
        "num_gpus_per_replica": 0,
        "num_cpus_per_replica": 1,
        "min_replicas": 1,
        "max_replicas": 1,
        "preload": "hiera_tiny",
        "checkpoint": str(tiny_checkpoint),
        "device": "cpu",
        "dtype": "float32",
        "api_key": SERVER_API_KEY,
        "max_wait_ms": 60,
    }
    serve.run(app_builder(args), name=APP_NAME, route_prefix="/")
    wait_ready(url, timeout_s=180)

    image = random_image(240, 320, seed=41)
    path = tmp_path / "image.png"  # files go byte for byte (arrays the client re-encodes as JPEG)
    Image.fromarray(image).save(path)
    client = InferenceHTTPClient(api_url=url, api_key=SERVER_API_KEY).configure(
        InferenceConfiguration(api_key_transport="header")
    )
    boxes = [[40, 30, 160, 150], [170, 60, 300, 220]]
    prompts = [box_prompt(b) for b in boxes] + [{"points": [{"x": 100, "y": 90, "positive": True}]}]
    result = client.sam2_segment_image(str(path), prompts=prompts, mask_input_format="rle")
    want = tiny_engine.predict_prompts(
        tiny_engine.embed([image])[0], [Prompt(box=b) for b in boxes] + [Prompt(points=[[100, 90]], labels=[1])]
    )
    assert len(result["predictions"]) == 3
    for p, mask, score in zip(result["predictions"], want.masks, want.scores):
        assert p["format"] == "rle" and np.array_equal(rle_to_mask(p["masks"]), mask)
        assert p["confidence"] == pytest.approx(float(score), abs=1e-5)

    # The workflow route embeds from a worker thread through Serve's batcher (cached here: cheap).
    dets = {
        "image": {"width": 320, "height": 240},
        "predictions": [
            {"x": 100, "y": 90, "width": 120, "height": 120, "class": "cup", "class_id": 3, "detection_id": "u1"}
        ],
    }
    out = client.run_workflow(specification=BOXES_WORKFLOW, images={"image": str(path)}, parameters={"boxes": dets})
    assert [(p["class"], p["parent_id"]) for p in out[0]["masks"]["predictions"]] == [("cup", "u1")]

    # Errors are the plain server's, status and body.
    r = requests.post(f"{url}/sam2/segment_image", json={"image": {"type": "base64", "value": "x"}}, timeout=30)
    assert r.status_code == 401 and r.json() == {"error": "missing or wrong API key"}
    assert requests.get(f"{url}/readyz", timeout=30).json() == {"status": "ready", "models": ["hiera_tiny"]}
    metrics = requests.get(f"{url}/metrics", timeout=30).text
    assert re.search(r"^sam2flow_embed_batch_size_count [1-9]", metrics, re.M)  # Serve's batcher embedded


def processes() -> dict[int, tuple[int, str]]:
    """Every live (not zombie) process: pid → (parent pid, command line)."""
    rows = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,stat=,args="], capture_output=True, text=True).stdout
    procs = {}
    for row in rows.splitlines():
        pid, ppid, stat, *args = row.split(None, 3)
        if not stat.startswith("Z"):
            procs[int(pid)] = (int(ppid), " ".join(args))
    return procs


def ours(procs: dict[int, tuple[int, str]]) -> dict[int, str]:
    """Ray's processes of this test's cluster: under this process, or naming its session directory
    (which ends in the pid of the process that started it), wherever they were reparented."""
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {p for p, (ppid, _) in procs.items() if ppid in frontier} - mine
        mine |= frontier
    session = re.compile(rf"/session_[\d_-]+_{os.getpid()}\b")
    return {
        p: args
        for p, (_, args) in procs.items()
        if (p in mine and re.search(r"ray|gcs_server|raylet", args)) or session.search(args)
    }


@needs_ray
def test_shutdown_leaves_no_stray_processes(cluster):
    from ray import serve

    before = ours(processes())
    assert any("raylet" in a for a in before.values()) and any("gcs_server" in a for a in before.values()), before
    serve.shutdown()
    cluster.shutdown()
    deadline = time.monotonic() + 30
    while True:
        now = processes()
        left = {p: a for p, a in ours(now).items()} | {p: before[p] for p in before if p in now}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left
