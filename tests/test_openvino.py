"""The OpenVINO image encoder: parity with Meta, the disk cache, the fallback, the server and the CLI.

OpenVINO is what ``backend="auto"`` runs on a CPU, as one graph, except in an interactive engine (the
server), which runs torch, or OpenVINO in per-block pieces when asked. The rest of the suite pins
torch (``SAM2FLOW_BACKEND=torch`` in conftest: every random-weight checkpoint would otherwise be
converted); here the backend is named or the pin lifted. Converting hiera_tiny takes about half a
minute per layout, once per run: every test uses the same random-weight checkpoint, and later
engines load the converted graph from the cache folder.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
import torch

from sam2flow import Sam2Engine
from sam2flow.engine.encoders import BACKEND_ENV, resolve_backend
from sam2flow.engine.fast import position_memos
from sam2flow.engine.precision import resolve_quantize
from sam2flow.formats import rle_to_mask
from sam2flow.server.settings import ServerSettings

from conftest import build_reference, mask_iou, random_image, refuse_dynamic_quantization, start_server, stop_server
from test_parity import SCENES, run_battery

pytest.importorskip("openvino")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ov_engine(tiny_checkpoint):
    return Sam2Engine.from_pretrained(
        checkpoint=str(tiny_checkpoint), device="cpu", dtype="float32", backend="openvino"
    )


@pytest.fixture(scope="module")
def ov_pieces(tiny_checkpoint):
    """An interactive OpenVINO engine: the encoder in per-block pieces, pausing between them."""
    return Sam2Engine.from_pretrained(
        checkpoint=str(tiny_checkpoint), device="cpu", dtype="float32", backend="openvino", interactive=True
    )


def test_auto_runs_openvino_on_a_cpu_as_one_graph(ov_engine, tiny_checkpoint, monkeypatch):
    """With nothing pinned, an engine on a CPU runs OpenVINO (the graph ``ov_engine`` converted, from the
    cache), and an interactive one runs torch."""
    monkeypatch.delenv(BACKEND_ENV)
    engine = Sam2Engine.from_pretrained(checkpoint=str(tiny_checkpoint), device="cpu", dtype="float32")
    assert engine.backend == "openvino" and not engine.encoder.pieces and not engine.encoder.converted
    assert engine.encoder.directory == ov_engine.encoder.directory
    server_like = Sam2Engine.from_pretrained(
        checkpoint=str(tiny_checkpoint), device="cpu", dtype="float32", interactive=True
    )
    assert server_like.backend == "torch" and server_like.encoder.backend == "torch"


def test_pieces_embed_as_the_whole_graph_does(ov_engine, ov_pieces):
    assert not ov_engine.encoder.pieces and ov_pieces.encoder.pieces
    assert ov_pieces.encoder.directory != ov_engine.encoder.directory
    image = random_image(150, 200, seed=46)
    a, b = ov_engine.embed([image], use_cache=False)[0], ov_pieces.embed([image], use_cache=False)[0]
    for want, have in zip((a.image_embed, *a.high_res_feats), (b.image_embed, *b.high_res_feats)):
        torch.testing.assert_close(have, want, rtol=0, atol=1e-4)


def test_openvino_runs_the_encoder_and_releases_the_torch_weights(ov_engine):
    assert ov_engine.backend == "openvino" and ov_engine.encoder.backend == "openvino"
    encoder = ov_engine.model.vision_encoder
    assert all(p.device.type == "meta" for p in encoder.parameters())
    # nor keeps the position encodings the conversion's torch run memoised (~100 MB in float32)
    assert not any(position_memos(encoder))
    before = ov_engine.encoder.runs
    ov_engine.embed([random_image(120, 160, seed=41)])
    assert ov_engine.encoder.runs == before + 1


@pytest.mark.parametrize("scene", list(SCENES))
def test_openvino_float32_parity_with_meta(ov_engine, scene):
    """Every prompt kind of the torch parity battery, with the encoder on OpenVINO: embeddings within
    1e-4 of Meta's, masks IoU >= 0.999, scores within 1e-4."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    (h, w), boxes, points, labels = SCENES[scene]
    predictor = SAM2ImagePredictor(build_reference(ov_engine.spec))
    run_battery(ov_engine, predictor, random_image(h, w, seed=1), boxes, points, labels)


def test_a_second_engine_loads_the_converted_encoder_from_disk(ov_engine, tiny_checkpoint, monkeypatch):
    import openvino

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the same weights are in the cache")

    monkeypatch.setattr(openvino, "convert_model", no_conversion)
    again = Sam2Engine.from_pretrained(
        checkpoint=str(tiny_checkpoint), device="cpu", dtype="float32", backend="openvino"
    )
    assert again.backend == "openvino" and not again.encoder.converted
    assert again.encoder.directory == ov_engine.encoder.directory
    image = random_image(200, 300, seed=42)
    a, b = ov_engine.embed([image])[0], again.embed([image])[0]
    torch.testing.assert_close(a.image_embed, b.image_embed, rtol=0, atol=0)


def test_a_failed_conversion_falls_back_to_torch_with_one_line(tiny_checkpoint, tiny_engine, monkeypatch, caplog):
    import openvino

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operation aten::frobnicate")

    monkeypatch.setattr(openvino, "convert_model", broken)
    monkeypatch.setenv(BACKEND_ENV, "openvino")  # what a user sets to opt in, until it fails
    monkeypatch.setenv("SAM2FLOW_CACHE_DIR", str(tiny_checkpoint.parent / "empty-cache"))
    with caplog.at_level(logging.WARNING, logger="sam2flow.engine.engine"):
        engine = Sam2Engine.from_pretrained(checkpoint=str(tiny_checkpoint), device="cpu", dtype="float32")
    monkeypatch.undo()
    assert engine.backend == "torch" and engine.encoder.backend == "torch"
    lines = [r.getMessage() for r in caplog.records if r.name == "sam2flow.engine.engine"]
    assert len(lines) == 1 and "running torch instead" in lines[0] and "aten::frobnicate" in lines[0]
    image = random_image(96, 128, seed=43)
    boxes = np.array([[10, 10, 90, 80]], np.float32)
    np.testing.assert_array_equal(engine.segment(image, boxes).masks, tiny_engine.segment(image, boxes).masks)


def test_backend_choice(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.delenv("SAM2FLOW_MAX_BATCH_SIZE", raising=False)
    assert ServerSettings(device="cpu").embed_batch_size() == 1  # one image per encoder run on a CPU
    assert ServerSettings(device="cpu", max_batch_size=3).embed_batch_size() == 3
    assert resolve_backend("auto", CPU) == "openvino"
    assert resolve_backend("auto", CPU, interactive=True) == "torch"  # clicks: see engine/encoders.py
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    assert resolve_backend("openvino", CPU, interactive=True) == "openvino"
    assert resolve_backend("openvino", CPU) == "openvino"
    monkeypatch.setenv(BACKEND_ENV, "openvino")
    assert resolve_backend("auto", CPU, interactive=True) == "openvino"
    assert resolve_backend("torch", CPU) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert resolve_backend("auto", CPU) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "tensorrt")
    with pytest.raises(ValueError, match="SAM2FLOW_BACKEND='tensorrt' is not a backend"):
        resolve_backend("auto", CPU)
    with pytest.raises(ValueError, match="unknown backend 'onnx'"):
        resolve_backend("onnx", CPU)
    with pytest.raises(ValueError, match="runs on the CPU, not on cuda"):
        resolve_backend("openvino", torch.device("cuda"))


def test_an_int8_encoder_that_will_not_compile_falls_back_to_float_openvino(
    ov_engine, tiny_checkpoint, monkeypatch, caplog
):
    """int8 weights are what ``quantize="auto"`` runs on a CPU without native bf16. Where the CPU plugin
    cannot compile them (seen with oneDNN capped to AVX2 on an AVX-512 CPU: no inner-product primitive for
    the dynamically quantised layers), the engine runs the float encoder on OpenVINO, not torch, and says
    so in one line."""
    pytest.importorskip("nncf")
    from sam2flow.engine import precision

    refuse_dynamic_quantization(monkeypatch)
    # no bf16 (auto is float32), int8 dot products (auto quantises the weights)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx_vnni"}))
    with caplog.at_level(logging.WARNING, logger="sam2flow.engine.engine"):
        engine = Sam2Engine.from_pretrained(checkpoint=str(tiny_checkpoint), device="cpu", backend="openvino")
    monkeypatch.undo()
    assert (engine.backend, engine.quantize, engine.dtype) == ("openvino", "none", torch.float32)
    lines = [r.getMessage() for r in caplog.records if r.name == "sam2flow.engine.engine"]
    assert len(lines) == 1 and "running the float encoder instead" in lines[0], lines
    assert "could not create a primitive" in lines[0] and "\n" not in lines[0]
    image = random_image(96, 128, seed=44)
    boxes = np.array([[10, 10, 90, 80]], np.float32)
    np.testing.assert_array_equal(engine.segment(image, boxes).masks, ov_engine.segment(image, boxes).masks)


def test_quantize_choice(tiny_checkpoint, tmp_path, monkeypatch):
    """``auto`` quantises the weights only where ``dtype="auto"`` means float32 on OpenVINO (a CPU without
    native bf16) for batch work; int8 activations need calibration images; bad combinations say why."""
    from sam2flow.engine import precision

    f32, bf16 = torch.float32, torch.bfloat16
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx_vnni"}))  # int8 dot products
    assert resolve_quantize("auto", "auto", f32, "openvino", False) == "int8-weights"
    assert resolve_quantize("auto", "auto", f32, "openvino", False, interactive=True) == "none"
    assert resolve_quantize("auto", "float32", f32, "openvino", False) == "none"  # float32 asked for: exact
    assert resolve_quantize("auto", "auto", bf16, "openvino", False) == "none"
    assert resolve_quantize("auto", "auto", f32, "torch", False) == "none"
    assert resolve_quantize("int8", "auto", bf16, "openvino", True) == "int8"
    with pytest.raises(ValueError, match="quantize='int8' calibrates on images"):
        resolve_quantize("int8", "auto", f32, "openvino", False)
    with pytest.raises(ValueError, match="runs on OpenVINO, not on the torch backend"):
        resolve_quantize("int8-weights", "auto", f32, "torch", False)
    with pytest.raises(ValueError, match="calibration images are for quantize='int8'"):
        resolve_quantize("int8-weights", "auto", f32, "openvino", True)
    with pytest.raises(ValueError, match="unknown quantize 'int4'"):
        resolve_quantize("int4", "auto", f32, "openvino", False)
    with pytest.raises(ValueError, match="an interactive engine needs pieces"):
        Sam2Engine.from_pretrained(
            checkpoint=str(tiny_checkpoint),
            device="cpu",
            backend="openvino",
            interactive=True,
            quantize="int8",
            calibration=[random_image(64, 64, seed=1)],
        )
    from PIL import Image

    Image.fromarray(random_image(64, 64, seed=2)).save(tmp_path / "x.png")
    run = subprocess.run(
        [sys.executable, "-m", "sam2flow", "segment", str(tmp_path / "x.png"), "--checkpoint", str(tiny_checkpoint)]
        + ["--box", "1,2,3,4", "--backend", "openvino", "--quantize", "int8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0 and run.stderr.count("\n") == 1 and "calibrates on images" in run.stderr, run.stderr


def test_int8_weights_are_checked_against_the_float_encoder(ov_engine, tmp_path, monkeypatch):
    """The quantised IR's image embedding is compared with the float IR's on the check image (NNCF
    compresses in place: comparing after it compared the int8 model with itself), and refused over the
    tolerance."""
    pytest.importorskip("nncf")
    from sam2flow.engine import openvino_encoder as ove

    source = ov_engine.encoder.directory
    layout = ove.Layout.whole(ov_engine.model.vision_encoder.backbone)
    check = ove._check_pixels(ov_engine.input_size)
    err = ove._quantize(source, tmp_path / "kept", layout, "int8-weights", [], check)
    assert 1e-3 < err < ove.QUANT_TOLERANCE["int8-weights"], err
    assert (tmp_path / "kept" / "piece0.xml").exists()
    monkeypatch.setitem(ove.QUANT_TOLERANCE, "int8-weights", err / 2)
    with pytest.raises(ove.QuantizeError, match="differs from float32's"):
        ove._quantize(source, tmp_path / "refused", layout, "int8-weights", [], check)
    assert not (tmp_path / "refused").exists()


def test_compile_is_a_torch_option(tiny_checkpoint):
    with pytest.raises(ValueError, match="compile=True compiles the torch encoder"):
        Sam2Engine.from_pretrained(checkpoint=str(tiny_checkpoint), device="cpu", backend="openvino", compile=True)


@pytest.mark.parametrize("interactive", [True, False], ids=["pieces", "whole"])
def test_the_openvino_encoder_waits_while_a_decode_runs(ov_engine, ov_pieces, interactive):
    """Clicks keep their priority on OpenVINO: the encoder waits during a decode, at a piece boundary
    (interactive: before each of the trunk's pieces and the head) or before the whole graph."""
    engine = ov_pieces if interactive else ov_engine
    gate = engine._decode_first
    runs = engine.encoder.runs
    done, calls = [], []
    pause = engine.encoder._pause
    engine.encoder._pause = lambda: (calls.append(1), pause())
    embedder = threading.Thread(
        target=lambda: done.append(engine.embed([random_image(96, 128, seed=44)], use_cache=False))
    )
    try:
        with gate.decoding():
            embedder.start()
            deadline = time.monotonic() + 120
            while gate.paused == 0 and embedder.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert gate.paused == 1, "the OpenVINO encoder did not pause for the running decode"
            assert not done and engine.encoder.runs == runs
        embedder.join(120)
    finally:
        engine.encoder._pause = pause
    assert done and gate.paused == 0 and engine.encoder.runs == runs + 1
    blocks = len(engine.model.vision_encoder.backbone.blocks)
    stages = len(engine.model.vision_encoder.backbone.stage_ends)
    assert len(calls) == (blocks + 1 if interactive else 1) and blocks > stages


def test_server_and_cli_run_openvino_when_asked(ov_engine, ov_pieces, tiny_checkpoint, tmp_path):
    """With ``SAM2FLOW_BACKEND=openvino``, the server (in pieces: it answers clicks) and the CLI run
    OpenVINO, and their masks are the OpenVINO engine's (which match Meta's, above); with ``auto`` the
    server runs torch."""
    import cv2

    image = random_image(240, 320, seed=45)
    box = [30, 40, 200, 180]
    want = ov_engine.segment(image, np.array([box], np.float32))
    url, proc = start_server(
        tiny_checkpoint, tmp_path / "server.log", {BACKEND_ENV: "openvino", "SAM2FLOW_PRELOAD": "hiera_tiny"}
    )
    try:
        info = requests.get(f"{url}/info", timeout=30).json()
        assert info["backends"] == {"hiera_tiny": "openvino"}
    finally:
        stop_server(proc)
    url, proc = start_server(
        tiny_checkpoint, tmp_path / "server-auto.log", {BACKEND_ENV: "auto", "SAM2FLOW_PRELOAD": "hiera_tiny"}
    )
    try:
        assert requests.get(f"{url}/info", timeout=30).json()["backends"] == {"hiera_tiny": "torch"}
    finally:
        stop_server(proc)
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), image[:, :, ::-1])
    out = tmp_path / "out.json"
    run = subprocess.run(
        [sys.executable, "-m", "sam2flow", "segment", str(path), "--checkpoint", str(tiny_checkpoint)]
        + ["--dtype", "float32", "--box", ",".join(map(str, box)), "--format", "rle", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, BACKEND_ENV: "openvino"},
    )
    assert run.returncode == 0, run.stderr
    got = rle_to_mask(json.loads(out.read_text())["predictions"][0]["rle"])
    assert mask_iou(got, want.masks[0]) >= 0.999
