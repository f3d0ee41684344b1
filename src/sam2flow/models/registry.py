"""The SAM2 model registry: version × family → architecture, Hugging Face repository, original file.

Versions are the four Hiera sizes the workflow step accepts; families are the two releases
(``sam2.1``, the default, and ``sam2``). The image-path architecture is the same in both families;
only the video-memory weights that images never use differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Version = Literal["hiera_tiny", "hiera_small", "hiera_b_plus", "hiera_large"]  # the step's `version` values
VERSIONS: tuple[str, ...] = get_args(Version)
FAMILIES = ("sam2.1", "sam2")
DEFAULT_VERSION = "hiera_tiny"
DEFAULT_FAMILY = "sam2.1"


@dataclass(frozen=True)
class HieraArch:
    """Hiera trunk hyper-parameters (the numbers in Meta's ``sam2*_hiera_*.yaml``)."""

    embed_dim: int
    num_heads: int
    stages: tuple[int, ...]
    global_att_blocks: tuple[int, ...]
    window_pos_embed_bkg: tuple[int, int]
    window_spec: tuple[int, ...] = (8, 4, 14, 7)

    @property
    def num_blocks(self) -> int:
        return sum(self.stages)

    @property
    def channel_list(self) -> list[int]:
        """Backbone output channels from the coarsest stage to the finest."""
        return [self.embed_dim * 2**i for i in reversed(range(len(self.stages)))]


_ARCH = {
    "hiera_tiny": HieraArch(96, 1, (1, 2, 7, 2), (5, 7, 9), (7, 7)),
    "hiera_small": HieraArch(96, 1, (1, 2, 11, 2), (7, 10, 13), (7, 7)),
    "hiera_b_plus": HieraArch(112, 2, (2, 3, 16, 3), (12, 16, 20), (14, 14)),
    "hiera_large": HieraArch(144, 2, (2, 6, 36, 4), (23, 33, 43), (7, 7), (8, 4, 16, 8)),
}

# Names as the releases spell them.
_FILE_SIZE = {"hiera_tiny": "tiny", "hiera_small": "small", "hiera_b_plus": "base_plus", "hiera_large": "large"}
_REPO_SIZE = {"hiera_tiny": "tiny", "hiera_small": "small", "hiera_b_plus": "base-plus", "hiera_large": "large"}
_YAML_SIZE = {"hiera_tiny": "t", "hiera_small": "s", "hiera_b_plus": "b+", "hiera_large": "l"}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to find, build and convert one SAM2 model."""

    version: str
    family: str
    arch: HieraArch

    @property
    def hf_repo(self) -> str:
        """Hugging Face repository id, e.g. ``facebook/sam2.1-hiera-tiny``."""
        return f"facebook/{self.family}-hiera-{_REPO_SIZE[self.version]}"

    @property
    def checkpoint_name(self) -> str:
        """Original release file name, e.g. ``sam2.1_hiera_tiny.pt``."""
        return f"{self.family}_hiera_{_FILE_SIZE[self.version]}.pt"

    @property
    def meta_config(self) -> str:
        """Meta's Hydra config name, e.g. ``configs/sam2.1/sam2.1_hiera_t.yaml``."""
        return f"configs/{self.family}/{self.family}_hiera_{_YAML_SIZE[self.version]}.yaml"

    @property
    def name(self) -> str:
        return f"{self.family}/{self.version}"

    def hf_config(self):
        """The ``transformers.Sam2Config`` for this architecture (image path only)."""
        from transformers import Sam2Config

        a = self.arch
        backbone = {
            "model_type": "sam2_hiera_det_model",
            "hidden_size": a.embed_dim,
            "num_attention_heads": a.num_heads,
            "blocks_per_stage": list(a.stages),
            "embed_dim_per_stage": [a.embed_dim * 2**i for i in range(len(a.stages))],
            "num_attention_heads_per_stage": [a.num_heads * 2**i for i in range(len(a.stages))],
            "window_size_per_stage": list(a.window_spec),
            "global_attention_blocks": list(a.global_att_blocks),
            "window_positional_embedding_background_size": list(a.window_pos_embed_bkg),
        }
        vision = {
            "model_type": "sam2_vision_model",
            "backbone_config": backbone,
            "backbone_channel_list": a.channel_list,
        }
        return Sam2Config(vision_config=vision)


def get_spec(version: str = DEFAULT_VERSION, family: str = DEFAULT_FAMILY) -> ModelSpec:
    """Look up a model; unknown names raise ``ValueError`` listing the valid ones."""
    if version not in _ARCH:
        raise ValueError(f"unknown SAM2 version {version!r}: expected one of {', '.join(VERSIONS)}")
    if family not in FAMILIES:
        raise ValueError(f"unknown SAM2 family {family!r}: expected one of {', '.join(FAMILIES)}")
    return ModelSpec(version, family, _ARCH[version])


def all_specs() -> list[ModelSpec]:
    return [get_spec(v, f) for f in FAMILIES for v in VERSIONS]
