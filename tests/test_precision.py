"""The bfloat16 image-encoder path keeps masks within the accuracy guard of float32."""

from __future__ import annotations

import numpy as np
import pytest

from sam2flow import Sam2Engine

from conftest import mask_iou, random_image

GUARD_IOU = 0.97


def test_bfloat16_encoder_keeps_masks(tiny_checkpoint, tiny_engine):
    image = random_image(480, 640, seed=5)
    boxes = np.array([[0, 0, 64, 48], [100, 100, 500, 380], [300, 20, 620, 200]], np.float32)
    bf16 = Sam2Engine.from_pretrained(checkpoint=str(tiny_checkpoint), device="cpu", dtype="bfloat16")
    want = tiny_engine.predict(tiny_engine.embed([image])[0], boxes=boxes)
    got = bf16.predict(bf16.embed([image])[0], boxes=boxes)
    assert bf16.embed([image])[0].image_embed.dtype.is_floating_point
    for i in range(len(boxes)):
        assert mask_iou(got.masks[i], want.masks[i]) >= GUARD_IOU
    np.testing.assert_allclose(got.scores, want.scores, atol=5e-3)


def test_cache_keeps_precisions_apart(tiny_checkpoint, tiny_engine):
    """A float32 and a bfloat16 engine sharing one cache never hand each other embeddings."""
    bf16 = Sam2Engine(tiny_engine.model.__class__(tiny_engine.model.config), tiny_engine.spec, device="cpu",
                      dtype="bfloat16", cache=tiny_engine.cache)
    image = random_image(64, 64, seed=9)
    a = tiny_engine.embed([image])[0]
    b = bf16.embed([image])[0]
    assert a.key != b.key


@pytest.mark.parametrize("dtype", ["int8", "float64"])
def test_unknown_dtype_is_rejected(tiny_checkpoint, dtype):
    with pytest.raises(ValueError, match="dtype"):
        Sam2Engine.from_pretrained(checkpoint=str(tiny_checkpoint), device="cpu", dtype=dtype)
