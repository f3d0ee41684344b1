"""The fixture model: a small trained SAM2 (hiera_tiny) that works offline, in the original layout.

Only the prompt encoder and the mask decoder are trained (``tools/train_fixture.py``); they are
committed as ``fixture_weights.safetensors`` (float16, Meta key names, next to this file). Every
other weight is regenerated here from ``FIXTURE_SEED`` by the scheme below, so any machine
rebuilds the same full checkpoint, which both Meta's ``sam2`` package (strictly, as hiera_tiny of
either family) and our loader accept. The keys, shapes and initialisations are Meta's checkpoint
layout (``sam2flow.models.layout``, shared with the converter).

The seeded scheme
-----------------
Every tensor gets its own generator, independent of the order of the keys::

    bits = numpy.random.PCG64(numpy.random.SeedSequence([seed, stream, zlib.crc32(key.encode())]))
    u = (bits.random_raw(n) >> 40).astype(float32) * 2**-24        # n uniforms in [0, 1), 24 bits

(``random_raw`` is the PCG64 bit stream itself, and the rest is exact float32 arithmetic, so the
numbers are the same on every machine and numpy version). Streams: 0 = the image path, 1 = the
video-memory weights, 2 = an untrained prompt encoder and mask decoder (placeholder weights for
tests). From ``u`` each tensor is, mirroring PyTorch's default initialisation but with uniforms
only:

- ``uniform``: a ``Linear``/``Conv`` weight or bias, ``(2u - 1) / sqrt(fan_in)`` with
  ``fan_in = shape[1] * prod(shape[2:])`` of the weight (PyTorch's ``kaiming_uniform(a=√5)``
  bound, and its bias bound);
- ``std(s)``: where PyTorch draws a normal (embeddings, learned tokens, SAM2's ``trunc_normal(0.02)``
  parameters), a uniform with the same standard deviation: ``(2u - 1) * s * sqrt(3)``;
- layer norms: weight 1, bias 0; Hiera's positional embeddings: 0 (as Meta initialises them);
  the memory fuser's layer scale ``gamma``: 1e-6 (Meta's value).

With these frozen weights the image features keep the image's local colour and structure (a
linear read-out of the pixel colour from them reaches R² ≈ 0.99; ``tools/train_fixture.py
--readout-check`` measures it), which is what the decoder is trained on.

The image path (stream 0) is ``image_encoder.*`` plus the three weights that act on image
features once per image and are frozen with it: ``no_mem_embed`` (added to the image embedding)
and the decoder's ``conv_s0``/``conv_s1`` (the high-resolution feature projections).
"""

from __future__ import annotations

import math
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

from ..models.convert import key_problems
from ..models.layout import Entry, decoder_layout, image_layout, video_layout
from ..models.registry import ModelSpec, get_spec

FIXTURE_SEED = 0
FIXTURE_VERSION = "hiera_tiny"
WEIGHTS_FILE = Path(__file__).with_name("fixture_weights.safetensors")

IMAGE_STREAM, VIDEO_STREAM, DECODER_STREAM = 0, 1, 2


class FixtureError(RuntimeError):
    """The fixture cannot be built (missing trained weights, wrong keys or shapes)."""


# ---- the seeded generator -------------------------------------------------------------------


def seeded_uniform(seed: int, stream: int, key: str, n: int) -> np.ndarray:
    """``n`` float32 uniforms in [0, 1) of tensor ``key`` (see the module docstring)."""
    seq = np.random.SeedSequence([int(seed), int(stream), zlib.crc32(key.encode())])
    raw = np.random.PCG64(seq).random_raw(n)
    return (raw >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


def _fan_in(shape: tuple[int, ...]) -> int:
    return shape[1] * math.prod(shape[2:]) if len(shape) > 1 else shape[0]


def _generate(layout: list[Entry], seed: int, stream: int) -> dict[str, torch.Tensor]:
    shapes = {k: s for k, s, _ in layout}
    out: dict[str, torch.Tensor] = {}
    for key, shape, init in layout:
        n = math.prod(shape)
        if init == "ones":
            arr = np.ones(shape, np.float32)
        elif init == "zeros":
            arr = np.zeros(shape, np.float32)
        elif isinstance(init, tuple) and init[0] == "const":
            arr = np.full(shape, init[1], np.float32)
        else:
            if init == "uniform":
                bound = 1.0 / math.sqrt(_fan_in(shape))
            elif isinstance(init, str) and init.startswith("bias:"):
                bound = 1.0 / math.sqrt(_fan_in(shapes[init[5:]]))
            elif isinstance(init, tuple) and init[0] == "std":
                bound = init[1] * math.sqrt(3.0)
            else:  # pragma: no cover - layout bug
                raise AssertionError(f"unknown init {init!r} for {key}")
            u = seeded_uniform(seed, stream, key, n)
            arr = ((u * np.float32(2.0) - np.float32(1.0)) * np.float32(bound)).reshape(shape)
        out[key] = torch.from_numpy(arr)
    return out


def image_path_state(seed: int = FIXTURE_SEED, version: str = FIXTURE_VERSION) -> dict[str, torch.Tensor]:
    """The frozen image path (stream 0): ``image_encoder.*``, ``no_mem_embed``, ``conv_s0``/``conv_s1``."""
    return _generate(image_layout(get_spec(version)), seed, IMAGE_STREAM)


def video_state(seed: int = FIXTURE_SEED, family: str = "sam2.1") -> dict[str, torch.Tensor]:
    """The video-memory weights of ``family`` (stream 1)."""
    return _generate(video_layout(family), seed, VIDEO_STREAM)


def encoder_state(
    seed: int = FIXTURE_SEED, family: str = "sam2.1", version: str = FIXTURE_VERSION
) -> dict[str, torch.Tensor]:
    """Every weight that is not trained: the image path (stream 0) and the video memory (stream 1)."""
    return {**image_path_state(seed, version), **video_state(seed, family)}


def untrained_decoder_state(seed: int = FIXTURE_SEED) -> dict[str, torch.Tensor]:
    """Placeholder prompt encoder + mask decoder (stream 2, untrained: masks are noise).

    For tests of the loading path that must not depend on the trained file; never for masks.
    """
    return _generate(decoder_layout(), seed, DECODER_STREAM)


def trainable_keys() -> list[str]:
    """The keys of the trained weights file, in layout order."""
    return [k for k, _, _ in decoder_layout()]


# ---- trained weights and full checkpoints ---------------------------------------------------


def load_trained(path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The trained prompt encoder + mask decoder (float32), from ``fixture_weights.safetensors``."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else WEIGHTS_FILE
    if not path.is_file():
        raise FixtureError(
            f"the fixture's trained weights {path} do not exist (yet): train them with "
            f"`python tools/train_fixture.py` and write them with `python tools/train_fixture.py --export`"
        )
    return {k: v.float() for k, v in load_file(str(path)).items()}


def _check_trained(trained: dict[str, torch.Tensor]) -> None:
    problems = key_problems({k: s for k, s, _ in decoder_layout()}, trained, show=5)
    if problems:
        raise FixtureError(
            "trained fixture weights do not fit the prompt encoder + mask decoder: " + "; ".join(problems)
        )


def full_state_dict(
    trained: dict[str, torch.Tensor] | None = None, family: str = "sam2.1", seed: int = FIXTURE_SEED
) -> dict[str, torch.Tensor]:
    """Every key of Meta's hiera_tiny of ``family`` (float32): seeded weights + ``trained``.

    ``trained`` defaults to the committed ``fixture_weights.safetensors`` (``FixtureError`` if it
    is missing); it must hold exactly the keys of ``trainable_keys()``.
    """
    if trained is None:
        trained = load_trained()
    _check_trained(trained)
    state = encoder_state(seed, family)
    state.update({k: v.detach().float().cpu().contiguous() for k, v in trained.items()})
    return state


def write_checkpoint(
    path: str | os.PathLike,
    family: str = "sam2.1",
    trained: dict[str, torch.Tensor] | None = None,
    seed: int = FIXTURE_SEED,
) -> Path:
    """Write the full original-layout checkpoint ``{"model": state_dict}`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": full_state_dict(trained, family, seed)}, path)
    return path


def fixture_spec(family: str = "sam2.1") -> ModelSpec:
    return get_spec(FIXTURE_VERSION, family)


def fixture_model(family: str = "sam2.1", trained: dict[str, torch.Tensor] | None = None, seed: int = FIXTURE_SEED):
    """(``Sam2Model``, ``ModelSpec``) of the fixture, built in memory through our key conversion."""
    from transformers import Sam2Model

    from ..models.convert import convert_state_dict, load_converted

    spec = fixture_spec(family)
    converted = convert_state_dict(full_state_dict(trained, family, seed), spec)
    with torch.device("meta"):
        model = Sam2Model(spec.hf_config())
    load_converted(model, converted, spec, assign=True)
    return model.eval(), spec


def write_hf_directory(
    path: str | os.PathLike,
    family: str = "sam2.1",
    trained: dict[str, torch.Tensor] | None = None,
    seed: int = FIXTURE_SEED,
) -> Path:
    """Write the fixture as a Hugging Face directory (``config.json`` + ``model.safetensors``).

    The original checkpoint goes through ``sam2flow.models.weights.model_from_original``, the
    loader users run, and ``save_pretrained``.
    """
    from ..models.weights import model_from_original

    path = Path(path)
    spec = fixture_spec(family)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / spec.checkpoint_name, family, trained, seed)
        model = model_from_original(ckpt, spec)
    model.save_pretrained(str(path))
    return path
