"""GraphEngine: SAM2 from exported OpenVINO graphs, without torch, against Meta's predictor and our engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from sam2flow import GraphEngine, GraphPool, Prompt, Sam2Engine, export_graphs, run_workflow
from sam2flow.engine import transforms as T
from sam2flow.engine.cpu import cpu_bf16, cpu_flags
from sam2flow.formats import mask_iou
from sam2flow.models.registry import get_spec

from conftest import build_reference, random_image, refuse_dynamic_quantization
from test_parity import SCENES, run_battery, run_mask_input_battery
from test_workflow_run import DEFINITION, DETECTIONS, IMAGES, expected

# ---- the numpy maths against torch's ----------------------------------------------------------


@pytest.mark.parametrize("hw", [(480, 640), (1500, 2000), (300, 1100), (1024, 1024), (17, 3000)])
def test_numpy_preprocessing_equals_torch(hw):
    """The antialiased resize and normalisation in numpy equal ``F.interpolate(antialias=True)``
    (up and down, odd ratios) within float32 rounding."""
    image = random_image(*hw, seed=hw[0])
    ours = T.preprocess_array(image, 1024)
    ref = T.preprocess([image], 1024, torch.device("cpu"), torch.float32).numpy()
    assert ours.shape == ref.shape == (1, 3, 1024, 1024)
    assert np.abs(ours - ref).max() < 5e-6


@pytest.mark.parametrize("hw", [(480, 640), (100, 120), (256, 256), (1000, 3000), (333, 777)])
def test_numpy_mask_upsampling_equals_torch(hw):
    """Bilinear (align_corners=False) upsampling of logits and the threshold: the same pixels as torch."""
    low = np.random.default_rng(hw[1]).normal(0, 3, (3, 256, 256)).astype(np.float32)
    ours = T.upsample_masks_array(low, hw)
    ref = T.upsample_masks(torch.from_numpy(low), hw).numpy()
    assert ours.shape == ref.shape == (3, *hw)
    assert np.array_equal(ours, ref)


def test_numpy_decoder_inputs_equal_the_torch_decoders_operands(tiny_engine):
    """What GraphEngine keeps of an image (its tokens and the sub-pixel rows of both high-resolution
    features), plus the upscaling biases in the graph, are exactly the torch decoder's operands."""
    from sam2flow.engine.decoder import image_rows, upscale_addends, with_upscale_bias

    emb = tiny_engine.embed([random_image(200, 300, seed=4)])[0]
    s0, s1 = (f.float() for f in emb.high_res_feats)
    rows, pixels1, pixels0 = T.decoder_inputs_array(emb.image_embed.float().numpy(), s0.numpy(), s1.numpy())
    assert np.array_equal(rows, image_rows(emb.image_embed, torch.float32).numpy())
    decoder = tiny_engine.model.mask_decoder
    ours = with_upscale_bias(decoder, torch.from_numpy(pixels1), torch.from_numpy(pixels0))
    for a, b in zip(ours, upscale_addends(decoder, (s0, s1))):
        assert a.shape == b.shape and torch.equal(a, b)


# ---- an export of the random-weight checkpoint --------------------------------------------------


@pytest.fixture(scope="module")
def graphs(tiny_checkpoint, tmp_path_factory):
    return export_graphs(tmp_path_factory.mktemp("graphs") / "hiera_tiny", checkpoint=str(tiny_checkpoint))


@pytest.fixture(scope="module")
def graph_engine(graphs):
    return GraphEngine(graphs, dtype="float32")


def test_export_writes_every_graph_and_its_manifest(graphs):
    manifest = json.loads((graphs / "sam2flow-graphs.json").read_text())
    assert manifest["version"] == "hiera_tiny" and manifest["input_size"] == 1024
    assert set(manifest["decoders"]) == {"decoder-multi", "decoder-single", "decoder-multi-mask", "decoder-single-mask"}
    assert set(manifest["encoders"]) == {"none", "int8-weights"}
    for file in [*manifest["encoders"].values(), *manifest["decoders"].values()]:
        assert (graphs / file).is_file() and (graphs / file).with_suffix(".bin").stat().st_size > 1 << 20


@pytest.mark.parametrize("scene", list(SCENES))
def test_float32_masks_equal_meta_predictor(graph_engine, scene):
    """Boxes, single boxes, clicks with negative labels, boxes with clicks, multimask on and off: mask
    IoU >= 0.999 and scores within 1e-4 of Meta's predictor on the same weights."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(build_reference(get_spec("hiera_tiny", "sam2.1")))
    hw, boxes, points, labels = SCENES[scene]
    run_battery(graph_engine, predictor, random_image(*hw, seed=len(scene)), boxes, points, labels)


def test_mask_prompts_equal_meta_predictor(graph_engine):
    """Low-resolution logits fed back (the click-to-refine loop), several prompts and one."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    run_mask_input_battery(graph_engine, SAM2ImagePredictor(build_reference(get_spec("hiera_tiny", "sam2.1"))))


def test_many_prompts_of_mixed_shapes_equal_sam2engine(graph_engine, tiny_engine):
    """More prompts than one decoder run takes (chunks), of three shapes, with hole and speck removal:
    the same masks as ``Sam2Engine`` in prompt order."""
    image = random_image(360, 500, seed=9)
    rng = np.random.default_rng(1)
    prompts = []
    for i in range(21):
        x, y = rng.uniform(0, 400), rng.uniform(0, 260)
        box = [x, y, x + rng.uniform(20, 100), y + rng.uniform(20, 100)]
        kind = i % 3
        prompts.append(
            Prompt(box=box) if kind == 0 else Prompt(points=[[x + 5, y + 5]], labels=[1])
            if kind == 1 else Prompt(box=box, points=[[x + 10, y + 10], [x, y]], labels=[1, 0])
        )  # fmt: skip
    ours = graph_engine.predict_prompts(graph_engine.embed([image])[0], prompts, max_hole_area=30, max_sprinkle_area=30)
    ref = tiny_engine.predict_prompts(tiny_engine.embed([image])[0], prompts, max_hole_area=30, max_sprinkle_area=30)
    assert ours.masks.shape == ref.masks.shape == (21, 360, 500)
    assert min(mask_iou(a, b) for a, b in zip(ours.masks, ref.masks)) >= 0.999
    np.testing.assert_allclose(ours.scores, ref.scores, atol=1e-4)


def test_workflow_runs_in_a_process_without_torch(graphs, tiny_engine, tmp_path):
    """The step through ``run_workflow`` with a ``GraphEngine``, in a fresh process: torch is never
    imported, and the predictions equal ``Sam2Engine``'s."""
    np.savez(tmp_path / "images.npz", *IMAGES)
    (tmp_path / "detections.json").write_text(json.dumps(DETECTIONS))
    (tmp_path / "definition.json").write_text(json.dumps(DEFINITION))
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        from sam2flow import GraphEngine, run_workflow, serialize_outputs
        d = {str(tmp_path)!r}
        images = list(np.load(d + "/images.npz").values())
        inputs = {{"image": images, "detections": json.load(open(d + "/detections.json"))}}
        engine = GraphEngine({str(graphs)!r}, dtype="float32")
        out = run_workflow(json.load(open(d + "/definition.json")), inputs, engine)
        masks = [r["predictions"].mask for r in out]
        np.savez(d + "/masks.npz", *masks)
        print(json.dumps({{"torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules,
                          "n": [len(m) for m in masks], "json": serialize_outputs(out)[0]["predictions"]["image"]}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["torch"] is False and got["transformers"] is False
    assert got["n"] == [2, 1] and got["json"] == {"width": 320, "height": 240}
    masks = list(np.load(tmp_path / "masks.npz").values())
    for image, dets, ours in zip(IMAGES, DETECTIONS, masks):
        ref = expected(tiny_engine, image, dets).masks
        assert min(mask_iou(a, b) for a, b in zip(ours, ref)) >= 0.999


def test_run_workflow_takes_a_graph_engine_or_its_pool(graph_engine):
    inputs = {"image": IMAGES[:1], "detections": DETECTIONS[:1]}
    a = run_workflow(DEFINITION, inputs, graph_engine)
    b = run_workflow(DEFINITION, inputs, GraphPool(graph_engine))
    assert np.array_equal(a[0]["predictions"].mask, b[0]["predictions"].mask) and len(a[0]["predictions"]) == 2
    with pytest.raises(ValueError, match="no graphs of SAM2 'hiera_small'"):
        GraphPool(graph_engine).get("hiera_small")
    with pytest.raises(ValueError, match="engines must be an EngineProvider"):
        run_workflow(DEFINITION, inputs, object())


@pytest.mark.skipif(not cpu_bf16(cpu_flags()), reason="no native bf16 on this CPU")
def test_auto_is_bf16_here_and_keeps_the_guard(graphs, graph_engine):
    """``dtype="auto"`` on a native-bf16 CPU: bf16 graphs, masks within the bf16 guard (mean IoU >= 0.97)."""
    fast = GraphEngine(graphs)
    assert fast.dtype == "bfloat16" and fast.quantize == "none"
    _guard(fast, graph_engine)


def test_int8_weights_keep_the_guard(graphs, graph_engine, monkeypatch):
    """Where ``auto`` means float32 (a CPU without native bf16) and the CPU has int8 dot products: the
    int8-weights encoder, within the guard. Without them (OpenVINO then multiplies int8 weights in
    float, no faster), the float encoder."""
    import sam2flow.engine.graph_engine as ge

    monkeypatch.setattr(ge, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    no_vnni = GraphEngine(graphs)
    assert (no_vnni.dtype, no_vnni.quantize) == ("float32", "none")
    del no_vnni
    monkeypatch.setattr(ge, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx_vnni"}))
    small = GraphEngine(graphs)
    assert small.dtype == "float32" and small.quantize == "int8-weights"
    _guard(small, graph_engine)


def test_int8_weights_that_will_not_compile_fall_back_to_float(graphs, graph_engine, monkeypatch, caplog):
    """Where the CPU plugin cannot compile the int8-weights encoder (seen with oneDNN capped to AVX2),
    ``auto`` runs the float one and says so in one line; asked for by name, the error reaches the caller."""
    import logging

    import sam2flow.engine.graph_engine as ge

    refuse_dynamic_quantization(monkeypatch)
    monkeypatch.setattr(ge, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx_vnni"}))
    with caplog.at_level(logging.WARNING, logger="sam2flow.engine.graph_engine"):
        engine = GraphEngine(graphs)
    assert (engine.dtype, engine.quantize) == ("float32", "none")
    lines = [r.getMessage() for r in caplog.records if r.name == "sam2flow.engine.graph_engine"]
    assert len(lines) == 1 and "could not create a primitive" in lines[0] and "\n" not in lines[0], lines
    image = random_image(120, 160, seed=5)
    boxes = np.array([[10, 10, 100, 90]], np.float32)
    a = engine.predict(engine.embed([image])[0], boxes=boxes)
    b = graph_engine.predict(graph_engine.embed([image])[0], boxes=boxes)
    np.testing.assert_array_equal(a.masks, b.masks)
    with pytest.raises(ge.OpenVINOError, match="could not compile"):
        GraphEngine(graphs, quantize="int8-weights")


def _guard(engine: GraphEngine, reference: GraphEngine) -> None:
    ious = []
    for seed, hw in ((41, (300, 400)), (42, (480, 640))):
        image = random_image(*hw, seed=seed)
        boxes = np.array([[20, 30, 200, 250], [150, 10, 390, 290], [60, 60, 120, 200]], np.float32)
        a = engine.predict(engine.embed([image])[0], boxes=boxes)
        b = reference.predict(reference.embed([image])[0], boxes=boxes)
        ious += [mask_iou(x, y) for x, y in zip(a.masks, b.masks)]
    assert np.mean(ious) >= 0.97, ious


# ---- bad input ---------------------------------------------------------------------------------


def test_bad_exports_and_calls_are_clear_errors(graphs, graph_engine, tiny_engine, tmp_path):
    with pytest.raises(ValueError, match="no graph export at"):
        GraphEngine(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="has no sam2flow-graphs.json"):
        GraphEngine(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    manifest = json.loads((graphs / "sam2flow-graphs.json").read_text())
    (broken / "sam2flow-graphs.json").write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(ValueError, match="export format 99"):
        GraphEngine(broken)
    (broken / "sam2flow-graphs.json").write_text(json.dumps(manifest))  # files not copied
    with pytest.raises(ValueError, match=r"encoder 'none' \(encoder/piece0.xml\) is missing"):
        GraphEngine(broken)
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        GraphEngine(graphs, dtype="float16")
    image = random_image(100, 120)
    with pytest.raises(ValueError, match="not made by this GraphEngine"):
        graph_engine.predict(tiny_engine.embed([image])[0], boxes=[[0, 0, 10, 10]])
    emb = graph_engine.embed([image])[0]
    with pytest.raises(ValueError, match="unprompted"):
        graph_engine.automatic(emb)
    with pytest.raises(ValueError, match="prompt 1"):
        graph_engine.predict_prompts(emb, [Prompt(box=[0, 0, 10, 10]), Prompt(box=[0, 0, float("nan"), 5])])
    with pytest.raises(ValueError, match="max_hole_area"):
        graph_engine.predict(emb, boxes=[[0, 0, 10, 10]], max_hole_area=-1)
    with pytest.raises(ValueError, match="wrap a single image"):
        graph_engine.embed(image)
    empty = graph_engine.predict(emb, boxes=np.zeros((0, 4), np.float32))
    assert empty.masks.shape == (0, 100, 120)


def test_export_refuses_a_folder_that_is_not_an_export(tmp_path, tiny_checkpoint):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a sam2flow graph export"):
        export_graphs(tmp_path / "mine", checkpoint=str(tiny_checkpoint))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_sam2engine_is_unchanged_by_the_split(tiny_engine):
    """``Sam2Engine.predict`` validates through the shared ``prompt_arrays``: the same errors as before."""
    emb = tiny_engine.embed([random_image(100, 120)])[0]
    with pytest.raises(ValueError, match="2 boxes but 1 point prompts"):
        tiny_engine.predict(emb, boxes=[[0, 0, 5, 5], [1, 1, 6, 6]], points=[[[1, 1]]], point_labels=[[1]])
    with pytest.raises(ValueError, match="point_labels were given without points"):
        tiny_engine.predict(emb, point_labels=[[1]])
    assert isinstance(tiny_engine, Sam2Engine)


# ---- the command line ------------------------------------------------------------------------


def test_cli_exports_and_runs_batch_and_workflow_on_graphs(tiny_checkpoint, tiny_engine, tmp_path, capsys):
    """``export-graphs``, then ``batch --graphs`` and ``run-workflow --graphs``: the masks of ``Sam2Engine``;
    what ``--graphs`` cannot do is one line on stderr and exit status 1."""
    from PIL import Image

    from sam2flow.cli import main
    from sam2flow.formats import predictions_to_detections, rle_to_mask

    graphs = tmp_path / "graphs"
    assert main(["export-graphs", str(graphs), "--checkpoint", str(tiny_checkpoint), "--no-int8-weights"]) == 0
    assert capsys.readouterr().out.strip() == str(graphs)
    images, boxes = tmp_path / "images", tmp_path / "boxes"
    images.mkdir(), boxes.mkdir()
    for i, (image, dets) in enumerate(zip(IMAGES, DETECTIONS)):
        Image.fromarray(image).save(images / f"im{i}.png")
        (boxes / f"im{i}.json").write_text(json.dumps(dets))
    out = tmp_path / "out.jsonl"
    args = ["--graphs", str(graphs), "--dtype", "float32"]
    assert main(["batch", str(images), "--out", str(out), "--boxes", str(boxes), *args]) == 0
    records = {r["file"]: r for r in map(json.loads, out.read_text().splitlines())}
    for i, (image, dets) in enumerate(zip(IMAGES, DETECTIONS)):
        got = [rle_to_mask(p["rle"]) for p in records[f"im{i}.png"]["predictions"]]
        want = expected(tiny_engine, image, dets).masks
        assert len(got) == len(want) and min(mask_iou(a, b) for a, b in zip(got, want)) >= 0.999
    (tmp_path / "wf.json").write_text(json.dumps(DEFINITION))
    wf = ["run-workflow", str(tmp_path / "wf.json"), "--input", f"image={images / 'im1.png'}"]
    wf += ["--input", f"detections=@{boxes / 'im1.json'}", "--format", "rle", *args]
    capsys.readouterr()
    assert main(wf) == 0
    payload = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert predictions_to_detections(payload).data["parent_id"].tolist() == ["k1"]
    for bad, message in (
        (["batch", str(images), "--out", str(tmp_path / "o.jsonl"), "--store", str(tmp_path / "s"), *args], "--store"),
        ([*wf[:-2], "--graphs", str(tmp_path / "nowhere")], "no graph export at"),
        ([*wf[:-1], "float16"], "unknown dtype 'float16'"),
    ):
        assert main(bad) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
