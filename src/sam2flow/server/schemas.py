"""Request bodies of the SAM2 HTTP API (the one ``inference-sdk``'s ``InferenceHTTPClient`` speaks)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from ..images import WIRE_FORM, WIRE_TYPES


class ImageRef(BaseModel):
    """An image over HTTP; ``sam2flow.images.load_wire_image`` decodes it (``url`` only when enabled)."""

    type: Literal["base64", "numpy", "url"]
    value: Any


def _wire_image(value: Any) -> Any:
    # One message for every unsupported form (paths, file references, bare strings, other types).
    if not (isinstance(value, dict) and value.get("type") in WIRE_TYPES and "value" in value):
        raise ValueError(f"an image must be {WIRE_FORM}")
    return value


WireImage = Annotated[ImageRef, BeforeValidator(_wire_image)]


class Box(BaseModel):
    """Centre and size in pixels, as detectors report boxes."""

    x: float
    y: float
    width: float
    height: float

    @field_validator("x", "y", "width", "height")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    def xyxy(self) -> list[float]:
        return [self.x - self.width / 2, self.y - self.height / 2, self.x + self.width / 2, self.y + self.height / 2]


class Point(BaseModel):
    x: float
    y: float
    positive: bool = True

    @field_validator("x", "y")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


class PromptModel(BaseModel):
    box: Box | None = None
    points: list[Point] | None = None


class _Request(BaseModel):
    # Clients send bookkeeping fields of their own (source, usage tags): accepted, ignored.
    model_config = ConfigDict(extra="allow", protected_namespaces=())
    api_key: str | None = None


class EmbedRequest(_Request):
    image: WireImage
    image_id: str | None = Field(default=None, max_length=256)
    sam2_version_id: str = "hiera_tiny"


class SegmentRequest(_Request):
    image: WireImage | None = None
    image_id: str | None = Field(default=None, max_length=256)
    prompts: list[PromptModel] | None = None  # also accepted wrapped: {"prompts": [...]}
    multimask_output: bool = True
    sam2_version_id: str = "hiera_tiny"
    format: Literal["json", "rle", "binary"] = "json"
    save_logits_to_cache: bool = False
    load_logits_from_cache: bool = False
    # Meta's post-processing (low-resolution pixels, 0 = off): sam2flow.engine.transforms.remove_small_regions
    max_hole_area: int = Field(default=0, ge=0)
    max_sprinkle_area: int = Field(default=0, ge=0)

    @field_validator("prompts", mode="before")
    @classmethod
    def _unwrap(cls, value):
        if isinstance(value, dict) and set(value) <= {"prompts"}:
            return value.get("prompts")
        return value


class WorkflowRunRequest(_Request):
    specification: dict
    inputs: dict = Field(default_factory=dict)
    use_cache: bool = True
    excluded_fields: list[str] | None = None
    enable_profiling: bool = False
