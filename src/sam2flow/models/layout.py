"""Meta's original SAM2 checkpoint layout: every key of a release file, with its shape.

A release file (``sam2.1_hiera_tiny.pt``, ...) is ``{"model": state_dict}`` of Meta's ``SAM2Base``
(``sam2/modeling/sam2_base.py`` and the modules it builds from ``sam2/configs/*/*.yaml``). Its keys
fall in three parts:

- the image path (``image_layout(spec)``): the Hiera trunk and FPN neck (``image_encoder.*``), which
  depend on the version, plus ``no_mem_embed`` and the decoder's ``conv_s0``/``conv_s1``;
- the prompt encoder and mask decoder (``decoder_layout()``), the same for every version;
- the video-memory weights (``video_layout(family)``), the same for every version; SAM 2.1 added
  ``no_obj_embed_spatial`` and ``obj_ptr_tpos_proj``. Images never use them.

``models/convert.py`` uses this to account for the video-memory keys and to tell the family
apart; ``testing/fixture.py`` generates every tensor of it. Each entry also says how Meta's model
initialises the tensor (PyTorch's defaults for ``Linear``/``Conv``/``LayerNorm``/``Embedding``,
SAM2's explicit ``trunc_normal(std=0.02)``, zero positional embeddings, the memory fuser's 1e-6
layer scale), which the fixture imitates.
"""

from __future__ import annotations

import itertools

from .registry import FAMILIES, ModelSpec

_D = 256  # transformer width of the prompt encoder, mask decoder and memory attention
_MEM = 64  # memory channels

# A layout entry: (key, shape, init) with init one of "uniform" (a Linear/Conv weight: PyTorch's
# kaiming_uniform(a=sqrt(5))), "bias:<weight key>" (its bias), "ones", "zeros", ("std", s) (drawn
# with standard deviation s), ("const", v).
Entry = tuple[str, tuple[int, ...], object]


def _linear(out: list[Entry], name: str, n_out: int, n_in: int, kernel: tuple[int, ...] = ()) -> None:
    out.append((f"{name}.weight", (n_out, n_in, *kernel), "uniform"))
    out.append((f"{name}.bias", (n_out,), f"bias:{name}.weight"))


def _norm(out: list[Entry], name: str, n: int) -> None:
    out.append((f"{name}.weight", (n,), "ones"))
    out.append((f"{name}.bias", (n,), "zeros"))


def _mlp(out: list[Entry], name: str, dims: list[int]) -> None:
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        _linear(out, f"{name}.layers.{i}", b, a)


def _attention(out: list[Entry], name: str, d: int, internal: int, kv_in: int | None = None) -> None:
    _linear(out, f"{name}.q_proj", internal, d)
    _linear(out, f"{name}.k_proj", internal, kv_in or d)
    _linear(out, f"{name}.v_proj", internal, kv_in or d)
    _linear(out, f"{name}.out_proj", d, internal)


def image_layout(spec: ModelSpec) -> list[Entry]:
    """The frozen image path: ``image_encoder.*``, ``no_mem_embed``, decoder ``conv_s0``/``conv_s1``."""
    a = spec.arch
    out: list[Entry] = []
    t = "image_encoder.trunk"
    out.append((f"{t}.pos_embed", (1, a.embed_dim, *a.window_pos_embed_bkg), "zeros"))
    out.append((f"{t}.pos_embed_window", (1, a.embed_dim, a.window_spec[0], a.window_spec[0]), "zeros"))
    _linear(out, f"{t}.patch_embed.proj", a.embed_dim, 3, (7, 7))
    dim, block = a.embed_dim, 0
    for stage, depth in enumerate(a.stages):
        dim_out = a.embed_dim * 2**stage
        for _ in range(depth):
            b = f"{t}.blocks.{block}"
            _norm(out, f"{b}.norm1", dim)
            _linear(out, f"{b}.attn.qkv", 3 * dim_out, dim)
            _linear(out, f"{b}.attn.proj", dim_out, dim_out)
            _norm(out, f"{b}.norm2", dim_out)
            _linear(out, f"{b}.mlp.layers.0", 4 * dim_out, dim_out)
            _linear(out, f"{b}.mlp.layers.1", dim_out, 4 * dim_out)
            if dim != dim_out:
                _linear(out, f"{b}.proj", dim_out, dim)
            dim, block = dim_out, block + 1
    for i, ch in enumerate(a.channel_list):
        _linear(out, f"image_encoder.neck.convs.{i}.conv", _D, ch, (1, 1))
    out.append(("no_mem_embed", (1, 1, _D), ("std", 0.02)))
    _linear(out, "sam_mask_decoder.conv_s0", _D // 8, _D, (1, 1))
    _linear(out, "sam_mask_decoder.conv_s1", _D // 4, _D, (1, 1))
    return out


def decoder_layout() -> list[Entry]:
    """The trained part: ``sam_prompt_encoder.*`` and ``sam_mask_decoder.*`` (less ``conv_s0/s1``)."""
    out: list[Entry] = []
    p = "sam_prompt_encoder"
    out.append((f"{p}.pe_layer.positional_encoding_gaussian_matrix", (2, _D // 2), ("std", 1.0)))
    for i in range(4):
        out.append((f"{p}.point_embeddings.{i}.weight", (1, _D), ("std", 1.0)))
    out.append((f"{p}.not_a_point_embed.weight", (1, _D), ("std", 1.0)))
    _linear(out, f"{p}.mask_downscaling.0", 4, 1, (2, 2))
    _norm(out, f"{p}.mask_downscaling.1", 4)
    _linear(out, f"{p}.mask_downscaling.3", 16, 4, (2, 2))
    _norm(out, f"{p}.mask_downscaling.4", 16)
    _linear(out, f"{p}.mask_downscaling.6", _D, 16, (1, 1))
    out.append((f"{p}.no_mask_embed.weight", (1, _D), ("std", 1.0)))
    m = "sam_mask_decoder"
    tr = f"{m}.transformer"
    for i in range(2):
        layer = f"{tr}.layers.{i}"
        _attention(out, f"{layer}.self_attn", _D, _D)
        _norm(out, f"{layer}.norm1", _D)
        _attention(out, f"{layer}.cross_attn_token_to_image", _D, _D // 2)
        _norm(out, f"{layer}.norm2", _D)
        _linear(out, f"{layer}.mlp.layers.0", 2048, _D)
        _linear(out, f"{layer}.mlp.layers.1", _D, 2048)
        _norm(out, f"{layer}.norm3", _D)
        _norm(out, f"{layer}.norm4", _D)
        _attention(out, f"{layer}.cross_attn_image_to_token", _D, _D // 2)
    _attention(out, f"{tr}.final_attn_token_to_image", _D, _D // 2)
    _norm(out, f"{tr}.norm_final_attn", _D)
    out.append((f"{m}.iou_token.weight", (1, _D), ("std", 1.0)))
    out.append((f"{m}.mask_tokens.weight", (4, _D), ("std", 1.0)))
    out.append((f"{m}.obj_score_token.weight", (1, _D), ("std", 1.0)))
    # ConvTranspose2d weights are (in, out, k, k); PyTorch's fan-in is shape[1] * k * k.
    out.append((f"{m}.output_upscaling.0.weight", (_D, _D // 4, 2, 2), "uniform"))
    out.append((f"{m}.output_upscaling.0.bias", (_D // 4,), f"bias:{m}.output_upscaling.0.weight"))
    _norm(out, f"{m}.output_upscaling.1", _D // 4)
    out.append((f"{m}.output_upscaling.3.weight", (_D // 4, _D // 8, 2, 2), "uniform"))
    out.append((f"{m}.output_upscaling.3.bias", (_D // 8,), f"bias:{m}.output_upscaling.3.weight"))
    for i in range(4):
        _mlp(out, f"{m}.output_hypernetworks_mlps.{i}", [_D, _D, _D, _D // 8])
    _mlp(out, f"{m}.iou_prediction_head", [_D, _D, _D, 4])
    _mlp(out, f"{m}.pred_obj_score_head", [_D, _D, _D, 1])
    return out


def video_layout(family: str) -> list[Entry]:
    """The video-memory weights of ``family`` (never used on single images)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown SAM2 family {family!r}: expected one of {', '.join(FAMILIES)}")
    out: list[Entry] = [
        ("maskmem_tpos_enc", (7, 1, 1, _MEM), ("std", 0.02)),
        ("no_mem_pos_enc", (1, 1, _D), ("std", 0.02)),
        ("no_obj_ptr", (1, _D), ("std", 0.02)),
    ]
    if family == "sam2.1":
        out.append(("no_obj_embed_spatial", (1, _MEM), ("std", 0.02)))
    _linear(out, "mask_downsample", 1, 1, (4, 4))
    for i in range(4):
        layer = f"memory_attention.layers.{i}"
        _attention(out, f"{layer}.self_attn", _D, _D)
        _attention(out, f"{layer}.cross_attn_image", _D, _D, kv_in=_MEM)
        _linear(out, f"{layer}.linear1", 2048, _D)
        _linear(out, f"{layer}.linear2", _D, 2048)
        for n in (1, 2, 3):
            _norm(out, f"{layer}.norm{n}", _D)
    _norm(out, "memory_attention.norm", _D)
    e = "memory_encoder"
    chans = [1, 4, 16, 64, _D]
    for j in range(4):
        _linear(out, f"{e}.mask_downsampler.encoder.{3 * j}", chans[j + 1], chans[j], (3, 3))
        _norm(out, f"{e}.mask_downsampler.encoder.{3 * j + 1}", chans[j + 1])
    _linear(out, f"{e}.mask_downsampler.encoder.12", _D, _D, (1, 1))
    _linear(out, f"{e}.pix_feat_proj", _D, _D, (1, 1))
    for i in range(2):
        f = f"{e}.fuser.layers.{i}"
        out.append((f"{f}.gamma", (_D,), ("const", 1e-6)))
        _linear(out, f"{f}.dwconv", _D, 1, (7, 7))
        _norm(out, f"{f}.norm", _D)
        _linear(out, f"{f}.pwconv1", 4 * _D, _D)
        _linear(out, f"{f}.pwconv2", _D, 4 * _D)
    _linear(out, f"{e}.out_proj", _MEM, _D, (1, 1))
    _mlp(out, "obj_ptr_proj", [_D, _D, _D, _D])
    if family == "sam2.1":
        _linear(out, "obj_ptr_tpos_proj", _MEM, _D)
    return out


def original_layout(spec: ModelSpec) -> list[Entry]:
    """Every entry of the release file of ``spec`` (its version and family)."""
    return image_layout(spec) + decoder_layout() + video_layout(spec.family)


def video_keys(family: str) -> frozenset[str]:
    """The keys of the video-memory weights of ``family``."""
    return frozenset(key for key, _, _ in video_layout(family))
