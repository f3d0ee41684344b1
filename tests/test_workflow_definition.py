"""Workflow definitions are validated before anything runs; errors name the step and the field."""

from __future__ import annotations

import copy

import pytest

from sam2flow import WorkflowDefinitionError, parse_definition

STEP = {
    "name": "sam",
    "type": "roboflow_core/segment_anything@v1",
    "images": "$inputs.image",
    "boxes": "$inputs.detections",
    "version": "hiera_large",
    "threshold": 0.3,
    "multimask_output": True,
}


def definition(**step_changes):
    step = {**STEP, **step_changes}
    step = {k: v for k, v in step.items() if v is not None}
    return {
        "version": "1.0",
        "inputs": [
            {"type": "WorkflowImage", "name": "image"},
            {"type": "WorkflowBatchInput", "name": "detections", "kind": ["object_detection_prediction"]},
            {"type": "WorkflowParameter", "name": "thr", "default_value": 0.5},
            {"type": "WorkflowParameter", "name": "model", "kind": ["string"]},
        ],
        "steps": [step],
        "outputs": [{"type": "JsonField", "name": "predictions", "selector": "$steps.sam.predictions"}],
    }


def test_documented_step_json_is_accepted_with_images_or_image():
    d = parse_definition(definition())
    step = d.steps[0]
    assert (step.images, step.boxes, step.version, step.threshold, step.multimask_output) == (
        "$inputs.image",
        "$inputs.detections",
        "hiera_large",
        0.3,
        True,
    )
    alias = definition()
    alias["steps"][0]["image"] = alias["steps"][0].pop("images")
    assert parse_definition(alias).steps[0].images == "$inputs.image"


def test_defaults_and_selectors_for_parameters():
    d = parse_definition(definition(version=None, threshold="$inputs.thr", multimask_output=None))
    step = d.steps[0]
    assert step.version == "hiera_tiny" and step.threshold == "$inputs.thr" and step.multimask_output is True
    assert step.use_keypoints_as_points is False
    assert parse_definition(definition(version="$inputs.model")).steps[0].version == "$inputs.model"


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"version": "hiera_huge"}, "version"),
        ({"threshold": "x"}, "threshold"),
        ({"multimask_output": "some"}, "multimask_output"),
        ({"use_keypoints_as_points": "yes please"}, "use_keypoints_as_points"),
        ({"colour": "red"}, "colour"),
        ({"images": "inputs.image"}, "images"),
        ({"images": None}, "images"),
        ({"threshold": "$steps.x.y"}, "threshold"),
    ],
)
def test_invalid_values_name_step_and_field(changes, field):
    with pytest.raises(WorkflowDefinitionError, match=rf"step 'sam'.*'{field}'"):
        parse_definition(definition(**changes))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["steps"][0].update(images="$inputs.picture"), "unknown input"),
        (lambda d: d["steps"][0].update(boxes="$steps.detector.predictions"), "unknown step"),
        (lambda d: d["steps"][0].update(boxes="$inputs.image"), "kind image"),
        (lambda d: d["steps"][0].update(images="$inputs.detections"), "expected image"),
        (lambda d: d["steps"][0].update(threshold="$inputs.image"), "WorkflowParameter"),
        (lambda d: d["steps"][0].update(version="$inputs.nope"), "WorkflowParameter"),
        (lambda d: d["outputs"][0].update(selector="$steps.sam.masks"), "no output 'masks'"),
        (lambda d: d["outputs"][0].update(selector="$steps.other.predictions"), "unknown step"),
        (lambda d: d["steps"][0].update(type="roboflow_core/object_detection_model@v1"), "unknown step type"),
        (lambda d: d["inputs"].append({"type": "WorkflowVideo", "name": "v"}), "unknown input type"),
        (lambda d: d["steps"].append(dict(d["steps"][0])), "used twice"),
        (lambda d: d.update(outputs=[]), "outputs"),
    ],
)
def test_bad_references_are_errors_naming_the_place(mutate, message):
    d = copy.deepcopy(definition())
    mutate(d)
    with pytest.raises(WorkflowDefinitionError, match=message):
        parse_definition(d)


def test_cycle_is_an_error():
    d = definition()
    d["steps"] = [
        {**STEP, "name": "a", "boxes": "$steps.b.predictions"},
        {**STEP, "name": "b", "boxes": "$steps.a.predictions"},
    ]
    with pytest.raises(WorkflowDefinitionError, match="cycle"):
        parse_definition(d)


def test_chained_steps_run_in_dependency_order():
    d = definition()
    d["steps"] = [
        {**STEP, "name": "refine", "boxes": "$steps.first.predictions"},
        {**STEP, "name": "first"},
    ]
    d["outputs"] = [{"type": "JsonField", "name": "all", "selector": "$steps.refine.*"}]
    assert [s.name for s in parse_definition(d).steps] == ["first", "refine"]
