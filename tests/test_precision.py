"""The bfloat16 path (encoder and decoder) keeps masks within the accuracy guard of float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


def test_bfloat16_decoder_keeps_a_refining_clicks_mask(tiny_checkpoint, tiny_engine):
    """The labelling page's path: a click refining a box's mask (its logits as the mask prompt), decoded
    by the bf16 engine's decoder from the float32 engine's own embedding, so only the decoder differs."""
    bf16 = Sam2Engine.from_pretrained(checkpoint=str(tiny_checkpoint), device="cpu", dtype="bfloat16")
    assert bf16.decoder_dtype == torch.bfloat16 and tiny_engine.decoder_dtype == torch.float32
    emb = tiny_engine.embed([random_image(480, 640, seed=7)])[0]
    box = np.array([[100, 100, 500, 380]], np.float32)
    click = dict(points=np.array([[[300, 240], [120, 120]]], np.float32), point_labels=np.array([[1, 0]]))
    want, got = tiny_engine.predict(emb, boxes=box), bf16.predict(emb, boxes=box)
    assert mask_iou(got.masks[0], want.masks[0]) >= GUARD_IOU
    want2 = tiny_engine.predict(emb, **click, mask_input=want.low_res_logits, multimask_output=False)
    got2 = bf16.predict(emb, **click, mask_input=got.low_res_logits, multimask_output=False)
    assert mask_iou(got2.masks[0], want2.masks[0]) >= GUARD_IOU
    assert not np.array_equal(got2.low_res_logits, want2.low_res_logits)  # it did run in bfloat16
    np.testing.assert_allclose(got2.scores, want2.scores, atol=2e-2)


def test_cache_keeps_precisions_apart(tiny_checkpoint, tiny_engine):
    """A float32 and a bfloat16 engine on the same weights, sharing one cache, never hand each other
    embeddings: only the precision tells their keys apart."""
    import copy

    bf16 = Sam2Engine(
        copy.deepcopy(tiny_engine.model), tiny_engine.spec, device="cpu", dtype="bfloat16", cache=tiny_engine.cache
    )
    image = random_image(64, 64, seed=9)
    a = tiny_engine.embed([image])[0]
    b = bf16.embed([image])[0]
    assert a.key != b.key and b is not a
    assert not torch.equal(a.image_embed, b.image_embed)  # b was computed by the bf16 encoder
    assert bf16.embed([image])[0] is b and tiny_engine.embed([image])[0] is a


@pytest.mark.parametrize("dtype", ["int8", "float64"])
def test_unknown_dtype_is_rejected(tiny_checkpoint, dtype):
    with pytest.raises(ValueError, match="dtype"):
        Sam2Engine.from_pretrained(checkpoint=str(tiny_checkpoint), device="cpu", dtype=dtype)


def test_auto_dtype_follows_the_hardware(monkeypatch):
    """auto: bfloat16 only where the CPU computes it natively (emulated bf16 is ~100x slower)."""
    import torch

    from sam2flow.engine import precision

    cpu = torch.device("cpu")
    for flags, want in [
        ({"avx2", "avx512f"}, torch.float32),
        ({"avx512_bf16"}, torch.bfloat16),
        ({"amx_bf16", "amx_tile"}, torch.bfloat16),
    ]:
        monkeypatch.setattr(precision, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert precision.resolve_dtype("auto", cpu) == want
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # a bf16 CPU capped to stand in for an AVX2 one
    assert precision.resolve_dtype("auto", cpu) == torch.float32
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_amx")
    assert precision.resolve_dtype("auto", cpu) == torch.bfloat16
    assert precision.resolve_dtype("fp32", cpu) == torch.float32
    assert precision.resolve_dtype(torch.bfloat16, cpu) == torch.bfloat16
    assert precision.resolve_dtype("auto", torch.device("mps")) == torch.float32


def test_auto_quantises_weights_only_with_int8_dot_products(monkeypatch):
    """quantize="auto" on a CPU without native bf16: int8 weights where the CPU has int8 dot products
    (VNNI, AMX-INT8) and oneDNN is not capped below them; elsewhere OpenVINO multiplies int8 weights
    in float, no faster than float weights, so the float encoder."""
    import torch

    from sam2flow.engine import precision

    def auto(flags: set[str]) -> str:
        monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
        return precision.resolve_quantize("auto", "auto", torch.float32, "openvino", False)

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert auto({"avx2", "fma"}) == "none"  # Haswell to Coffee Lake, Zen 1-3
    assert auto({"avx2", "fma", "avx_vnni"}) == "int8-weights"  # Alder Lake
    assert auto({"avx512f", "avx512_vnni"}) == "int8-weights"  # Cascade Lake, Ice Lake
    assert auto({"avx512f", "avx512_vnni", "amx_int8"}) == "int8-weights"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # a VNNI CPU capped to stand in for an AVX2 one
    assert auto({"avx512f", "avx512_vnni", "avx_vnni"}) == "none"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2_vnni")  # keeps AVX-VNNI only
    assert auto({"avx512f", "avx512_vnni"}) == "none"
    assert auto({"avx512f", "avx512_vnni", "avx_vnni"}) == "int8-weights"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert auto({"avx512f", "avx512_vnni"}) == "int8-weights"


def test_engine_default_is_auto(tiny_checkpoint):
    import torch

    from sam2flow.engine.precision import native_bf16

    engine = Sam2Engine.from_pretrained(checkpoint=str(tiny_checkpoint), device="cpu")
    assert engine.dtype == (torch.bfloat16 if native_bf16(torch.device("cpu")) else torch.float32)
    assert next(engine.model.vision_encoder.parameters()).dtype == engine.dtype
    assert next(engine.model.mask_decoder.parameters()).dtype == torch.float32  # the reference's, kept
    assert engine.decoder_dtype == engine.dtype  # the fused decoder follows a bf16 encoder


def test_compiled_encoder_gives_the_same_masks(tiny_checkpoint, tiny_engine):
    """torch.compile (opt-in) is a fast path too: same masks as the plain float32 engine."""
    compiled = Sam2Engine.from_pretrained(checkpoint=str(tiny_checkpoint), device="cpu", dtype="float32", compile=True)
    assert compiled.compile_seconds is not None and compiled.compile_seconds > 0
    image = random_image(480, 640, seed=6)
    boxes = np.array([[0, 0, 64, 48], [100, 100, 500, 380], [300, 20, 620, 200]], np.float32)
    want = tiny_engine.predict(tiny_engine.embed([image], use_cache=False)[0], boxes=boxes)
    got = compiled.predict(compiled.embed([image], use_cache=False)[0], boxes=boxes)
    for a, b in zip(got.masks, want.masks):
        assert mask_iou(a, b) >= 0.99
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-3)


def test_one_model_object_never_serves_two_precisions(tiny_engine):
    """The engine converts its model in place, so a second engine asking the same object for
    another dtype is refused (it would silently change the first); a copy or the same dtype works."""
    import copy
    import gc

    import torch

    model = tiny_engine.model.__class__(tiny_engine.model.config)
    first = Sam2Engine(model, tiny_engine.spec, device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="already serves an engine on cpu with a torch.float32 encoder"):
        Sam2Engine(model, tiny_engine.spec, device="cpu", dtype="bfloat16")
    assert first.model.vision_encoder.neck.convs[0].weight.dtype == torch.float32

    same = Sam2Engine(model, tiny_engine.spec, device="cpu", dtype="float32")
    copied = Sam2Engine(copy.deepcopy(model), tiny_engine.spec, device="cpu", dtype="bfloat16")
    assert copied.model.vision_encoder.neck.convs[0].weight.dtype == torch.bfloat16
    assert first.model.vision_encoder.neck.convs[0].weight.dtype == torch.float32

    del first, same
    gc.collect()  # once no engine uses the object, it may be placed anew
    again = Sam2Engine(model, tiny_engine.spec, device="cpu", dtype="bfloat16")
    assert again.model.vision_encoder.neck.convs[0].weight.dtype == torch.bfloat16
