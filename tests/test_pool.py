"""EnginePool: lazy loading per version, one load under concurrency, LRU bound on resident models."""

from __future__ import annotations

import threading

import pytest

from sam2flow import EnginePool, Sam2Engine


def test_lazy_lru_and_single_load(make_checkpoint, monkeypatch):
    checkpoints = {"hiera_tiny": str(make_checkpoint("hiera_tiny")), "hiera_small": str(make_checkpoint("hiera_small"))}
    loads = []
    original = Sam2Engine.from_pretrained.__func__

    def counting(cls, version="hiera_tiny", *args, **kwargs):
        loads.append(version)
        return original(cls, version, *args, **kwargs)

    monkeypatch.setattr(Sam2Engine, "from_pretrained", classmethod(counting))
    pool = EnginePool(device="cpu", checkpoints=checkpoints, max_resident=1)
    assert pool.resident == [] and loads == []  # nothing loads before it is asked for
    threads = [threading.Thread(target=pool.get, args=("hiera_tiny",)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == ["hiera_tiny"] and pool.resident == ["hiera_tiny"]
    tiny = pool.get("hiera_tiny")
    small = pool.get("hiera_small")
    assert small.spec.version == "hiera_small" and small.cache is tiny.cache  # one shared cache
    assert pool.resident == ["hiera_small"]  # the bound evicted the least recently used
    pool.get("hiera_tiny")
    assert loads == ["hiera_tiny", "hiera_small", "hiera_tiny"]


def test_bad_pool_arguments():
    with pytest.raises(ValueError, match="max_resident"):
        EnginePool(max_resident=0)
    with pytest.raises(ValueError, match="hiera_huge"):
        EnginePool(checkpoints={"hiera_huge": "x.pt"})
    with pytest.raises(ValueError, match="family"):
        EnginePool(family="sam3")


def test_loaded_finds_a_resident_engine_without_loading_and_marks_it_used(make_checkpoint, monkeypatch):
    """What a server's event loop calls: no load ever, and a model in use is not the one evicted."""
    checkpoints = {"hiera_tiny": str(make_checkpoint("hiera_tiny")), "hiera_small": str(make_checkpoint("hiera_small"))}
    pool = EnginePool(device="cpu", checkpoints=checkpoints, max_resident=2)
    assert pool.loaded("hiera_tiny") is None and pool.resident == []
    tiny = pool.get("hiera_tiny")
    pool.get("hiera_small")
    assert pool.resident == ["hiera_tiny", "hiera_small"]  # least recently used first
    assert pool.loaded("hiera_tiny") is tiny
    assert pool.resident == ["hiera_small", "hiera_tiny"]
    assert pool.loaded("hiera_b_plus") is None and len(pool.resident) == 2
