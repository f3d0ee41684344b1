"""Synthetic scenes and the fixture checkpoint (``sam2flow.testing``).

The loading tests do not need the trained weights: where ``fixture_weights.safetensors`` is not
there yet, a placeholder decoder (seeded, untrained) stands in, since only keys and shapes matter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam2flow.formats import mask_iou
from sam2flow.testing import fixture
from sam2flow.testing.scenes import KINDS, make_scene, mask_to_box

# ---- scenes -------------------------------------------------------------------------------------


def test_scene_is_deterministic_per_seed():
    a, b = make_scene(7), make_scene(7)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.masks, b.masks)
    assert np.array_equal(a.boxes, b.boxes)
    assert a.kinds == b.kinds
    c = make_scene(8)
    assert not np.array_equal(a.image, c.image)


def test_scene_fingerprint_is_stable():
    """The same numbers on every machine: a change here changes every cached feature and the fixture."""
    s = make_scene(0)
    assert s.image.shape == (512, 512, 3) and s.image.dtype == np.uint8
    assert (len(s), int(s.masks.sum()), int(s.image.astype(np.int64).sum() % 1_000_003)) == _FINGERPRINT_0


_FINGERPRINT_0 = (4, 38066, 77355)  # (objects, mask pixels, image sum mod 1,000,003) of make_scene(0)


@pytest.mark.parametrize("seed", range(12))
def test_masks_and_boxes_are_consistent(seed):
    s = make_scene(seed, size=(240, 320))
    h, w = 240, 320
    assert s.image.shape == (h, w, 3)
    assert s.masks.dtype == bool and s.masks.shape[1:] == (h, w)
    assert s.boxes.shape == (len(s), 4) and s.boxes.dtype == np.float32
    assert len(s.kinds) == len(s) and set(s.kinds) <= set(KINDS)
    assert 1 <= len(s) <= 6
    # visible masks never overlap, and none is tiny
    assert s.masks.sum(0).max() <= 1
    assert all(m.sum() >= max(64, int(0.002 * h * w)) for m in s.masks)
    for m, box in zip(s.masks, s.boxes):
        x0, y0, x1, y1 = box.astype(int)
        assert np.array_equal(box, mask_to_box(m))
        assert m[y0 : y1 + 1, x0 : x1 + 1].sum() == m.sum()  # the box holds the whole mask
        assert m[y0].any() and m[y1].any() and m[:, x0].any() and m[:, x1].any()  # and is tight


def test_mask_pixels_carry_their_shape_colour():
    """A mask pixel is painted by its own shape: its colour is close to the mask's median colour."""
    s = make_scene(3)
    for m in s.masks:
        pix = s.image[m].astype(np.float32)
        med = np.median(pix, axis=0)
        assert np.median(np.abs(pix - med).max(1)) < 25


def test_later_shapes_occlude_earlier_ones():
    """Painted back to front: a visible mask is its shape minus every later shape, and the image
    shows the topmost shape's colour."""
    occluded = 0
    for seed in range(20):
        s = make_scene(seed)
        assert len(s.shapes) >= len(s) and list(s.shape_index) == sorted(s.shape_index)
        for m, i in zip(s.masks, s.shape_index):
            later = s.shapes[i + 1 :].any(0) if i + 1 < len(s.shapes) else np.zeros_like(m)
            assert np.array_equal(m, s.shapes[i] & ~later)
            occluded += int((s.shapes[i] & later).any())
        # the last shape drawn is never occluded
        if s.shape_index[-1] == len(s.shapes) - 1:
            assert np.array_equal(s.masks[-1], s.shapes[-1])
    assert occluded > 0  # the seeds do exercise occlusion


def test_occlusion_drops_tiny_shapes():
    dropped = 0
    for seed in range(60):
        s = make_scene(seed)
        all_kept = make_scene(seed, min_area=1)
        assert np.array_equal(s.image, all_kept.image)  # dropping never changes the picture
        assert set(s.shape_index) <= set(all_kept.shape_index)
        dropped += len(s.shapes) - len(s)
        for i in set(range(len(s.shapes))) - set(s.shape_index):
            later = s.shapes[i + 1 :].any(0)
            assert (s.shapes[i] & ~later).sum() < max(64, int(0.002 * 512 * 512))
    assert dropped > 0


def test_scene_rejects_bad_arguments():
    with pytest.raises(ValueError):
        make_scene(0, size=(8, 8))
    with pytest.raises(ValueError):
        make_scene(0, num_shapes=(4, 3))


# ---- the seeded weights -------------------------------------------------------------------------


def test_encoder_regeneration_is_identical():
    a, b = fixture.encoder_state(), fixture.encoder_state()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("image_encoder.trunk.blocks.") for k in a)
    assert "memory_attention.layers.0.self_attn.q_proj.weight" in a
    other = fixture.encoder_state(seed=1)
    key = "image_encoder.trunk.patch_embed.proj.weight"
    assert not torch.equal(a[key], other[key])


def test_seeded_scheme_is_documented_numbers():
    """The scheme's first numbers, computed by hand from the documented recipe."""
    import math
    import zlib

    key = "image_encoder.trunk.patch_embed.proj.weight"
    seq = np.random.SeedSequence([fixture.FIXTURE_SEED, fixture.IMAGE_STREAM, zlib.crc32(key.encode())])
    raw = np.random.PCG64(seq).random_raw(4)
    u = np.array([(int(r) >> 40) / 2**24 for r in raw])
    bound = 1 / math.sqrt(3 * 7 * 7)
    want = (2 * u - 1) * bound
    got = fixture.image_path_state()[key].flatten()[:4].double().numpy()
    assert np.allclose(got, want, rtol=1e-6, atol=0)


def test_seeded_scheme_follows_pytorch_init_conventions():
    state = fixture.encoder_state()
    w = state["image_encoder.trunk.blocks.0.attn.qkv.weight"]  # fan-in 96
    assert w.abs().max() <= 1 / 96**0.5 and abs(w.std().item() - (1 / 96**0.5) / 3**0.5) < 2e-3
    assert torch.equal(state["image_encoder.trunk.blocks.0.norm1.weight"], torch.ones(96))
    assert torch.equal(state["image_encoder.trunk.blocks.0.norm1.bias"], torch.zeros(96))
    assert not state["image_encoder.trunk.pos_embed"].any()
    assert abs(state["no_mem_embed"].std().item() - 0.02) < 0.004


# ---- full checkpoints ---------------------------------------------------------------------------


def _trained() -> dict[str, torch.Tensor]:
    """The committed trained weights, or the seeded placeholder when they are not trained yet."""
    if fixture.WEIGHTS_FILE.is_file():
        return fixture.load_trained()
    return fixture.untrained_decoder_state()


def test_missing_trained_weights_raise_a_clear_error(tmp_path):
    with pytest.raises(fixture.FixtureError, match="train_fixture"):
        fixture.load_trained(tmp_path / "nothing.safetensors")


def test_wrong_trained_keys_are_refused():
    trained = fixture.untrained_decoder_state()
    trained.pop("sam_mask_decoder.iou_token.weight")
    with pytest.raises(fixture.FixtureError, match="missing 1 key"):
        fixture.full_state_dict(trained)


def test_committed_weights_are_small_float16_decoder_only():
    if not fixture.WEIGHTS_FILE.is_file():
        pytest.skip("fixture weights not trained yet")
    from safetensors.torch import load_file

    assert fixture.WEIGHTS_FILE.stat().st_size < 10 * 1024 * 1024
    raw = load_file(str(fixture.WEIGHTS_FILE))
    assert set(raw) == set(fixture.trainable_keys())
    assert all(v.dtype == torch.float16 for v in raw.values())


@pytest.mark.parametrize("family", ["sam2.1", "sam2"])
def test_full_checkpoint_loads_strictly_in_meta_model(family, tmp_path):
    pytest.importorskip("sam2")
    from sam2.build_sam import build_sam2

    spec = fixture.fixture_spec(family)
    path = fixture.write_checkpoint(tmp_path / spec.checkpoint_name, family, trained=_trained())
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    model = build_sam2(spec.meta_config, ckpt_path=None, device="cpu", mode="eval")
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state, strict=True)
    # Meta's own loader (strict, as it loads released files) accepts the file too
    build_sam2(spec.meta_config, ckpt_path=str(path), device="cpu", mode="eval")


@pytest.mark.parametrize("family", ["sam2.1", "sam2"])
def test_full_checkpoint_loads_through_our_loader(family, tmp_path):
    from sam2flow.models.convert import detect_spec
    from sam2flow.models.weights import load_model

    spec = fixture.fixture_spec(family)
    trained = _trained()
    path = fixture.write_checkpoint(tmp_path / spec.checkpoint_name, family, trained=trained)
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    assert detect_spec(state) == ("hiera_tiny", family)
    model, got = load_model("hiera_tiny", family, checkpoint=str(path))
    assert got == spec
    assert torch.equal(model.mask_decoder.iou_token.weight, trained["sam_mask_decoder.iou_token.weight"].float())
    assert torch.equal(
        model.vision_encoder.backbone.patch_embed.projection.weight,
        fixture.image_path_state()["image_encoder.trunk.patch_embed.proj.weight"],
    )


def test_hf_directory_round_trip(tmp_path):
    from sam2flow.models.weights import load_model

    trained = _trained()
    out = fixture.write_hf_directory(tmp_path / "sam2.1-hiera-tiny", "sam2.1", trained=trained)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    model, _ = load_model("hiera_tiny", "sam2.1", checkpoint=str(out))
    ref, _ = fixture.fixture_model("sam2.1", trained=trained)
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_fixture_model_segments_a_scene_end_to_end():
    """Shapes and types through the engine (real mask quality needs the trained weights)."""
    from sam2flow import Sam2Engine

    model, spec = fixture.fixture_model(trained=_trained())
    engine = Sam2Engine(model, spec, device="cpu", dtype="float32")
    s = make_scene(1, size=(256, 320))
    pred = engine.segment(s.image, boxes=s.boxes)
    assert pred.masks.shape == (len(s), 256, 320)
    if fixture.WEIGHTS_FILE.is_file():
        assert mask_iou(pred.masks, s.masks).mean() > 0.7
