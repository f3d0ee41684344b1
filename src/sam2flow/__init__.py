"""sam2flow: Segment Anything 2 on images, production-grade step for vision pipelines.

The public names load their modules on first use, so ``import sam2flow.workflows`` (or
``sam2flow.GraphEngine``) does not import torch: a process that runs exported OpenVINO graphs
never loads it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Before anything loads torch: ``sam2flow.engine`` sets libgomp's wait policy on import (engine/threads.py).
from . import engine as engine

# name → the module that defines it (one home each)
_EXPORTS = {
    "Sam2Engine": "sam2flow.engine.engine",
    "GraphEngine": "sam2flow.engine.graph_engine",
    "GraphPool": "sam2flow.engine.graph_engine",
    "export_graphs": "sam2flow.engine.graphs",
    "ImageEmbedding": "sam2flow.engine.types",
    "Prediction": "sam2flow.engine.types",
    "Prompt": "sam2flow.engine.types",
    "EmbeddingCache": "sam2flow.engine.cache",
    "EmbeddingStore": "sam2flow.engine.store",
    "StoreError": "sam2flow.engine.store",
    "CheckpointError": "sam2flow.models.convert",
    "load_model": "sam2flow.models.weights",
    "get_spec": "sam2flow.models.registry",
    "VERSIONS": "sam2flow.models.registry",
    "FAMILIES": "sam2flow.models.registry",
    "EnginePool": "sam2flow.engine.pool",
    "run_workflow": "sam2flow.workflows.runner",
    "serialize_outputs": "sam2flow.workflows.runner",
    "parse_definition": "sam2flow.workflows.definition",
    "WorkflowDefinitionError": "sam2flow.workflows.definition",
}
__all__ = [
    "Sam2Engine",
    "GraphEngine",
    "GraphPool",
    "export_graphs",
    "ImageEmbedding",
    "Prediction",
    "Prompt",
    "EmbeddingCache",
    "EmbeddingStore",
    "StoreError",
    "CheckpointError",
    "load_model",
    "get_spec",
    "VERSIONS",
    "FAMILIES",
    "EnginePool",
    "run_workflow",
    "serialize_outputs",
    "parse_definition",
    "WorkflowDefinitionError",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .engine.cache import EmbeddingCache
    from .engine.engine import Sam2Engine
    from .engine.graph_engine import GraphEngine, GraphPool
    from .engine.graphs import export_graphs
    from .engine.pool import EnginePool
    from .engine.store import EmbeddingStore, StoreError
    from .engine.types import ImageEmbedding, Prediction, Prompt
    from .models.convert import CheckpointError
    from .models.registry import FAMILIES, VERSIONS, get_spec
    from .models.weights import load_model
    from .workflows.definition import (
        WorkflowDefinitionError,
        parse_definition,
    )
    from .workflows.runner import run_workflow, serialize_outputs


def __getattr__(name: str):
    """Load a public name's module on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sam2flow' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
