"""Workflow definitions: parse, and validate every selector before anything runs.

A definition is the Roboflow Workflows JSON::

    {"version": "1.0",
     "inputs": [{"type": "WorkflowImage", "name": "image"},
                {"type": "WorkflowParameter", "name": "threshold", "default_value": 0.3},
                {"type": "WorkflowBatchInput", "name": "boxes", "kind": ["object_detection_prediction"]}],
     "steps": [{"type": "roboflow_core/segment_anything@v1", "name": "sam", ...}],
     "outputs": [{"type": "JsonField", "name": "masks", "selector": "$steps.sam.predictions"}]}

Errors are ``WorkflowDefinitionError`` (a ``ValueError``) naming the place: the input, step or
output, and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from ..models.registry import VERSIONS
from .step import DETECTION_KINDS, IMAGE_KIND, INPUT_SELECTOR, STEP_SELECTOR, STEP_TYPE, SegmentAnything2Manifest

IMAGE_INPUTS = ("WorkflowImage", "InferenceImage")
PARAMETER_INPUTS = ("WorkflowParameter", "InferenceParameter")
BATCH_INPUTS = ("WorkflowBatchInput",)
PARAMETER_KINDS = {
    "version": ("string",),
    "threshold": ("float", "float_zero_to_one", "integer"),
    "multimask_output": ("boolean",),
    "use_keypoints_as_points": ("boolean",),
}


class WorkflowDefinitionError(ValueError):
    """A definition that cannot run, with the place named."""


@dataclass
class InputSpec:
    name: str
    type: str  # "image", "parameter" or "batch"
    kinds: tuple[str, ...] = ()  # empty: any
    default: Any = None
    has_default: bool = False


@dataclass
class Definition:
    inputs: dict[str, InputSpec]
    steps: list[SegmentAnything2Manifest]  # in execution order
    outputs: list[tuple[str, str]]  # (name, selector)
    raw: dict = field(repr=False, default_factory=dict)


def _fail(where: str, message: str) -> None:
    raise WorkflowDefinitionError(f"{where}: {message}")


def _parse_inputs(items: Any) -> dict[str, InputSpec]:
    if not isinstance(items, list):
        _fail("inputs", "must be a list")
    inputs: dict[str, InputSpec] = {}
    for i, item in enumerate(items):
        where = f"inputs[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            _fail(where, "needs a 'name'")
        name, kind = item["name"], item.get("type")
        where = f"input {name!r}"
        if name in inputs:
            _fail(where, "is defined twice")
        if kind in IMAGE_INPUTS:
            inputs[name] = InputSpec(name, "image", (IMAGE_KIND,))
        elif kind in PARAMETER_INPUTS:
            kinds = item.get("kind") or ()
            inputs[name] = InputSpec(
                name, "parameter", tuple(_kind_names(kinds, where)), item.get("default_value"), "default_value" in item
            )
        elif kind in BATCH_INPUTS:
            inputs[name] = InputSpec(name, "batch", tuple(_kind_names(item.get("kind") or (), where)))
        else:
            _fail(
                where, f"unknown input type {kind!r} (expected WorkflowImage, WorkflowParameter or WorkflowBatchInput)"
            )
    return inputs


def _kind_names(kinds: Any, where: str) -> list[str]:
    kinds = [kinds] if isinstance(kinds, (str, dict)) else kinds
    names = []
    for k in kinds:
        name = k.get("name") if isinstance(k, dict) else k
        if not isinstance(name, str):
            _fail(where, f"kind {k!r} is not a kind name")
        names.append(name)
    return names


def _parse_step(i: int, item: Any) -> SegmentAnything2Manifest:
    if not isinstance(item, dict):
        _fail(f"steps[{i}]", "must be an object")
    name = item.get("name", f"steps[{i}]")
    if item.get("type") != STEP_TYPE:
        _fail(f"step {name!r}", f"unknown step type {item.get('type')!r} (this runner knows {STEP_TYPE})")
    try:
        return SegmentAnything2Manifest.model_validate(item)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"][:1]) or "?"
        message = _EXPECTED.get(loc, err["msg"]) if err["type"] != "extra_forbidden" else "is not a field of this step"
        if err["type"] == "missing":
            message = "is required"
        value = f" (got {err['input']!r})" if err["type"] not in ("missing", "extra_forbidden") else ""
        _fail(f"step {name!r}", f"field '{loc}' {message}{value}")


_EXPECTED = {
    "version": f"must be one of {', '.join(VERSIONS)}, or a $inputs.<name> selector",
    "threshold": "must be a number or a $inputs.<name> selector",
    "multimask_output": "must be true, false or a $inputs.<name> selector",
    "use_keypoints_as_points": "must be true, false or a $inputs.<name> selector",
}


def _order(steps: dict[str, SegmentAnything2Manifest]) -> list[SegmentAnything2Manifest]:
    """Steps in dependency order; a cycle is an error naming a step on it."""
    deps = {
        n: {m.group(1) for sel in (s.images, s.boxes) if sel and (m := STEP_SELECTOR.match(sel))}
        for n, s in steps.items()
    }
    done: list[str] = []
    visiting: set[str] = set()

    def visit(n: str) -> None:
        if n in done:
            return
        if n in visiting:
            _fail(f"step {n!r}", "is part of a dependency cycle")
        visiting.add(n)
        for d in sorted(deps[n]):
            visit(d)
        visiting.discard(n)
        done.append(n)

    for n in steps:
        visit(n)
    return [steps[n] for n in done]


def _check_data_selector(selector: str, where: str, want: tuple[str, ...], inputs, steps) -> None:
    """``selector`` must name an existing input or step output whose kind is one of ``want``."""
    if m := INPUT_SELECTOR.match(selector):
        spec = inputs.get(m.group(1))
        if spec is None:
            _fail(where, f"{selector} refers to an unknown input")
        if spec.type == "parameter":
            _fail(where, f"{selector} is a parameter, not a batch of {' or '.join(want)}")
        kinds = spec.kinds
    else:
        m = STEP_SELECTOR.match(selector)
        step = steps.get(m.group(1))
        if step is None:
            _fail(where, f"{selector} refers to an unknown step")
        outputs = step.outputs()
        if m.group(2) not in outputs:
            _fail(where, f"{selector}: step {m.group(1)!r} has no output {m.group(2)!r} (it has {', '.join(outputs)})")
        kinds = (outputs[m.group(2)],)
    if kinds and not set(kinds) & set(want):
        _fail(where, f"{selector} is of kind {', '.join(kinds)}, expected {' or '.join(want)}")


def _check_step(step: SegmentAnything2Manifest, inputs, steps) -> None:
    where = f"step {step.name!r}"
    _check_data_selector(step.images, f"{where}, field 'images'", (IMAGE_KIND,), inputs, steps)
    if step.boxes is not None:
        _check_data_selector(step.boxes, f"{where}, field 'boxes'", DETECTION_KINDS, inputs, steps)
    for name, value in step.parameters().items():
        if isinstance(value, str) and value.startswith("$"):
            spec = inputs.get(INPUT_SELECTOR.match(value).group(1))
            if spec is None or spec.type != "parameter":
                _fail(f"{where}, field '{name}'", f"{value} must refer to a WorkflowParameter input")
            if spec.kinds and not set(spec.kinds) & set(PARAMETER_KINDS[name]):
                _fail(f"{where}, field '{name}'", f"{value} is of kind {', '.join(spec.kinds)}")


def _parse_outputs(items: Any, inputs, steps) -> list[tuple[str, str]]:
    if not isinstance(items, list) or not items:
        _fail("outputs", "must be a non-empty list")
    outputs = []
    for i, item in enumerate(items):
        named = isinstance(item, dict) and isinstance(item.get("name"), str)
        if not named or not isinstance(item.get("selector"), str):
            _fail(f"outputs[{i}]", "needs a 'name' and a 'selector'")
        if item.get("type", "JsonField") != "JsonField":
            _fail(f"output {item['name']!r}", f"unknown output type {item.get('type')!r} (expected JsonField)")
        sel, where = item["selector"], f"output {item['name']!r}"
        if m := INPUT_SELECTOR.match(sel):
            if m.group(1) not in inputs:
                _fail(where, f"{sel} refers to an unknown input")
        elif m := STEP_SELECTOR.match(sel):
            if m.group(1) not in steps:
                _fail(where, f"{sel} refers to an unknown step")
            if m.group(2) != "*" and m.group(2) not in steps[m.group(1)].outputs():
                _fail(where, f"{sel}: step {m.group(1)!r} has no output {m.group(2)!r}")
        else:
            _fail(where, f"{sel!r} is not a selector")
        outputs.append((item["name"], sel))
    return outputs


def parse_definition(raw: Any) -> Definition:
    """Parse and fully validate a definition; raises ``WorkflowDefinitionError`` naming the place."""
    if not isinstance(raw, dict):
        _fail("definition", "must be a JSON object")
    inputs = _parse_inputs(raw.get("inputs", []))
    steps_raw = raw.get("steps", [])
    if not isinstance(steps_raw, list):
        _fail("steps", "must be a list")
    steps: dict[str, SegmentAnything2Manifest] = {}
    for i, item in enumerate(steps_raw):
        step = _parse_step(i, item)
        if step.name in steps:
            _fail(f"step {step.name!r}", "name is used twice")
        steps[step.name] = step
    for step in steps.values():
        _check_step(step, inputs, steps)
    ordered = _order(steps)
    outputs = _parse_outputs(raw.get("outputs"), inputs, steps)
    return Definition(inputs, ordered, outputs, raw)
