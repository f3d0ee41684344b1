"""The engine on a CUDA GPU: the image encoder replayed from CUDA graphs equals the eager one bit for
bit, and masks match Meta's predictor on the same GPU. Skipped without a GPU (CI has none); run on
one with ``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tests.conftest import build_reference, mask_iou

from sam2flow import Sam2Engine
from sam2flow.engine import transforms as T
from sam2flow.engine.cuda_graphs import CUDA_GRAPHS_ENV, CudaGraphEncoder, cuda_graphs_wanted
from sam2flow.engine.encoders import TorchEncoder
from sam2flow.models.registry import get_spec
from sam2flow.testing.scenes import make_scene

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_graphs_only_on_cuda_and_can_be_turned_off(monkeypatch):
    monkeypatch.delenv(CUDA_GRAPHS_ENV, raising=False)
    assert cuda_graphs_wanted(torch.device("cuda", 0))
    assert not cuda_graphs_wanted(torch.device("cpu"))
    for off in ("0", "false", "Off"):
        monkeypatch.setenv(CUDA_GRAPHS_ENV, off)
        assert not cuda_graphs_wanted(torch.device("cuda", 0))
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "1")
    assert cuda_graphs_wanted(torch.device("cuda", 0))


@pytest.fixture(scope="module")
def cuda_engines(tiny_checkpoint):
    return {
        dtype: Sam2Engine.from_pretrained("hiera_tiny", checkpoint=str(tiny_checkpoint), device="cuda", dtype=dtype)
        for dtype in ("float32", "bfloat16")
    }


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replays_equal_the_eager_encoder(cuda_engines, dtype):
    engine = cuda_engines[dtype]
    encoder = engine.encoder
    assert isinstance(encoder, CudaGraphEncoder)
    images = [make_scene(s, size=(480, 640)).image for s in (1, 2, 3)]
    one = T.preprocess(images[:1], engine.input_size, engine.device, encoder.input_dtype)
    two = T.preprocess(images[1:], engine.input_size, engine.device, encoder.input_dtype)
    with torch.inference_mode():
        eager_one, eager_two = encoder.side(one), encoder.side(two)
    first = encoder(one)  # captures batch size 1
    replayed = encoder(one)
    pair = encoder(two)  # a second graph, batch size 2, in the same pool
    assert encoder.failed is None and encoder.captures == 2
    for got in (first, replayed):
        for a, b in zip(got, eager_one):
            assert torch.equal(a, b)
    for a, b in zip(pair, eager_two):
        assert torch.equal(a, b)
    for a, b in zip(encoder(one), eager_one):  # batch 1 again, after batch 2's capture in the shared pool
        assert torch.equal(a, b)
    assert not any(first[i].data_ptr() == replayed[i].data_ptr() for i in range(3))  # callers own their tensors


@gpu
def test_graphs_off_runs_the_eager_encoder(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "0")
    engine = Sam2Engine.from_pretrained("hiera_tiny", checkpoint=str(tiny_checkpoint), device="cuda", dtype="float32")
    assert type(engine.encoder) is TorchEncoder  # not its CudaGraphEncoder subclass


@gpu
def test_cuda_masks_match_meta_on_the_same_gpu(cuda_engines):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    engine = cuda_engines["float32"]
    model = copy.deepcopy(build_reference(get_spec("hiera_tiny", "sam2.1"))).to("cuda")  # the memo stays on the CPU
    reference = SAM2ImagePredictor(model)
    for seed in (5, 6):
        scene = make_scene(seed, size=(480, 640))
        boxes = scene.boxes[:12]
        emb = engine.embed([scene.image])[0]
        ours = engine.predict(emb, boxes=boxes)  # 12 boxes: more than the CPU's decode chunk of 8
        with torch.inference_mode():
            reference.set_image(scene.image)
            masks, scores, _ = reference.predict(box=boxes, multimask_output=True)
        masks = masks.reshape(len(boxes), 3, *masks.shape[-2:])
        best = masks[np.arange(len(boxes)), scores.reshape(len(boxes), 3).argmax(1)] > 0
        for k in range(len(boxes)):
            assert mask_iou(ours.masks[k], best[k]) >= 0.99, (seed, k)
    assert engine.encoder.failed is None and engine.encoder.captures >= 1
