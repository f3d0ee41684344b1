"""Original Meta checkpoint keys → ``transformers.Sam2Model`` keys.

Every key of an original state dict is accounted for: it is renamed by exactly one rule, merged
(the four point embeddings), or dropped because it belongs to the video-memory path that image
segmentation never runs (the exact keys of each family, from ``models/layout.py``). Anything else
is an error, and so is any ``Sam2Model`` key left without a value.
"""

from __future__ import annotations

import re

import torch

from .layout import video_keys
from .registry import FAMILIES, VERSIONS, ModelSpec, get_spec

_HEADS = r"(output_hypernetworks_mlps\.\d|iou_prediction_head|pred_obj_score_head)"  # the decoder's MLP heads

# (pattern, replacement), tried in order; the first full match wins.
_RENAMES: list[tuple[re.Pattern, str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"no_mem_embed", "no_memory_embedding"),
        # Hiera trunk
        (
            r"image_encoder\.trunk\.patch_embed\.proj\.(weight|bias)",
            r"vision_encoder.backbone.patch_embed.projection.\1",
        ),
        (r"image_encoder\.trunk\.(pos_embed|pos_embed_window)", r"vision_encoder.backbone.\1"),
        (
            r"image_encoder\.trunk\.blocks\.(\d+)\.norm(1|2)\.(weight|bias)",
            r"vision_encoder.backbone.blocks.\1.layer_norm\2.\3",
        ),
        (
            r"image_encoder\.trunk\.blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)",
            r"vision_encoder.backbone.blocks.\1.attn.\2.\3",
        ),
        (
            r"image_encoder\.trunk\.blocks\.(\d+)\.mlp\.layers\.0\.(weight|bias)",
            r"vision_encoder.backbone.blocks.\1.mlp.proj_in.\2",
        ),
        (
            r"image_encoder\.trunk\.blocks\.(\d+)\.mlp\.layers\.1\.(weight|bias)",
            r"vision_encoder.backbone.blocks.\1.mlp.proj_out.\2",
        ),
        (r"image_encoder\.trunk\.blocks\.(\d+)\.proj\.(weight|bias)", r"vision_encoder.backbone.blocks.\1.proj.\2"),
        # FPN neck
        (r"image_encoder\.neck\.convs\.(\d)\.conv\.(weight|bias)", r"vision_encoder.neck.convs.\1.\2"),
        # prompt encoder (point_embeddings.N are merged separately)
        (r"sam_prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder.\1.weight"),
        (r"sam_prompt_encoder\.mask_downscaling\.0\.(weight|bias)", r"prompt_encoder.mask_embed.conv1.\1"),
        (r"sam_prompt_encoder\.mask_downscaling\.1\.(weight|bias)", r"prompt_encoder.mask_embed.layer_norm1.\1"),
        (r"sam_prompt_encoder\.mask_downscaling\.3\.(weight|bias)", r"prompt_encoder.mask_embed.conv2.\1"),
        (r"sam_prompt_encoder\.mask_downscaling\.4\.(weight|bias)", r"prompt_encoder.mask_embed.layer_norm2.\1"),
        (r"sam_prompt_encoder\.mask_downscaling\.6\.(weight|bias)", r"prompt_encoder.mask_embed.conv3.\1"),
        # mask decoder: two-way transformer
        (r"sam_mask_decoder\.transformer\.(.+)\.out_proj\.(weight|bias)", r"mask_decoder.transformer.\1.o_proj.\2"),
        (
            r"sam_mask_decoder\.transformer\.(.+)\.(q|k|v)_proj\.(weight|bias)",
            r"mask_decoder.transformer.\1.\2_proj.\3",
        ),
        (
            r"sam_mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.(weight|bias)",
            r"mask_decoder.transformer.layers.\1.layer_norm\2.\3",
        ),
        (
            r"sam_mask_decoder\.transformer\.layers\.(\d+)\.mlp\.layers\.0\.(weight|bias)",
            r"mask_decoder.transformer.layers.\1.mlp.proj_in.\2",
        ),
        (
            r"sam_mask_decoder\.transformer\.layers\.(\d+)\.mlp\.layers\.1\.(weight|bias)",
            r"mask_decoder.transformer.layers.\1.mlp.proj_out.\2",
        ),
        (
            r"sam_mask_decoder\.transformer\.norm_final_attn\.(weight|bias)",
            r"mask_decoder.transformer.layer_norm_final_attn.\1",
        ),
        # mask decoder: heads (three-layer MLPs: proj_in, layers.0, proj_out)
        (rf"sam_mask_decoder\.{_HEADS}\.layers\.0\.(weight|bias)", r"mask_decoder.\1.proj_in.\2"),
        (rf"sam_mask_decoder\.{_HEADS}\.layers\.1\.(weight|bias)", r"mask_decoder.\1.layers.0.\2"),
        (rf"sam_mask_decoder\.{_HEADS}\.layers\.2\.(weight|bias)", r"mask_decoder.\1.proj_out.\2"),
        (r"sam_mask_decoder\.output_upscaling\.0\.(weight|bias)", r"mask_decoder.upscale_conv1.\1"),
        (r"sam_mask_decoder\.output_upscaling\.1\.(weight|bias)", r"mask_decoder.upscale_layer_norm.\1"),
        (r"sam_mask_decoder\.output_upscaling\.3\.(weight|bias)", r"mask_decoder.upscale_conv2.\1"),
        (r"sam_mask_decoder\.(conv_s0|conv_s1)\.(weight|bias)", r"mask_decoder.\1.\2"),
        (r"sam_mask_decoder\.(iou_token|mask_tokens|obj_score_token)\.weight", r"mask_decoder.\1.weight"),
    ]
]

_POSITIONAL = "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
_POINT_EMBED = re.compile(r"sam_prompt_encoder\.point_embeddings\.(\d)\.weight")

# Video-memory weights: present in the original checkpoints, never used on single images. SAM 2.1
# added two, which tell the families apart.
_VIDEO_ONLY = {family: video_keys(family) for family in FAMILIES}
_SAM2_1_ONLY = _VIDEO_ONLY["sam2.1"] - _VIDEO_ONLY["sam2"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be turned into the requested model."""


def detect_spec(state_dict: dict[str, torch.Tensor]) -> tuple[str | None, str | None]:
    """(version, family) of an original state dict; None for what cannot be told.

    The version follows from the trunk's depth and width; the family only from video-memory keys
    (2.1 added ``no_obj_embed_spatial`` and ``obj_ptr_tpos_proj``; see ``models/layout.py``).
    """
    if not _SAM2_1_ONLY.isdisjoint(state_dict):
        family = "sam2.1"
    elif not _VIDEO_ONLY["sam2"].isdisjoint(state_dict):
        family = "sam2"
    else:
        family = None
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", k))}
    patch = state_dict.get("image_encoder.trunk.patch_embed.proj.weight")
    version = None
    if patch is not None and blocks:
        for v in VERSIONS:
            arch = get_spec(v).arch
            if arch.num_blocks == max(blocks) + 1 and arch.embed_dim == patch.shape[0]:
                version = v
    return version, family


def convert_state_dict(state_dict: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Rename an original SAM2 state dict to ``Sam2Model`` keys for ``spec``.

    Raises ``CheckpointError`` naming the unknown keys, or the checkpoint's own version and family
    when they differ from ``spec``. Shapes are checked when the result is loaded into the model.
    """
    version, family = detect_spec(state_dict)
    if (version or spec.version) != spec.version or (family or spec.family) != spec.family:
        found = f"{family or spec.family}/{version or spec.version}"
        raise CheckpointError(
            f"checkpoint is {found}, not the requested {spec.name}: pass the matching version and family "
            f"(version={version or spec.version!r}, family={family or spec.family!r}) or use the matching file"
        )
    video = _VIDEO_ONLY[spec.family]
    out: dict[str, torch.Tensor] = {}
    points: dict[int, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key == _POSITIONAL:
            out["prompt_encoder.shared_embedding.positional_embedding"] = value
            # A copy, not the same tensor: Sam2Model keeps two independent buffers, and shared
            # storage makes ``save_pretrained`` refuse the model (untied shared tensors).
            out["shared_image_embedding.positional_embedding"] = value.clone()
        elif m := _POINT_EMBED.fullmatch(key):
            points[int(m.group(1))] = value
        elif key in video:
            continue
        else:
            for pattern, replacement in _RENAMES:
                if pattern.fullmatch(key):
                    out[pattern.sub(replacement, key)] = value
                    break
            else:
                unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} unknown key(s) in a {spec.name} checkpoint: {', '.join(sorted(unknown)[:8])}"
            + (" ..." if len(unknown) > 8 else "")
        )
    if points:
        if sorted(points) != list(range(len(points))):
            raise CheckpointError(f"point embeddings are incomplete: found indices {sorted(points)}")
        out["prompt_encoder.point_embed.weight"] = torch.cat([points[i] for i in sorted(points)], dim=0)
    return out


def key_problems(expected: dict[str, tuple], got: dict[str, torch.Tensor], show: int = 6) -> list[str]:
    """What keeps ``got`` from matching the key → shape map ``expected``: missing, unexpected, mis-shaped."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = [k for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {', '.join(missing[:show])}")
    if extra:
        problems.append(f"unexpected {len(extra)} key(s): {', '.join(extra[:show])}")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} shape mismatch(es), e.g. {k}: {tuple(got[k].shape)} vs {tuple(expected[k])}")
    return problems


def load_converted(
    model: torch.nn.Module, converted: dict[str, torch.Tensor], spec: ModelSpec, assign: bool = False
) -> None:
    """Load converted weights strictly; any missing key or shape mismatch is a ``CheckpointError``."""
    problems = key_problems({k: tuple(v.shape) for k, v in model.state_dict().items()}, converted)
    if problems:
        raise CheckpointError(f"checkpoint does not fit {spec.name}: " + "; ".join(problems))
    model.load_state_dict(converted, strict=True, assign=assign)
