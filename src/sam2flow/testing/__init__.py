"""Synthetic scenes with exact masks, and the small trained fixture model (offline, no downloads).

- ``make_scene(seed, size=(H, W))`` → ``Scene`` (image, visible instance masks, boxes).
- ``write_checkpoint(path, family)`` / ``write_hf_directory(path, family)``: the fixture model as
  an original Meta checkpoint or a Hugging Face directory; ``fixture_model(family)`` builds it in
  memory. The trained prompt encoder + mask decoder come from ``fixture_weights.safetensors``;
  everything else is regenerated from a seed (see ``sam2flow.testing.fixture``).
"""

from .fixture import (
    FIXTURE_SEED,
    FixtureError,
    encoder_state,
    fixture_model,
    full_state_dict,
    load_trained,
    write_checkpoint,
    write_hf_directory,
)
from .scenes import Scene, make_scene, mask_to_box

__all__ = [
    "FIXTURE_SEED",
    "FixtureError",
    "Scene",
    "encoder_state",
    "fixture_model",
    "full_state_dict",
    "load_trained",
    "make_scene",
    "mask_to_box",
    "write_checkpoint",
    "write_hf_directory",
]
