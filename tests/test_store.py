"""The embedding store: what is stored decodes to the fresh masks, stored images never run the
encoder (engine, ``sam2flow embed`` re-runs, the server's first click), and a damaged or foreign
file is an error naming it: in Python, from the CLI, and as the server's JSON.

The trained fixture model (``sam2flow.testing``) and its scenes throughout; the encoder is counted
by a forward hook on ``model.vision_encoder`` (images per call), and run as few times as the
checks allow (about 5 s an image on a small CPU).
"""

from __future__ import annotations

import base64
import copy
import io
import shutil
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from sam2flow import Prompt
from sam2flow.cli import main
from sam2flow.engine.cache import EmbeddingCache
from sam2flow.engine.engine import Sam2Engine
from sam2flow.engine.store import BYTES_PER_IMAGE, EmbeddingStore, StoreError
from sam2flow.engine.types import EmbeddingStorage
from sam2flow.formats import mask_iou, rle_to_mask
from sam2flow.scale.embed import run_embed
from sam2flow.testing import make_scene, write_checkpoint

from conftest import start_server, stop_server

SCENES = [make_scene(seed, size=(360, 480)) for seed in (1_000_301, 1_000_302)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("fixture") / "sam2.1_hiera_tiny.pt")


@pytest.fixture(scope="module")
def engine(checkpoint):
    """The fixture model in float32, without a store: the fresh reference."""
    return Sam2Engine.from_pretrained("hiera_tiny", checkpoint=str(checkpoint), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def fresh(engine):
    """Fresh float32 embeddings of the scenes (two encoder images, the only ones most tests need)."""
    return engine.embed([s.image for s in SCENES], use_cache=False)


def with_store(engine: Sam2Engine, store: EmbeddingStore | None) -> Sam2Engine:
    """Another engine on the same model object (same weights, device, dtype), an empty cache and ``store``."""
    return Sam2Engine(engine.model, engine.spec, "cpu", "float32", cache=EmbeddingCache(), store=store)


@contextmanager
def encoder_images(model):
    """Counts the images the image encoder runs on while the block runs: ``with ... as seen: seen[0]``."""
    seen = [0]
    hook = model.vision_encoder.register_forward_hook(
        lambda mod, args, out: seen.__setitem__(0, seen[0] + len(args[0]))
    )
    try:
        yield seen
    finally:
        hook.remove()


def stored_copy(tmp_path: Path, engine: Sam2Engine, embeddings) -> EmbeddingStore:
    """A read-only store holding ``embeddings`` for ``engine``, written with the store's own ``put``."""
    writer = EmbeddingStore(tmp_path / "store", writable=True)
    for emb in embeddings:
        writer.put(engine.store_id, emb)
    return EmbeddingStore(tmp_path / "store")


def scene_prompts(scene) -> list[Prompt]:
    """Each shape's box, and one click at a pixel of each shape."""
    prompts = [Prompt(box=b.tolist()) for b in scene.boxes]
    for m in scene.masks:
        ys, xs = np.nonzero(m)
        k = len(xs) // 2
        prompts.append(Prompt(points=[[float(xs[k]), float(ys[k])]], labels=[1]))
    return prompts


def test_stored_embeddings_decode_to_the_fresh_masks(engine, fresh, tmp_path):
    store = stored_copy(tmp_path, engine, fresh)
    files = sorted(store.root.rglob("*.safetensors"))
    assert len(files) == 2 and store.usage(engine.store_id) == (2, sum(f.stat().st_size for f in files))
    per_image = files[0].stat().st_size
    assert BYTES_PER_IMAGE <= per_image < BYTES_PER_IMAGE + 2048  # float16 tensors and a small header
    reader = with_store(engine, store)
    with encoder_images(engine.model) as seen:
        stored = reader.embed([s.image for s in SCENES])
    assert seen[0] == 0
    ious, score_diff = [], []
    for scene, s, f in zip(SCENES, stored, fresh):
        assert s.key == f.key and s.original_size == f.original_size == scene.size
        assert (s.image_embed - f.image_embed).abs().max() <= 2e-3 * f.image_embed.abs().max()
        prompts = scene_prompts(scene)
        a, b = reader.predict_prompts(s, prompts), engine.predict_prompts(f, prompts)
        ious += list(mask_iou(a.masks, b.masks))
        score_diff.append(np.abs(a.scores - b.scores).max())
    print(
        f"stored (float16) vs fresh float32: mask IoU mean {np.mean(ious):.5f}, min {np.min(ious):.5f} over "
        f"{len(ious)} prompts, max score difference {max(score_diff):.2e}; {per_image / 1e6:.2f} MB per image"
    )
    assert min(ious) >= 0.99


def test_put_returns_what_get_reads(engine, fresh, tmp_path):
    """A writable store's engine decodes the stored (rounded) values even on the run that computed them."""
    store = EmbeddingStore(tmp_path / "s", writable=True)
    assert isinstance(store, EmbeddingStorage)  # what Sam2Engine(store=...) declares it takes
    kept = store.put(engine.store_id, fresh[0])
    read = store.get(engine.store_id, fresh[0].image_id)
    for a, b in zip((kept.image_embed, *kept.high_res_feats), (read.image_embed, *read.high_res_feats)):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    assert read.original_size == fresh[0].original_size
    with pytest.raises(StoreError, match="read-only"):
        EmbeddingStore(tmp_path / "s").put(engine.store_id, fresh[0])
    with pytest.raises(StoreError, match="not a directory"):
        EmbeddingStore(tmp_path / "missing")


def damage(path: Path, how: str, engine, fresh) -> None:
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif how == "other weights":  # a whole, valid file, but of another model, put where this model looks
        other = EmbeddingStore(path.parents[3] / "other", writable=True)
        other.put("sam2.1/hiera_tiny|torch.float32|" + "0" * 32, fresh[0])
        shutil.copyfile(next(other.root.rglob("*.safetensors")), path)
    elif how == "other image":
        shutil.copyfile(next(p for p in path.parent.parent.rglob("*.safetensors") if p != path), path)
    elif how == "nan":
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(path)
        tensors["high_res_0"][0, 0, 0] = float("nan")
        save_file(tensors, path, metadata=meta)


@pytest.mark.parametrize(
    "how, problem",
    [
        ("truncated", "not a readable safetensors file"),
        ("garbage", "not a readable safetensors file"),
        ("other weights", "made by another model"),
        ("other image", "holds image"),
        ("nan", "not finite"),
    ],
)
def test_a_damaged_or_foreign_file_is_an_error_naming_it(engine, fresh, tmp_path, how, problem):
    store = stored_copy(tmp_path, engine, fresh)
    path = store.path(engine.store_id, fresh[0].image_id)
    damage(path, how, engine, fresh)
    reader = with_store(engine, store)
    with encoder_images(engine.model) as seen, pytest.raises(StoreError) as err:
        reader.embed([SCENES[0].image])
    assert str(path) in str(err.value) and problem in str(err.value)
    assert seen[0] == 0  # never silently re-embedded
    assert reader.embed([SCENES[1].image])[0].original_size == SCENES[1].size  # the good file still serves


def test_other_weights_find_nothing_and_run_the_encoder(engine, fresh, tmp_path):
    store = stored_copy(tmp_path, engine, fresh)
    tuned = copy.deepcopy(engine.model)
    with torch.no_grad():
        tuned.vision_encoder.backbone.blocks[-1].mlp.proj_out.bias[0] += 0.5  # one weight of a fine-tune
    other = Sam2Engine(tuned, engine.spec, "cpu", "float32", store=store)
    assert other.store_id != engine.store_id
    with encoder_images(tuned) as seen:
        emb = other.embed([SCENES[0].image])[0]
    assert seen[0] == 1
    assert not torch.equal(emb.image_embed, store.get(engine.store_id, emb.image_id).image_embed)
    assert store.usage() == (2, store.usage(engine.store_id)[1])  # read-only: nothing written


def write_images(d: Path) -> None:
    d.mkdir()
    Image.fromarray(SCENES[0].image).save(d / "a.png")
    Image.fromarray(SCENES[1].image).save(d / "b.png")
    (d / "c_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")


def test_cli_embed_skips_a_bad_image_and_resumes_without_the_encoder(engine, fresh, checkpoint, tmp_path, capsys):
    write_images(tmp_path / "imgs")
    store_dir = tmp_path / "store"
    argv = ["embed", str(tmp_path / "imgs"), "--store", str(store_dir), "--checkpoint", str(checkpoint)]
    assert main([*argv, "--device", "cpu", "--dtype", "float32"]) == 1  # a failure, but the good ones stored
    err = capsys.readouterr().err
    assert "sam2flow embed: skipped" in err and "c_corrupt.png" in err
    assert "2 embedded, 0 already stored, 1 failed" in err and "8.4 MB per image" in err
    store = EmbeddingStore(store_dir, writable=True)
    assert store.usage(engine.store_id)[0] == 2  # the CLI's engine is this one: same weights, same id
    # A re-run (the job's own resume path: the stored images are not embedded again).
    rerun = with_store(engine, None)
    with encoder_images(engine.model) as seen:
        summary = run_embed(rerun, store, [str(tmp_path / "imgs" / "*.png")], progress=False)
    assert seen[0] == 0
    assert (summary.embedded, summary.already, [f for f, _ in summary.failed]) == (
        0,
        2,
        [str(tmp_path / "imgs" / "c_corrupt.png")],
    )
    # A damaged file (a disk error, a copy cut short) counts as absent: the next run writes it again.
    damaged = store.path(engine.store_id, fresh[1].image_id)
    damaged.write_bytes(damaged.read_bytes()[:-10])
    with encoder_images(engine.model) as seen:
        summary = run_embed(rerun, store, [str(tmp_path / "imgs")], progress=False)
    assert (seen[0], summary.embedded, summary.already) == (1, 1, 1)
    assert store.get(engine.store_id, fresh[1].image_id).original_size == SCENES[1].size


def test_cli_batch_reads_the_store_and_store_write_needs_store(
    engine, fresh, checkpoint, tmp_path, capsys, monkeypatch
):
    store = stored_copy(tmp_path, engine, fresh)
    write_images(tmp_path / "imgs")
    seen = [0]
    load = Sam2Engine.from_pretrained.__func__

    def counted(cls, *args, **kwargs):  # the CLI's engine, with the encoder counted as elsewhere here
        made = load(cls, *args, **kwargs)
        made.model.vision_encoder.register_forward_hook(lambda m, a, o: seen.__setitem__(0, seen[0] + len(a[0])))
        return made

    monkeypatch.setattr(Sam2Engine, "from_pretrained", classmethod(counted))
    out = tmp_path / "masks.jsonl"
    argv = ["batch", str(tmp_path / "imgs"), "--out", str(out), "--checkpoint", str(checkpoint), "--device", "cpu"]
    argv += ["--dtype", "float32", "--points-per-side", "2"]
    assert main([*argv, "--store", str(store.root)]) == 0
    assert "2 segmented, 1 failed" in capsys.readouterr().err and seen[0] == 0  # both images were stored
    assert main([*argv, "--store-write"]) == 1
    assert capsys.readouterr().err == "sam2flow: error: --store-write needs --store DIR\n"


def _png(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _click(scene) -> dict:
    ys, xs = np.nonzero(scene.masks[0])
    k = len(xs) // 2
    return {"points": [{"x": float(xs[k]), "y": float(ys[k]), "positive": True}]}


def test_read_only_server_first_click_on_a_stored_image_runs_no_encoder(engine, fresh, checkpoint, tmp_path):
    import uvicorn

    from sam2flow.server.app import create_app
    from sam2flow.server.ready import wait_ready
    from sam2flow.server.settings import ServerSettings

    store = stored_copy(tmp_path, engine, fresh[:1])
    before = sorted(store.root.rglob("*"))
    settings = ServerSettings(
        checkpoint=str(checkpoint), preload=["hiera_tiny"], device="cpu", dtype="float32", store=str(store.root)
    )
    app = create_app(settings)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 120)
        served = app.state.sam2flow.pool.get("hiera_tiny")
        assert served.store.root == store.root and not served.store.writable
        body = {"image": {"type": "base64", "value": _png(SCENES[0].image)}, "prompts": [_click(SCENES[0])]}
        with encoder_images(served.model) as seen:
            r = requests.post(f"{url}/sam2/segment_image", json={**body, "format": "rle"}, timeout=120)
        assert r.status_code == 200, r.text
        assert seen[0] == 0  # the first click on a stored image
        want = engine.predict_prompts(store.get(engine.store_id, fresh[0].image_id), [Prompt(**_prompt(body))])
        assert np.array_equal(rle_to_mask(r.json()["predictions"][0]["masks"]), want.masks[0])
        with encoder_images(served.model) as seen:
            r = requests.post(
                f"{url}/sam2/embed_image", json={"image": {"type": "base64", "value": _png(SCENES[1].image)}}
            )
        assert r.status_code == 200 and seen[0] == 1  # a new image: encoded, and not written
        assert sorted(store.root.rglob("*")) == before
    finally:
        server.should_exit = True
        thread.join(30)


def _prompt(body: dict) -> dict:
    p = body["prompts"][0]["points"][0]
    return {"points": [[p["x"], p["y"]]], "labels": [1]}


def test_server_answers_a_damaged_file_with_json_naming_it_and_writes_with_store_write(
    engine, fresh, checkpoint, tmp_path
):
    store = stored_copy(tmp_path, engine, fresh[:1])
    bad = store.path(engine.store_id, fresh[0].image_id)
    damage(bad, "truncated", engine, fresh)
    env = {"SAM2FLOW_STORE": str(store.root), "SAM2FLOW_STORE_WRITE": "1"}
    url, proc = start_server(checkpoint, tmp_path / "server.log", env)
    headers = {"x-api-key": "test-key-123"}
    try:
        r = requests.post(
            f"{url}/sam2/embed_image",
            json={"image": {"type": "base64", "value": _png(SCENES[0].image)}},
            headers=headers,
            timeout=120,
        )
        assert r.status_code == 500 and str(bad) in r.json()["error"]
        assert "not a readable safetensors file" in r.json()["error"]
        r = requests.post(
            f"{url}/sam2/embed_image",
            json={"image": {"type": "base64", "value": _png(SCENES[1].image)}},
            headers=headers,
            timeout=120,
        )
        assert r.status_code == 200  # the server is up, and with --store-write keeps what it computes
        assert store.path(engine.store_id, r.json()["image_id"]).is_file()
        assert proc.poll() is None
    finally:
        stop_server(proc)
