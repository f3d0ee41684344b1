"""The ``roboflow_core/segment_anything@v1`` step: its manifest and its run.

Boxes in (``sv.Detections`` from a detector), one mask per box out, with the box's class and
identity; without boxes, automatic mask generation segments the whole image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import supervision as sv
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    field_validator,
)

from ..detections import attach_image_metadata, keypoint_clicks, masks_to_detections, prompt_fields
from ..engine.transforms import check_region_area
from ..engine.types import AutomaticConfig, Prompt, SegmentingEngine
from ..models.registry import Version

STEP_TYPE = "roboflow_core/segment_anything@v1"

INPUT_SELECTOR = re.compile(r"^\$inputs\.([A-Za-z_][\w-]*)$")
STEP_SELECTOR = re.compile(r"^\$steps\.([A-Za-z_][\w-]*)\.([A-Za-z_][\w-]*|\*)$")

IMAGE_KIND = "image"
DETECTION_KINDS = ("object_detection_prediction", "instance_segmentation_prediction", "keypoint_detection_prediction")
OUTPUT_KIND = "instance_segmentation_prediction"
# The step's parameters: each a literal or a $inputs selector in the manifest, resolved into StepParameters.
PARAMETERS = (
    "version",
    "threshold",
    "multimask_output",
    "use_keypoints_as_points",
    "max_hole_area",
    "max_sprinkle_area",
)


# ``$inputs.<name>``: a workflow parameter bound at run time.
InputSelector = Annotated[str, StringConstraints(pattern=INPUT_SELECTOR.pattern)]


def _parameter(value):
    if isinstance(value, str) and value.startswith("$") and not INPUT_SELECTOR.match(value):
        raise ValueError(f"{value!r} is not a parameter selector ($inputs.<name>)")
    return value


class SegmentAnything2Manifest(BaseModel):
    """The step as users write it in JSON. ``version``, ``threshold``, ``multimask_output``,
    ``use_keypoints_as_points`` and the two optional extras ``max_hole_area`` /
    ``max_sprinkle_area`` (low-resolution pixels, 0 = off; not in Roboflow's manifest) take a literal
    or a ``$inputs.<name>`` selector."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1)
    type: Literal["roboflow_core/segment_anything@v1"]
    images: str = Field(validation_alias=AliasChoices("images", "image"))
    boxes: str | None = None
    version: InputSelector | Version = "hiera_tiny"
    threshold: InputSelector | StrictFloat | StrictInt = 0.0
    multimask_output: InputSelector | StrictBool = True
    use_keypoints_as_points: InputSelector | StrictBool = False
    max_hole_area: InputSelector | Annotated[StrictInt, Field(ge=0)] = 0
    max_sprinkle_area: InputSelector | Annotated[StrictInt, Field(ge=0)] = 0

    @field_validator(*PARAMETERS, mode="before")
    @classmethod
    def _selector_or_literal(cls, value):
        return _parameter(value)

    @field_validator("images", "boxes")
    @classmethod
    def _data_selector(cls, value):
        if value is not None and not (INPUT_SELECTOR.match(value) or STEP_SELECTOR.match(value)):
            raise ValueError(f"{value!r} is not a selector ($inputs.<name> or $steps.<step>.<output>)")
        return value

    @staticmethod
    def outputs() -> dict[str, str]:
        return {"predictions": OUTPUT_KIND}

    def parameters(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in PARAMETERS}


@dataclass(frozen=True)
class StepParameters:
    """Resolved parameter values for one run of the step."""

    version: str = "hiera_tiny"
    threshold: float = 0.0
    multimask_output: bool = True
    use_keypoints_as_points: bool = False
    max_hole_area: int = 0
    max_sprinkle_area: int = 0

    def __post_init__(self):
        # Values bound from $inputs arrive untyped: check them as the manifest checks literals.
        if self.version not in Version.__args__:
            raise ValueError(f"version {self.version!r} is not one of {', '.join(Version.__args__)}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or np.isnan(self.threshold):
            raise ValueError(f"threshold must be a number, got {self.threshold!r}")
        for name in ("multimask_output", "use_keypoints_as_points"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("max_hole_area", "max_sprinkle_area"):
            check_region_area(name, getattr(self, name))


def prompts_for(detections: sv.Detections, use_keypoints: bool) -> list[Prompt]:
    """One prompt per detection: its box, plus its confident keypoints as positive clicks."""
    clicks = keypoint_clicks(detections) if use_keypoints else [np.zeros((0, 2))] * len(detections)
    prompts = []
    for box, points in zip(detections.xyxy, clicks):
        if len(points):
            prompts.append(Prompt(box=box.tolist(), points=points.tolist(), labels=[1] * len(points)))
        else:
            prompts.append(Prompt(box=box.tolist()))
    return prompts


def segment_images(
    engine: SegmentingEngine[Any],
    images: list[np.ndarray],
    image_ids: list[str],
    boxes: list[sv.Detections] | None,
    params: StepParameters,
    automatic_config: AutomaticConfig | None = None,
) -> list[sv.Detections]:
    """Run the step on a batch: RGB images (embedded together), optional detections per image."""
    if boxes is not None and len(boxes) != len(images):
        raise ValueError(f"boxes has {len(boxes)} elements for {len(images)} images: they must align")
    embeddings = engine.embed(images)
    out = []
    for i, (image, emb) in enumerate(zip(images, embeddings)):
        if boxes is None:
            dets = _automatic(engine, emb, params, automatic_config)
        else:
            prompts = prompts_for(boxes[i], params.use_keypoints_as_points)
            class_ids, class_names, parent_ids = prompt_fields(boxes[i])
            result = engine.predict_prompts(
                emb,
                prompts,
                multimask_output=params.multimask_output,
                max_hole_area=params.max_hole_area,
                max_sprinkle_area=params.max_sprinkle_area,
            )
            dets = masks_to_detections(
                result.masks, result.scores, class_ids, class_names, parent_ids, params.threshold
            )
        out.append(attach_image_metadata(dets, image.shape[:2], image_ids[i]))
    return out


def _automatic(
    engine: SegmentingEngine[Any], emb: Any, params: StepParameters, config: AutomaticConfig | None
) -> sv.Detections:
    result = engine.automatic(emb, config)
    order = np.argsort(-result.scores, kind="stable")  # class ids follow decreasing score
    ids = list(range(len(order)))
    return masks_to_detections(
        result.masks[order], result.scores[order], ids, [str(i) for i in ids], None, params.threshold
    )
