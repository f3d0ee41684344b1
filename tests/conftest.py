"""Shared test fixtures: original-layout checkpoints with random weights, built by Meta's package.

No weights can be downloaded here, so every checkpoint is made by the tests: Meta's ``sam2``
package builds the model from its own config with a fixed seed, and we save its state dict the
way the official release files are saved (``{"model": state_dict}``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from sam2flow.formats import mask_iou  # noqa: F401  (the tests import it from here)
from sam2flow.models.registry import ModelSpec, get_spec
from sam2flow.server.ready import wait_ready

# Tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite runs the torch image encoder (the default) unless a test names another backend:
# tests/test_openvino.py runs the OpenVINO one. Converted encoders go to a fresh folder per run.
os.environ.setdefault("SAM2FLOW_BACKEND", "torch")
os.environ.setdefault("SAM2FLOW_CACHE_DIR", tempfile.mkdtemp(prefix="sam2flow-test-cache-"))
# Servers made by the tests sleep between clicks: a compute thread polling for a second after each
# one would take a core from the next test on a 2-core CI machine. tests/test_threads.py tests it.
os.environ.setdefault("SAM2FLOW_CLICK_SPIN_MS", "0")

_MODELS: dict[tuple[str, str], object] = {}


def build_reference(spec: ModelSpec, seed: int = 0):
    """Meta's SAM2Base for ``spec`` with seeded random weights (memoised per spec)."""
    key = (spec.version, spec.family)
    if key not in _MODELS:
        from sam2.build_sam import build_sam2

        torch.manual_seed(seed)
        _MODELS[key] = build_sam2(spec.meta_config, ckpt_path=None, device="cpu", mode="eval")
    return _MODELS[key]


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def make_checkpoint(checkpoint_dir):
    """``make_checkpoint(version, family)`` → path of an original-layout ``.pt`` named as released."""

    def make(version: str = "hiera_tiny", family: str = "sam2.1"):
        spec = get_spec(version, family)
        path = checkpoint_dir / spec.checkpoint_name
        if not path.exists():
            torch.save({"model": build_reference(spec).state_dict()}, path)
        return path

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint):
    return make_checkpoint("hiera_tiny", "sam2.1")


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint):
    from sam2flow import Sam2Engine

    return Sam2Engine.from_pretrained("hiera_tiny", checkpoint=str(tiny_checkpoint), device="cpu", dtype="float32")


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (blobs, not white noise), so masks have structure."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3)).astype(np.float32)
    t = torch.from_numpy(small).permute(2, 0, 1)[None]
    big = torch.nn.functional.interpolate(t, (h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    noise = rng.normal(0, 8, (h, w, 3))
    return np.clip(big.numpy() + noise, 0, 255).astype(np.uint8)


def write_mixed_images(d) -> None:
    """A folder of what batch jobs meet: RGB, grayscale and RGBA PNGs, and a corrupt file."""
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(random_image(100, 140, seed=1)).save(d / "a_rgb.png")
    Image.fromarray(random_image(100, 140, seed=2)[:, :, 0]).save(d / "b_gray.png")
    rgba = np.dstack([random_image(90, 120, seed=3), np.full((90, 120), 200, np.uint8)])
    Image.fromarray(rgba).save(d / "c_rgba.png")
    (d / "d_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")


def connected_components(mask: torch.Tensor):
    """Stand-in for Meta's CUDA kernel ``sam2.utils.misc.get_connected_components`` (8-connectivity
    labels and areas of each (N, 1, H, W) mask), via scipy, for the reference's post-processing."""
    ndimage = pytest.importorskip("scipy.ndimage")
    m = mask.to(torch.uint8).cpu().numpy()
    labels, areas = np.zeros(m.shape, np.int32), np.zeros(m.shape, np.int32)
    for i in range(len(m)):
        lab, _ = ndimage.label(m[i, 0], structure=np.ones((3, 3), int))
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        labels[i, 0], areas[i, 0] = lab, sizes[lab]
    return torch.from_numpy(labels), torch.from_numpy(areas)


# A workflow of one SAM2 step: image + detections "boxes" in, "masks" out.
BOXES_WORKFLOW = {
    "version": "1.0",
    "inputs": [
        {"type": "WorkflowImage", "name": "image"},
        {"type": "WorkflowBatchInput", "name": "boxes", "kind": ["object_detection_prediction"]},
    ],
    "steps": [
        {
            "type": "roboflow_core/segment_anything@v1",
            "name": "sam",
            "images": "$inputs.image",
            "boxes": "$inputs.boxes",
        }
    ],
    "outputs": [{"type": "JsonField", "name": "masks", "selector": "$steps.sam.predictions"}],
}

SERVER_API_KEY = "test-key-123"
SERVER_POINTS_PER_SIDE = 4  # the live server's unprompted grid: small, CPU tests
SERVER_MAX_PROMPTS = 20  # per image
SERVER_MAX_REQUEST_PROMPTS = 40  # per request
SERVER_MAX_PIXELS = 4_000_000


def refuse_dynamic_quantization(monkeypatch) -> None:
    """Make OpenVINO's CPU plugin refuse to compile with dynamic quantisation (int8 weights), as it does
    with oneDNN capped to AVX2 on an AVX-512 CPU, with the plugin's multi-line message."""
    import openvino

    real = openvino.Core.compile_model

    def compile_model(self, model, device_name=None, config=None):
        if config and "DYNAMIC_QUANTIZATION_GROUP_SIZE" in config:
            raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:132:\n\ncould not create a primitive")
        return real(self, model, device_name, config)

    monkeypatch.setattr(openvino.Core, "compile_model", compile_model)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint, log, env: dict | None = None):
    """Start ``sam2flow serve`` on a free loopback port (API key, small limits); → (url, process).

    ``env``: more ``SAM2FLOW_*`` settings for this server.
    """
    port = free_port()
    env = {
        **os.environ,
        "SAM2FLOW_API_KEY": SERVER_API_KEY,
        "SAM2FLOW_MAX_PROMPTS": str(SERVER_MAX_PROMPTS),
        "SAM2FLOW_MAX_REQUEST_PROMPTS": str(SERVER_MAX_REQUEST_PROMPTS),
        "SAM2FLOW_MAX_IMAGE_PIXELS": str(SERVER_MAX_PIXELS),
        "SAM2FLOW_MAX_BODY_BYTES": str(8 << 20),
        "SAM2FLOW_AUTOMATIC_POINTS_PER_SIDE": str(SERVER_POINTS_PER_SIDE),
        # Micro-batching as on a GPU (a CPU's default is 1 image per encoder run), so the tests see batches.
        "SAM2FLOW_MAX_BATCH_SIZE": "4",
        **(env or {}),
    }
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sam2flow",
                "serve",
                "--port",
                str(port),
                "--preload",
                "hiera_tiny",
                "--checkpoint",
                str(checkpoint),
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--max-wait-ms",
                "60",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 180, proc, log)
    except ValueError as e:
        stop_server(proc)
        pytest.fail(str(e))
    return url, proc


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def live_server_process(tiny_checkpoint, tmp_path_factory):
    """A real server process with the random-weights tiny checkpoint: (url, process)."""
    url, proc = start_server(tiny_checkpoint, tmp_path_factory.mktemp("server") / "server.log")
    yield url, proc
    stop_server(proc)


@pytest.fixture(scope="session")
def live_server(live_server_process):
    return live_server_process[0]
