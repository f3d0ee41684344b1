"""Run workflow definitions: bind inputs, execute steps in order, collect and serialise outputs."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import supervision as sv

from ..engine.prompts import PromptBudget
from ..engine.types import AutomaticConfig, EngineProvider
from ..formats import detections_to_predictions
from ..images import ImageLoader
from .definition import Definition, WorkflowDefinitionError, parse_definition
from .inputs import detections_batch, image_batch
from .step import INPUT_SELECTOR, STEP_SELECTOR, StepParameters, segment_images

if TYPE_CHECKING:
    from ..engine.engine import Sam2Engine
    from ..engine.graph_engine import GraphEngine


def run_workflow(
    definition: Mapping | Definition,
    inputs: Mapping[str, Any],
    engines: EngineProvider | Sam2Engine | GraphEngine | None = None,
    automatic_config: AutomaticConfig | None = None,
    execution: str | None = None,
    api_url: str | None = None,
    api_key: str | None = None,
    image_loader: ImageLoader | None = None,
    budget: PromptBudget | None = None,
) -> list[dict[str, Any]]:
    """Run a workflow on a batch of images; one dict of outputs per image.

    ``inputs`` maps input names to values: images as numpy RGB arrays, paths, base64 strings or
    ``{"type", "value"}`` dicts (a list makes a batch); detections as ``sv.Detections`` or the
    JSON prediction format (one per image); parameters as plain values. Detection outputs are
    ``sv.Detections``; ``serialize_outputs`` turns results into JSON.

    ``engines``: where the step's engines come from: an ``EngineProvider`` (``get(version)``: an
    ``EnginePool``, the server's state, a ``GraphPool``), one ``Sam2Engine`` or ``GraphEngine`` (runs
    without torch), or ``None`` for a new ``EnginePool``.

    ``execution="remote"`` (or ``$SAM2FLOW_REMOTE_URL`` set, with ``execution`` left unset) sends
    the step's work to the sam2flow server at ``api_url`` (default ``$SAM2FLOW_REMOTE_URL``),
    with ``api_key`` (default ``$SAM2FLOW_API_KEY``); no model is loaded here.

    ``image_loader`` decodes each image input (default: every local form, see
    ``sam2flow.images.load_image``; the server passes its wire loader). ``budget`` bounds the
    prompts of the whole run (per image and in all): boxes bound from inputs are counted before any
    model work, boxes from an earlier step before the step that uses them.
    """
    engines = _engines_for(execution, api_url, api_key, engines)
    d = definition if isinstance(definition, Definition) else parse_definition(definition)
    pool = _provider(engines)
    unknown = sorted(set(inputs) - set(d.inputs))
    if unknown:
        raise ValueError(f"unknown workflow input(s): {', '.join(unknown)} (the definition has {', '.join(d.inputs)})")
    images = {
        n: image_batch(_required(inputs, n), f"input {n!r}", image_loader)
        for n, s in d.inputs.items()
        if s.type == "image"
    }
    batch = {len(v) for v in images.values()}
    if len(batch) > 1:
        raise ValueError(f"image inputs have different batch sizes: {sorted(batch)}")
    size = batch.pop() if batch else 1
    sizes = [im.shape[:2] for im in next(iter(images.values()))] if images else [(0, 0)] * size
    params = {n: inputs.get(n, s.default) for n, s in d.inputs.items() if s.type == "parameter"}
    for n, s in d.inputs.items():
        if s.type == "parameter" and n not in inputs and not s.has_default:
            raise ValueError(f"input {n!r} is required (the parameter has no default_value)")
    detections = {
        n: detections_batch(_required(inputs, n), sizes, f"input {n!r}")
        for n, s in d.inputs.items()
        if s.type == "batch"
    }

    budget = budget or PromptBudget()
    for step in d.steps:  # every prompt bound from the inputs, before any model work
        if step.boxes is not None and (m := INPUT_SELECTOR.match(step.boxes)):
            budget.take([len(x) for x in detections[m.group(1)]], f"step {step.name!r}")

    results: dict[str, list[sv.Detections]] = {}
    for step in d.steps:
        values = {
            k: params[INPUT_SELECTOR.match(v).group(1)] if isinstance(v, str) and v.startswith("$") else v
            for k, v in step.parameters().items()
        }
        try:
            p = StepParameters(**values)
        except ValueError as e:
            raise ValueError(f"step {step.name!r}: {e}") from None
        name = INPUT_SELECTOR.match(step.images).group(1)
        boxes = None
        if step.boxes is not None:
            m = INPUT_SELECTOR.match(step.boxes)
            if m:
                boxes = detections[m.group(1)]
            else:
                boxes = results[STEP_SELECTOR.match(step.boxes).group(1)]
                budget.take([len(x) for x in boxes], f"step {step.name!r}")
        results[step.name] = segment_images(
            pool.get(p.version), images[name], [name] * size, boxes, p, automatic_config
        )
    return [{out: _select(sel, i, inputs, params, results) for out, sel in d.outputs} for i in range(size)]


def _provider(engines: EngineProvider | Sam2Engine | None) -> EngineProvider:
    """The step's engines by version. torch is imported only where a ``Sam2Engine`` is made or given,
    so a ``GraphEngine`` (or its ``GraphPool``) runs a workflow in a process without torch."""
    if isinstance(engines, EngineProvider):
        return engines
    graphs = sys.modules.get("sam2flow.engine.graph_engine")  # not imported: not a GraphEngine
    if graphs is not None and isinstance(engines, graphs.GraphEngine):
        return graphs.GraphPool(engines)
    if engines is not None:
        engine_module = sys.modules.get("sam2flow.engine.engine")  # not imported: not a Sam2Engine
        if engine_module is None or not isinstance(engines, engine_module.Sam2Engine):
            raise ValueError(
                "engines must be an EngineProvider (get(version)), a Sam2Engine, a GraphEngine or None, "
                f"got {type(engines).__name__}"
            )
    from ..engine.pool import EnginePool

    return EnginePool() if engines is None else EnginePool.of(engines)


def _engines_for(
    execution: str | None, api_url: str | None, api_key: str | None, engines: EngineProvider | Sam2Engine | None
) -> EngineProvider | Sam2Engine | None:
    remote_url = api_url or os.environ.get("SAM2FLOW_REMOTE_URL")
    execution = execution or ("remote" if remote_url and engines is None else "local")
    if execution == "local":
        return engines
    if execution != "remote":
        raise ValueError(f"execution must be 'local' or 'remote', got {execution!r}")
    if not remote_url:
        raise ValueError("remote execution needs api_url (or $SAM2FLOW_REMOTE_URL)")
    from .remote import RemotePool

    return RemotePool(remote_url, api_key or os.environ.get("SAM2FLOW_API_KEY"))


def _required(inputs: Mapping[str, Any], name: str) -> Any:
    if name not in inputs:
        raise ValueError(f"input {name!r} is required")
    return inputs[name]


def _select(selector: str, i: int, inputs, params, results) -> Any:
    if m := STEP_SELECTOR.match(selector):
        step, output = m.groups()
        return {"predictions": results[step][i]} if output == "*" else results[step][i]
    name = INPUT_SELECTOR.match(selector).group(1)
    if name in params:
        return params[name]
    value = inputs[name]
    return value[i] if isinstance(value, (list, tuple)) else value


def serialize_value(value: Any, mask_format: str = "polygon") -> Any:
    """JSON-ready form of an output value: detections become ``{"image", "predictions"}``."""
    if isinstance(value, sv.Detections):
        h, w = _image_hw(value)
        return {"image": {"width": w, "height": h}, "predictions": detections_to_predictions(value, mask_format)}
    if isinstance(value, dict):
        return {k: serialize_value(v, mask_format) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def serialize_outputs(results: list[dict[str, Any]], mask_format: str = "polygon") -> list[dict[str, Any]]:
    """``run_workflow`` results as JSON-ready dicts (polygons by default, ``"rle"`` for COCO RLE)."""
    return [{k: serialize_value(v, mask_format) for k, v in r.items()} for r in results]


def _image_hw(detections: sv.Detections) -> tuple[int, int]:
    if detections.mask is not None and np.asarray(detections.mask).ndim == 3:
        return tuple(int(v) for v in np.asarray(detections.mask).shape[1:])
    dims = detections.data.get("image_dimensions")
    if dims is not None and len(dims):
        return int(dims[0][0]), int(dims[0][1])
    raise WorkflowDefinitionError("detections without masks or image_dimensions cannot be serialised")
