"""Remote step execution: the step hands its images and prompts to a sam2flow server.

A pipeline host without a GPU runs the workflow itself but sends SAM2's work to
``POST /sam2/segment_image`` (RLE masks, so nothing is lost on the way); the step's outputs are
the same as local execution. Network failures and 502/503/504 answers are retried with backoff;
other errors are raised at once, naming the server.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import requests

from ..engine.types import LOW_RES, AutomaticConfig, Prediction, Prompt
from ..formats import rle_to_mask

TRANSIENT_STATUS = {502, 503, 504}


class RemoteStepError(RuntimeError):
    """The server could not be reached or refused the request."""


@dataclass(frozen=True)
class RemoteImage:
    """What ``embed`` hands back remotely (an ``Embedded``): the image itself, embedded on the server."""

    image: np.ndarray

    @property
    def original_size(self) -> tuple[int, int]:
        return self.image.shape[:2]


@dataclass(frozen=True)
class RemoteMasks:
    """Unprompted masks from the server (a ``ScoredMasks``): ``masks`` (K, H, W) bool, ``scores`` (K,)
    float32, best first. Only these two: the server's answer carries no stability scores, boxes or clicks
    (``engine.automatic.AutomaticResult`` has them locally)."""

    masks: np.ndarray
    scores: np.ndarray


def _png_base64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)  # lossless: same pixels as local
    return base64.b64encode(buf.getvalue()).decode()


def _prompt_json(p: Prompt) -> dict:
    if p.mask_input is not None:
        raise ValueError("mask prompts are not sent to remote servers")
    out: dict = {}
    if p.box is not None:
        x1, y1, x2, y2 = (float(v) for v in p.box)
        out["box"] = {"x": (x1 + x2) / 2, "y": (y1 + y2) / 2, "width": x2 - x1, "height": y2 - y1}
    if p.points is not None:
        out["points"] = [
            {"x": float(x), "y": float(y), "positive": bool(lab)} for (x, y), lab in zip(p.points, p.labels)
        ]
    return out


class RemoteEngine:
    """Stands in for ``Sam2Engine`` in the step: a ``SegmentingEngine[RemoteImage]`` whose calls a
    sam2flow server answers. Differences: ``predict_prompts`` returns zero low-resolution logits (the
    server keeps its own), mask prompts cannot be sent, ``automatic`` takes no config (the server's
    settings apply) and returns ``RemoteMasks``."""

    def __init__(
        self,
        api_url: str,
        version: str,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 0.5,
    ):
        self.api_url = api_url.rstrip("/")
        self.version, self.api_key = version, api_key
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self._session = requests.Session()

    def embed(self, images: Sequence[np.ndarray]) -> list[RemoteImage]:
        return [RemoteImage(im) for im in images]

    def predict_prompts(
        self,
        embedding: RemoteImage,
        prompts: Sequence[Prompt],
        multimask_output: bool = True,
        max_hole_area: int = 0,
        max_sprinkle_area: int = 0,
    ) -> Prediction:
        h, w = embedding.original_size
        if not prompts:
            return Prediction(
                np.zeros((0, h, w), bool), np.zeros(0, np.float32), np.zeros((0, LOW_RES, LOW_RES), np.float32)
            )
        cleanup = {"max_hole_area": max_hole_area, "max_sprinkle_area": max_sprinkle_area}
        masks, scores = self._segment(embedding.image, [_prompt_json(p) for p in prompts], multimask_output, cleanup)
        # The server keeps its low-resolution logits; remote results carry none.
        return Prediction(masks, scores, np.zeros((len(scores), LOW_RES, LOW_RES), np.float32))

    def automatic(self, embedding: RemoteImage, config: AutomaticConfig | None = None) -> RemoteMasks:
        if config is not None:
            raise ValueError("remote execution uses the server's automatic-mode settings; pass no automatic_config")
        masks, scores = self._segment(embedding.image, None, True)
        return RemoteMasks(masks, scores)

    def _segment(
        self, image: np.ndarray, prompts: list | None, multimask: bool, cleanup: dict | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        body = {
            "image": {"type": "base64", "value": _png_base64(image)},
            "sam2_version_id": self.version,
            "multimask_output": multimask,
            "format": "rle",
            **{k: v for k, v in (cleanup or {}).items() if v},
        }
        if prompts is not None:
            body["prompts"] = prompts
        payload = self._post("/sam2/segment_image", body)
        h, w = image.shape[:2]
        preds = payload.get("predictions", [])
        masks = np.stack([rle_to_mask(p["masks"]) for p in preds]) if preds else np.zeros((0, h, w), bool)
        return masks, np.array([p["confidence"] for p in preds], np.float32)

    def _post(self, route: str, body: dict) -> dict:
        url = f"{self.api_url}{route}"
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        for attempt in range(self.retries):
            try:
                r = self._session.post(url, json=body, headers=headers, timeout=self.timeout_s)
            except requests.RequestException as e:
                problem = f"cannot reach the SAM2 server at {self.api_url}: {type(e).__name__}"
            else:
                if r.status_code == 200:
                    return r.json()
                try:
                    detail = r.json().get("error", r.text[:200])
                except ValueError:
                    detail = r.text[:200]
                problem = f"the SAM2 server at {self.api_url} answered {r.status_code}: {detail}"
                if r.status_code not in TRANSIENT_STATUS:
                    raise RemoteStepError(problem)
            if attempt + 1 < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        raise RemoteStepError(f"{problem} (after {self.retries} attempts)")


class RemotePool:
    """``get(version)`` → a ``RemoteEngine``: the runner's engine provider in remote mode."""

    def __init__(self, api_url: str, api_key: str | None = None, **kwargs):
        self.api_url, self.api_key, self.kwargs = api_url, api_key, kwargs
        self._engines: dict[str, RemoteEngine] = {}

    def get(self, version: str) -> RemoteEngine:
        if version not in self._engines:
            self._engines[version] = RemoteEngine(self.api_url, version, self.api_key, **self.kwargs)
        return self._engines[version]
