"""Find SAM2 weights wherever users keep them, and load them into ``transformers.Sam2Model``.

Sources, for ``load_model(version, family, checkpoint)``:

- ``checkpoint`` a ``.pt`` file: an original Meta checkpoint (``{"model": state_dict}``), read with
  ``torch.load(weights_only=True)`` (no pickle code runs) and converted by our key mapping;
- ``checkpoint`` a directory with ``config.json`` + ``model.safetensors``: a Hugging Face model;
- ``checkpoint`` a repository id (``facebook/sam2.1-hiera-tiny``): downloaded from the Hub;
- no ``checkpoint``: ``$SAM2FLOW_WEIGHTS_DIR/<original file name>`` or ``$SAM2FLOW_WEIGHTS_DIR/<repo
  name>/``, then the Hugging Face cache, then a download of the registry's repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .convert import CheckpointError, convert_state_dict, load_converted
from .registry import ModelSpec, get_spec

WEIGHTS_DIR_ENV = "SAM2FLOW_WEIGHTS_DIR"
_HF_FILES = ("config.json", "model.safetensors")


def read_original_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an original SAM2 ``.pt`` file, never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, not a torch file at all
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read as a PyTorch weights file: {reason[:200]}") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise CheckpointError(f"checkpoint {path} holds no SAM2 state dict (expected {{'model': {{name: tensor}}}})")
    return state


def _build_empty(spec: ModelSpec):
    from transformers import Sam2Model

    # Build on the meta device: random initialisation of a model about to be overwritten is waste.
    with torch.device("meta"):
        return Sam2Model(spec.hf_config())


def model_from_original(path: str | os.PathLike, spec: ModelSpec):
    """``Sam2Model`` (float32, CPU, eval) from an original Meta checkpoint."""
    state = read_original_checkpoint(path)
    try:
        converted = convert_state_dict(state, spec)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model = _build_empty(spec)
    try:
        load_converted(model, {k: v.float() for k, v in converted.items()}, spec, assign=True)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return model.eval()


def _check_hf_config(model, spec: ModelSpec, where: str) -> None:
    backbone = model.config.vision_config.backbone_config
    got = (list(backbone.blocks_per_stage), backbone.hidden_size)
    want = (list(spec.arch.stages), spec.arch.embed_dim)
    if got != want:
        raise CheckpointError(f"{where} holds a different SAM2 size (blocks {got[0]}, width {got[1]}) than {spec.name}")


def model_from_hf(directory_or_repo: str | os.PathLike, spec: ModelSpec, local_only: bool = True):
    """``Sam2Model`` from a Hugging Face directory (or repository id), safetensors weights only."""
    from transformers import Sam2Model

    try:
        model, info = Sam2Model.from_pretrained(
            str(directory_or_repo),
            dtype=torch.float32,
            use_safetensors=True,
            local_files_only=local_only,
            output_loading_info=True,
        )
    except Exception as e:
        raise CheckpointError(
            f"cannot load a Hugging Face SAM2 model from {directory_or_repo}: {str(e)[:300]}"
        ) from None
    _check_hf_config(model, spec, str(directory_or_repo))
    # transformers only logs missing (then randomly initialised) and unexpected keys; we refuse them.
    # Video-memory keys are already left out of ``unexpected_keys`` by Sam2Model's own ignore list.
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    if missing or unexpected:
        problems = [
            f"{what} {len(keys)} key(s): {', '.join(keys[:6])}"
            for what, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise CheckpointError(f"{directory_or_repo} does not fit {spec.name}: " + "; ".join(problems))
    return model.eval()


def _from_weights_dir(spec: ModelSpec):
    root = os.environ.get(WEIGHTS_DIR_ENV)
    if not root:
        return None
    pt = Path(root) / spec.checkpoint_name
    if pt.is_file():
        return model_from_original(pt, spec)
    hf_dir = Path(root) / spec.hf_repo.split("/")[1]
    if (hf_dir / "config.json").is_file():
        return model_from_hf(hf_dir, spec)
    return None


def _from_hf_cache(spec: ModelSpec):
    from huggingface_hub import try_to_load_from_cache

    paths = [try_to_load_from_cache(spec.hf_repo, f) for f in _HF_FILES]
    if all(isinstance(p, str) for p in paths):
        return model_from_hf(Path(paths[0]).parent, spec)
    pt = try_to_load_from_cache(spec.hf_repo, spec.checkpoint_name)
    if isinstance(pt, str):
        return model_from_original(pt, spec)
    return None


def _download(spec: ModelSpec):
    from huggingface_hub import hf_hub_download

    for name in _HF_FILES:
        hf_hub_download(spec.hf_repo, name)
    return _from_hf_cache(spec)


def _not_found(spec: ModelSpec, cause: Exception | None) -> CheckpointError:
    root = os.environ.get(WEIGHTS_DIR_ENV, "<unset>")
    why = f" (download failed: {str(cause).splitlines()[0][:160]})" if cause else ""
    return CheckpointError(
        f"no weights for {spec.name}{why}. Either put {spec.checkpoint_name} (or the Hugging Face directory "
        f"{spec.hf_repo.split('/')[1]}/) in ${WEIGHTS_DIR_ENV} (now {root}), or pass a checkpoint path "
        f"(--checkpoint PATH); with internet access it is downloaded from {spec.hf_repo}."
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def load_model(
    version: str = "hiera_tiny",
    family: str = "sam2.1",
    checkpoint: str | os.PathLike | None = None,
    download: bool = True,
):
    """Load the ``Sam2Model`` for ``version``/``family`` (float32, CPU, eval) and its ``ModelSpec``.

    Raises ``CheckpointError`` (a ``ValueError``) with the file it looked for and how to provide it.
    """
    spec = get_spec(version, family)
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.is_dir():
            return model_from_hf(path, spec), spec
        if path.is_file():
            return model_from_original(path, spec), spec
        if str(checkpoint).count("/") == 1 and not str(checkpoint).startswith((".", "/")):
            return model_from_hf(str(checkpoint), spec, local_only=not download), spec
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")
    model = _from_weights_dir(spec) or _from_hf_cache(spec)
    if model is not None:
        return model, spec
    if not download or _hub_offline():
        raise _not_found(spec, None)
    try:
        model = _download(spec)
    except Exception as e:
        raise _not_found(spec, e) from None
    if model is None:
        raise _not_found(spec, None)
    return model, spec
