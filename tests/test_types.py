"""The engine's contracts (``sam2flow.engine.types``): every implementation honours its protocol.

``runtime_checkable`` protocols only check that the methods exist; these tests also hold each
method's parameters (names, order, defaults) to the protocol's, so a renamed or re-ordered
parameter in one engine fails here before a caller that passes it by name breaks.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from sam2flow.engine.automatic import AutomaticResult
from sam2flow.engine.cache import content_hash
from sam2flow.engine.engine import Sam2Engine
from sam2flow.engine.graph_engine import GraphEngine, GraphPool
from sam2flow.engine.pool import EnginePool
from sam2flow.engine.types import (
    EngineProvider,
    LowResDecoder,
    Prediction,
    ScoredMasks,
    SegmentingEngine,
)
from sam2flow.server.app import ServerState
from sam2flow.server.batching import BatchedEngine, EmbedBatcher, EmbeddingBatcher
from sam2flow.workflows.remote import RemoteEngine, RemoteMasks, RemotePool

from conftest import random_image

_PROTOCOL_ATTRS = {"__init__", "__class_getitem__", "__init_subclass__", "__subclasshook__", "__parameters__"}


def _methods(protocol) -> list[str]:
    return [n for n, v in vars(protocol).items() if callable(v) and n not in _PROTOCOL_ATTRS and not n.startswith("_")]


def honours(cls, protocol) -> list[str]:
    """What keeps ``cls``'s methods from accepting every call the protocol's methods accept."""
    problems = []
    for name in _methods(protocol):
        impl = getattr(cls, name, None)
        if impl is None:
            problems.append(f"{cls.__name__}.{name} is missing")
            continue
        want = list(inspect.signature(getattr(protocol, name)).parameters.values())
        got = list(inspect.signature(impl).parameters.values())
        for i, p in enumerate(want):
            q = got[i] if i < len(got) else None
            if q is None or q.name != p.name or q.kind != p.kind or q.default != p.default:
                problems.append(f"{cls.__name__}.{name}: parameter {i} is {q}, the protocol's is {p}")
        problems += [
            f"{cls.__name__}.{name}: extra parameter {q} has no default"
            for q in got[len(want) :]
            if q.default is inspect.Parameter.empty
        ]
    return problems


@pytest.mark.parametrize("cls", [Sam2Engine, GraphEngine, BatchedEngine, RemoteEngine])
def test_engines_honour_the_segmenting_engine_protocol(cls):
    assert honours(cls, SegmentingEngine) == []


@pytest.mark.parametrize("cls", [EnginePool, GraphPool, ServerState, RemotePool])
def test_providers_honour_the_engine_provider_protocol(cls):
    assert honours(cls, EngineProvider) == []


def test_batchers_and_the_low_res_decoder_honour_their_protocols():
    assert honours(EmbedBatcher, EmbeddingBatcher) == []
    assert honours(Sam2Engine, LowResDecoder) == []
    ray_serve = pytest.importorskip("sam2flow.scale.ray_serve")
    assert honours(ray_serve.ServeEmbedBatcher, EmbeddingBatcher) == []


def test_the_check_itself_catches_a_drifted_engine():
    class Drifted:
        def embed(self, images, use_cache):  # an extra parameter without default
            return []

        def predict_prompts(self, embedding, prompts, multimask=True):  # renamed
            return None

    problems = honours(Drifted, SegmentingEngine)
    assert any("embed: extra parameter" in p for p in problems)
    assert any("predict_prompts: parameter 3" in p for p in problems)
    assert any("automatic is missing" in p for p in problems)
    assert not isinstance(Drifted(), SegmentingEngine)


def test_results_are_scored_masks():
    masks, scores = np.zeros((1, 4, 5), bool), np.ones(1, np.float32)
    for result in (
        Prediction(masks, scores, np.zeros((1, 256, 256), np.float32)),
        RemoteMasks(masks, scores),
        AutomaticResult.empty((4, 5)),
    ):
        assert isinstance(result, ScoredMasks)


def test_image_id_is_the_content_hash_on_every_engine(tiny_engine):
    image = random_image(64, 80, seed=5)
    emb = tiny_engine.embed([image])[0]
    assert emb.image_id == content_hash(image)
    assert emb.key.endswith(emb.image_id) and emb.key != emb.image_id  # the key also names the model
    assert tiny_engine.embed([random_image(64, 80, seed=6)])[0].image_id != emb.image_id
