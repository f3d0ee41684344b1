"""sam2flow: Segment Anything 2 on images, as a production-grade step for vision pipelines."""

from .engine.cache import EmbeddingCache
from .engine.engine import ImageEmbedding, Prediction, Sam2Engine
from .engine.pool import EnginePool
from .engine.prompts import Prompt
from .engine.store import EmbeddingStore, StoreError
from .models.convert import CheckpointError
from .models.registry import FAMILIES, VERSIONS, get_spec
from .models.weights import load_model
from .workflows.definition import WorkflowDefinitionError, parse_definition
from .workflows.runner import run_workflow, serialize_outputs

__all__ = [
    "Sam2Engine",
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
