"""The loader's contract: every key accounted for, clear errors, and where weights are found.

Checkpoints are the seeded random ones of ``conftest.make_checkpoint`` (original Meta layout);
Hugging Face directories are written here with ``save_pretrained``. Nothing reaches the network.
"""

from __future__ import annotations

import pickle
import re
import shutil
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sam2flow import FAMILIES, VERSIONS, CheckpointError, Sam2Engine, get_spec, load_model
from sam2flow.models.convert import convert_state_dict
from sam2flow.models.layout import original_layout, video_keys
from sam2flow.models.weights import WEIGHTS_DIR_ENV

from conftest import build_reference, random_image
from test_parity import assert_parity, reference_best

IMAGE = random_image(120, 160, seed=21)  # the same image as tests/test_inputs.py: one embedding
BOXES = np.array([[10, 12, 110, 100], [60, 30, 150, 118]], np.float32)
POINTS = np.array([[[40, 50], [120, 90]], [[100, 60], [20, 20]]], np.float32)
LABELS = np.array([[1, 0], [1, 1]])

# Meta's video-memory weights, which image segmentation never uses.
VIDEO_PREFIXES = {
    "sam2": (
        "memory_attention.",
        "memory_encoder.",
        "maskmem_tpos_enc",
        "no_mem_pos_enc",
        "no_obj_ptr",
        "mask_downsample.",
        "obj_ptr_proj.",
    ),
}
VIDEO_PREFIXES["sam2.1"] = VIDEO_PREFIXES["sam2"] + ("no_obj_embed_spatial", "obj_ptr_tpos_proj.")


def _is_video(key: str, family: str) -> bool:
    return key.startswith(VIDEO_PREFIXES[family])


@pytest.fixture(scope="module")
def tiny_state(tiny_checkpoint):
    return torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)["model"]


def _save(path, state):
    torch.save({"model": state}, path)
    return path


def _empty_model_keys(spec):
    from transformers import Sam2Model

    with torch.device("meta"):
        return set(Sam2Model(spec.hf_config()).state_dict())


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---- unreadable or hostile files ------------------------------------------------------------


@pytest.mark.parametrize("cut", ["half", "header", "text"])
def test_truncated_or_foreign_file(tiny_checkpoint, tmp_path, cut):
    data = tiny_checkpoint.read_bytes()
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    path.write_bytes({"half": data[: len(data) // 2], "header": data[:1024], "text": b"not a checkpoint\n"}[cut])
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as info:
        load_model("hiera_tiny", checkpoint=path)
    assert isinstance(info.value, ValueError)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.pt"
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*does not exist"):
        load_model("hiera_tiny", checkpoint=path)


class _WritesAFile:
    """Unpickling this calls ``open(marker, "w")``: code execution with a visible trace."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_not_executed(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"model": {"image_encoder.trunk.pos_embed": torch.zeros(1), "x": _WritesAFile(marker)}}
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_model("hiera_tiny", checkpoint=path)
    assert not marker.exists(), "loading a checkpoint ran pickled code"

    # The payload is real: an unrestricted load does run it.
    if writer == "torch.save":
        obj = torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as f:
            obj = pickle.load(f)
    obj["model"]["x"].close()
    assert marker.exists()


@pytest.mark.parametrize(
    "obj",
    [
        [torch.zeros(3)],
        torch.zeros(3),
        {},
        {"model": {}},
        {"model": [torch.zeros(3)]},
        {"model": {"a": 1, "b": "two"}},
        {"a": 1.0, "b": [1, 2]},
        {"model": {"image_encoder.trunk.pos_embed": torch.zeros(1), "epoch": 3}},
    ],
    ids=["list", "tensor", "empty", "empty-model", "model-list", "model-non-tensors", "non-tensors", "mixed"],
)
def test_not_a_state_dict(tmp_path, obj):
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*state dict"):
        load_model("hiera_tiny", checkpoint=path)


# ---- the wrong model ------------------------------------------------------------------------


@pytest.mark.parametrize("have, want", [("hiera_small", "hiera_tiny"), ("hiera_tiny", "hiera_small")])
def test_wrong_version(make_checkpoint, have, want):
    path = make_checkpoint(have, "sam2.1")
    with pytest.raises(CheckpointError, match=f"sam2.1/{have}.*sam2.1/{want}"):
        load_model(want, "sam2.1", checkpoint=path)


@pytest.mark.parametrize("have, want", [("sam2.1", "sam2"), ("sam2", "sam2.1")])
def test_wrong_family(make_checkpoint, have, want):
    path = make_checkpoint("hiera_tiny", have)
    with pytest.raises(CheckpointError, match=re.escape(f"{have}/hiera_tiny") + ".*" + re.escape(f"{want}/hiera_tiny")):
        load_model("hiera_tiny", want, checkpoint=path)


# ---- every key accounted for ----------------------------------------------------------------


@pytest.mark.parametrize(
    "key, named",
    [
        ("sam_mask_decoder.extra_head.weight", "sam_mask_decoder.extra_head.weight"),
        ("no_obj_ptr_extra", "no_obj_ptr_extra"),  # near a dropped name: the list is exact
        ("memory_bank.0.weight", "memory_bank.0.weight"),  # video-like, but not on the list
        ("image_encoder.trunk.blocks.12.norm1.weight", "blocks.12.layer_norm1.weight"),  # tiny has 12 blocks
    ],
)
def test_unknown_key_is_an_error(tiny_state, tmp_path, key, named):
    state = dict(tiny_state)
    state[key] = torch.zeros(4)
    path = _save(tmp_path / "extra.pt", state)
    with pytest.raises(CheckpointError, match=re.escape(named)):
        load_model("hiera_tiny", checkpoint=path)


def test_video_key_of_the_other_family_is_unknown(make_checkpoint, tmp_path):
    """``obj_ptr_tpos_proj`` exists in sam2.1 only: in a sam2 checkpoint it is not silently dropped
    (it marks the file as sam2.1, so the error is the family mismatch)."""
    state = dict(torch.load(make_checkpoint("hiera_tiny", "sam2"), weights_only=True)["model"])
    state["obj_ptr_tpos_proj.weight"] = torch.zeros(64, 256)
    path = _save(tmp_path / "sam2_hiera_tiny.pt", state)
    with pytest.raises(CheckpointError, match=r"checkpoint is sam2\.1/hiera_tiny, not the requested sam2/hiera_tiny"):
        load_model("hiera_tiny", "sam2", checkpoint=path)


@pytest.mark.parametrize(
    "key, named",
    [
        ("sam_mask_decoder.iou_token.weight", "mask_decoder.iou_token.weight"),
        ("image_encoder.trunk.blocks.3.attn.qkv.weight", "backbone.blocks.3.attn.qkv.weight"),
        ("sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "positional_embedding"),
        ("no_mem_embed", "no_memory_embedding"),
        ("sam_prompt_encoder.point_embeddings.1.weight", "point embeddings are incomplete"),
        ("sam_prompt_encoder.point_embeddings.3.weight", "point_embed.weight"),
    ],
)
def test_missing_key_is_an_error(tiny_state, tmp_path, key, named):
    state = dict(tiny_state)
    del state[key]
    path = _save(tmp_path / "missing.pt", state)
    with pytest.raises(CheckpointError, match=re.escape(named)):
        load_model("hiera_tiny", checkpoint=path)


@pytest.mark.parametrize(
    "key, shape",
    [("sam_mask_decoder.iou_token.weight", (2, 256)), ("image_encoder.neck.convs.0.conv.weight", (256, 384, 1, 2))],
)
def test_wrong_shape_is_an_error(tiny_state, tmp_path, key, shape):
    state = dict(tiny_state)
    state[key] = torch.zeros(shape)
    path = _save(tmp_path / "shape.pt", state)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model("hiera_tiny", checkpoint=path)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "version", [v if v == "hiera_tiny" else pytest.param(v, marks=pytest.mark.large) for v in VERSIONS]
)
def test_layout_is_the_release_files_layout(version, family):
    """``models/layout.py`` (used by the converter and the fixture) lists exactly the keys and shapes
    of Meta's model, so of its release files."""
    spec = get_spec(version, family)
    want = {k: tuple(v.shape) for k, v in build_reference(spec).state_dict().items()}
    got = {key: shape for key, shape, _ in original_layout(spec)}
    assert len(got) == len(original_layout(spec))  # no key twice
    assert got == want
    assert video_keys(family) == {k for k in want if _is_video(k, family)}


@pytest.mark.parametrize("family", FAMILIES)
def test_video_weights_are_dropped_by_the_list(make_checkpoint, family):
    spec = get_spec("hiera_tiny", family)
    state = torch.load(make_checkpoint("hiera_tiny", family), weights_only=True)["model"]
    video = [k for k in state if _is_video(k, family)]
    # Every listed kind of video weight is really in Meta's checkpoint: the test is not vacuous.
    for prefix in VIDEO_PREFIXES[family]:
        assert any(k.startswith(prefix) for k in video), prefix
    converted = convert_state_dict(state, spec)
    assert set(converted) == _empty_model_keys(spec)
    # Dropped, not used: poisoning every video weight changes nothing that is loaded.
    poisoned = convert_state_dict(
        {k: torch.full_like(v, float("nan")) if k in video else v for k, v in state.items()}, spec
    )
    assert set(poisoned) == set(converted)
    assert all(torch.equal(poisoned[k], converted[k]) for k in converted)
    assert not [k for k in converted if "memory" in k and k != "no_memory_embedding"]
    # ... and the strict load agrees.
    model, got = load_model("hiera_tiny", family, checkpoint=make_checkpoint("hiera_tiny", family))
    assert got == spec
    assert not [n for n, t in model.state_dict().items() if t.device.type != "cpu"]


def test_converted_model_matches_reference(tiny_engine):
    """After dropping the video weights, masks equal Meta's predictor on the same checkpoint."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(build_reference(get_spec("hiera_tiny", "sam2.1")))
    predictor.set_image(IMAGE)
    emb = tiny_engine.embed([IMAGE])[0]
    ours = tiny_engine.predict(emb, boxes=BOXES[:1])
    assert 0 < ours.masks.sum() < ours.masks.size
    assert_parity(ours, reference_best(predictor, box=BOXES[0]))


# ---- Hugging Face directories ---------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tiny_checkpoint, tmp_path_factory):
    model, _ = load_model("hiera_tiny", checkpoint=tiny_checkpoint)
    path = tmp_path_factory.mktemp("hf") / "sam2.1-hiera-tiny"
    model.save_pretrained(path)
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    return path


def test_hf_directory_equals_original(hf_dir, tiny_engine):
    engine = Sam2Engine.from_pretrained("hiera_tiny", checkpoint=str(hf_dir), device="cpu", dtype="float32")
    _same_weights(engine.model, tiny_engine.model)
    a = engine.predict(engine.embed([IMAGE])[0], boxes=BOXES, points=POINTS, point_labels=LABELS)
    b = tiny_engine.predict(tiny_engine.embed([IMAGE])[0], boxes=BOXES, points=POINTS, point_labels=LABELS)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.low_res_logits, b.low_res_logits)


def test_hf_directory_of_the_wrong_size(hf_dir):
    with pytest.raises(CheckpointError, match=r"different SAM2 size.*sam2\.1/hiera_small"):
        load_model("hiera_small", checkpoint=hf_dir)


def _hf_copy(hf_dir, dst, edit):
    dst.mkdir()
    shutil.copy(hf_dir / "config.json", dst / "config.json")
    state = load_file(hf_dir / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda s: s.pop("mask_decoder.iou_token.weight"), r"missing.*mask_decoder\.iou_token\.weight"),
        (lambda s: s.update({"foo.bar": torch.zeros(3)}), r"unexpected.*foo\.bar"),
        (lambda s: s.update({"mask_decoder.iou_token.weight": torch.zeros(2, 256)}), r"iou_token|mismatch"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_hf_directory_keys_are_checked(hf_dir, tmp_path, edit, named):
    path = _hf_copy(hf_dir, tmp_path / "hf", edit)
    with pytest.raises(CheckpointError, match=named):
        load_model("hiera_tiny", checkpoint=path)


def test_hf_directory_with_video_weights_loads(hf_dir, tmp_path, tiny_engine):
    """Hub repositories also hold the video model's weights; Sam2Model's own list drops them."""
    path = _hf_copy(
        hf_dir,
        tmp_path / "hf",
        lambda s: s.update(
            {
                "memory_attention.layers.0.self_attn.q_proj.weight": torch.zeros(256, 256),
                "memory_encoder.projection.bias": torch.zeros(64),
            }
        ),
    )
    model, _ = load_model("hiera_tiny", checkpoint=path)
    _same_weights(model, tiny_engine.model)


def test_hf_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path))):
        load_model("hiera_tiny", checkpoint=tmp_path)


# ---- where weights are found ----------------------------------------------------------------


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache, offline for huggingface_hub (which reads its env at import)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HOME", str(cache.parent))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    # Should anything still try the network, it gets a refused connection, not a hang.
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    return cache


def test_weights_dir_original_file(offline_hub, tmp_path, monkeypatch, tiny_checkpoint, tiny_engine):
    root = tmp_path / "weights"
    root.mkdir()
    (root / "sam2.1_hiera_tiny.pt").symlink_to(tiny_checkpoint)
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(root))
    model, spec = load_model("hiera_tiny")
    assert spec == get_spec("hiera_tiny", "sam2.1")
    _same_weights(model, tiny_engine.model)


def test_weights_dir_hf_directory(offline_hub, tmp_path, monkeypatch, hf_dir, tiny_engine):
    root = tmp_path / "weights"
    root.mkdir()
    (root / "sam2.1-hiera-tiny").symlink_to(hf_dir, target_is_directory=True)
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(root))
    model, _ = load_model("hiera_tiny")
    _same_weights(model, tiny_engine.model)


def _fake_hub_cache(cache, hf_dir, scale):
    """The Hub cache layout for facebook/sam2.1-hiera-tiny, with one weight scaled to tell it apart."""
    repo = cache / "models--facebook--sam2.1-hiera-tiny"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    shutil.copy(hf_dir / "config.json", snap / "config.json")
    state = load_file(hf_dir / "model.safetensors")
    state["mask_decoder.iou_token.weight"] = state["mask_decoder.iou_token.weight"] * scale
    save_file(state, snap / "model.safetensors", metadata={"format": "pt"})
    return state["mask_decoder.iou_token.weight"]


def test_hf_cache_then_weights_dir_first(offline_hub, tmp_path, monkeypatch, hf_dir, tiny_checkpoint, tiny_engine):
    cached = _fake_hub_cache(offline_hub, hf_dir, scale=2.0)
    original = tiny_engine.model.mask_decoder.iou_token.weight
    # No weights dir: the Hugging Face cache is used.
    model, _ = load_model("hiera_tiny")
    assert torch.equal(model.mask_decoder.iou_token.weight, cached)
    # A weights dir that holds the file wins over the cache.
    root = tmp_path / "weights"
    root.mkdir()
    (root / "sam2.1_hiera_tiny.pt").symlink_to(tiny_checkpoint)
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(root))
    model, _ = load_model("hiera_tiny")
    assert torch.equal(model.mask_decoder.iou_token.weight, original)
    assert not torch.equal(original, cached)


def _assert_not_found_message(err):
    msg = str(err)
    for needed in ("sam2.1_hiera_tiny.pt", "SAM2FLOW_WEIGHTS_DIR", "--checkpoint"):
        assert needed in msg, (needed, msg)


@pytest.mark.parametrize("other", [None, "sam2_hiera_tiny.pt"], ids=["empty", "other-family-only"])
def test_offline_and_nowhere(offline_hub, tmp_path, monkeypatch, make_checkpoint, other):
    root = tmp_path / "weights"
    root.mkdir()
    if other:  # the sam2 file does not stand in for the requested sam2.1 one
        (root / other).symlink_to(make_checkpoint("hiera_tiny", "sam2"))
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(root))
    start = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        load_model("hiera_tiny")
    assert time.monotonic() - start < 10
    _assert_not_found_message(info.value)


def test_download_fails_fast_offline(offline_hub, monkeypatch):
    """With our own offline check out of the way, the real download path is tried and fails fast."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="download failed") as info:
        load_model("hiera_tiny")
    assert time.monotonic() - start < 30
    _assert_not_found_message(info.value)


def test_download_is_skipped_when_offline_or_disabled(offline_hub, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(CheckpointError):
        load_model("hiera_tiny")  # HF_HUB_OFFLINE=1
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(CheckpointError):
        load_model("hiera_tiny", download=False)
    assert calls == []
    with pytest.raises(CheckpointError, match="network unreachable") as info:
        load_model("hiera_tiny")
    assert calls and calls[0][0] == "facebook/sam2.1-hiera-tiny"
    _assert_not_found_message(info.value)


# ---- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: get_spec("hiera_huge"),
        lambda: load_model("hiera_huge"),
        lambda: Sam2Engine.from_pretrained("tiny"),
    ],
)
def test_unknown_version(call):
    with pytest.raises(ValueError, match="unknown SAM2 version") as info:
        call()
    assert all(v in str(info.value) for v in VERSIONS)


@pytest.mark.parametrize(
    "call",
    [
        lambda: get_spec("hiera_tiny", "sam3"),
        lambda: load_model("hiera_tiny", "sam2.2"),
        lambda: Sam2Engine.from_pretrained("hiera_tiny", "SAM2.1"),
    ],
)
def test_unknown_family(call):
    with pytest.raises(ValueError, match="unknown SAM2 family") as info:
        call()
    assert all(f in str(info.value) for f in FAMILIES)
