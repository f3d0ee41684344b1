"""EmbeddingCache on its own (LRU by count and bytes, counters, threads) and inside Sam2Engine."""

from __future__ import annotations

import random
import sys
import threading

import numpy as np
import pytest
import torch

from sam2flow import EmbeddingCache, Sam2Engine

from conftest import random_image

# ---- the cache itself -----------------------------------------------------------------------


def test_evicts_least_recently_used_by_count():
    cache = EmbeddingCache(max_entries=3, size_of=len)
    for k in "abc":
        cache.put(k, k.encode())
    assert cache.get("a") == b"a"  # a is now the most recently used
    cache.put("d", b"d")
    assert "b" not in cache
    assert [k in cache for k in "acd"] == [True, True, True]
    cache.put("e", b"e")
    assert "c" not in cache and "a" in cache
    assert len(cache) == 3


def test_put_refreshes_recency_and_size():
    cache = EmbeddingCache(max_entries=2, max_bytes=100, size_of=len)
    cache.put("a", b"1")
    cache.put("b", b"2")
    cache.put("a", b"12345")  # replaces a and makes it the most recent
    assert cache.nbytes == 6 and len(cache) == 2
    cache.put("c", b"3")
    assert "b" not in cache and cache.get("a") == b"12345"


def test_evicts_by_bytes_in_lru_order():
    cache = EmbeddingCache(max_entries=100, max_bytes=10, size_of=len)
    cache.put("a", b"aaaa")
    cache.put("b", b"bbbb")
    assert cache.nbytes == 8
    cache.put("c", b"cccc")  # 12 > 10: a goes
    assert "a" not in cache and cache.nbytes == 8
    cache.get("b")
    cache.put("d", b"dddd")  # b was read after c: c goes
    assert "c" not in cache and "b" in cache and "d" in cache
    cache.put("e", b"eeeeeeeeee")  # exactly the bound: everything else goes
    assert len(cache) == 1 and cache.nbytes == 10


def test_refuses_an_item_larger_than_the_bound():
    cache = EmbeddingCache(max_entries=10, max_bytes=10, size_of=len)
    cache.put("a", b"aaa")
    cache.put("big", b"x" * 11)
    assert "big" not in cache
    assert cache.get("a") == b"aaa" and cache.nbytes == 3  # nothing was evicted for it
    cache.put("a", b"y" * 11)  # replacing with an oversized value leaves no stale copy
    assert cache.get("a") is None and cache.nbytes == 0 and len(cache) == 0


def test_zero_entries_stores_nothing_and_bad_bounds():
    cache = EmbeddingCache(max_entries=0, size_of=len)
    cache.put("a", b"a")
    assert len(cache) == 0 and cache.get("a") is None
    with pytest.raises(ValueError):
        EmbeddingCache(max_entries=-1)
    with pytest.raises(ValueError):
        EmbeddingCache(max_bytes=-1)


def test_counts_hits_and_misses_and_clears():
    cache = EmbeddingCache(max_entries=4)  # default size: the value's nbytes
    cache.put("a", np.zeros(10, np.float32))
    assert cache.nbytes == 40
    assert cache.get("a") is not None
    assert cache.get("a") is not None
    assert cache.get("zzz") is None
    assert (cache.hits, cache.misses) == (2, 1)
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0 and cache.get("a") is None
    assert cache.misses == 2


def test_thread_safety():
    max_entries, max_bytes, n_threads, n_ops = 8, 64, 8, 3000
    cache = EmbeddingCache(max_entries=max_entries, max_bytes=max_bytes, size_of=len)
    gets = [0] * n_threads
    errors: list[str] = []
    start = threading.Barrier(n_threads + 1)
    stop = threading.Event()

    def worker(t):
        rng = random.Random(t)
        start.wait()
        try:
            for _ in range(n_ops):
                key = rng.randrange(40)
                if rng.random() < 0.5:
                    cache.put(key, bytes([key]) * rng.randint(1, 20))
                else:
                    gets[t] += 1
                    value = cache.get(key)
                    if value is not None and set(value) != {key}:
                        errors.append(f"key {key} returned another key's value")
        except Exception as e:  # noqa: BLE001 - a broken cache may raise from its own internals
            errors.append(f"thread {t}: {type(e).__name__}: {e}")

    def watcher():
        start.wait()
        while not stop.is_set():
            if len(cache) > max_entries or cache.nbytes > max_bytes:
                errors.append(f"bound exceeded: {len(cache)} entries, {cache.nbytes} bytes")

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        watch = threading.Thread(target=watcher)
        for th in [*threads, watch]:
            th.start()
        for th in threads:
            th.join()
        stop.set()
        watch.join()
    finally:
        sys.setswitchinterval(old)

    assert not errors, errors[:5]
    assert cache.hits + cache.misses == sum(gets)
    assert 0 < len(cache) <= max_entries
    stored = {k: v for k in range(40) if (v := cache.get(k)) is not None}
    assert len(stored) == len(cache)
    assert cache.nbytes == sum(len(v) for v in stored.values()) <= max_bytes


# ---- the cache in the engine ----------------------------------------------------------------

IMAGE = random_image(120, 160, seed=21)  # shared with test_inputs / test_loading
OTHER = random_image(96, 128, seed=22)
BOX = np.array([[10, 12, 110, 100]], np.float32)

_ENCODED: dict[str, object] = {}  # real embeddings, computed once per image for this module


@pytest.fixture
def make_engine(tiny_engine, monkeypatch):
    """Engines on the tiny model with their own cache; ``engine.encoded`` lists each encoder call.

    The encoder call is recorded, then served by the real encoder (memoised across this module's
    tests by key so that each image is encoded once): what the engine asks for is what is tested.
    """

    def make(**cache_kwargs):
        engine = Sam2Engine(
            tiny_engine.model, tiny_engine.spec, device="cpu", dtype="float32", cache=EmbeddingCache(**cache_kwargs)
        )
        engine.encoded = []
        real = engine._embed_batch

        def counting(keys, images):
            engine.encoded.append(list(keys))
            todo = [(k, im) for k, im in zip(keys, images) if k not in _ENCODED]
            if todo:
                for emb in real([k for k, _ in todo], [im for _, im in todo]):
                    _ENCODED[emb.key] = emb
            return [_ENCODED[k] for k in keys]

        monkeypatch.setattr(engine, "_embed_batch", counting)
        return engine

    return make


def _same_prediction(a, b):
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.low_res_logits, b.low_res_logits)


def test_same_image_twice_hits(make_engine):
    engine = make_engine()
    first = engine.embed([IMAGE])[0]
    assert len(engine.encoded) == 1 and (engine.cache.hits, engine.cache.misses) == (0, 1)
    second = engine.embed([IMAGE.copy()])[0]  # equal content, another array
    assert len(engine.encoded) == 1, "the encoder ran again for a cached image"
    assert (engine.cache.hits, engine.cache.misses) == (1, 1)
    assert second.key == first.key and torch.equal(second.image_embed, first.image_embed)
    _same_prediction(engine.predict(first, boxes=BOX), engine.predict(second, boxes=BOX))
    # segment() goes through the same cache.
    engine.segment(IMAGE, boxes=BOX)
    assert len(engine.encoded) == 1 and engine.cache.hits == 2


def test_duplicates_in_one_call_are_encoded_once(make_engine):
    engine = make_engine()
    embs = engine.embed([IMAGE, IMAGE.copy(), np.asfortranarray(IMAGE)])
    assert [len(keys) for keys in engine.encoded] == [1]
    assert len({e.key for e in embs}) == 1 and len(engine.cache) == 1
    assert all(e.original_size == IMAGE.shape[:2] for e in embs)


def test_different_image_misses(make_engine):
    engine = make_engine()
    engine.embed([IMAGE])
    changed = IMAGE.copy()
    changed[60, 80, 1] ^= 1  # one bit of one pixel
    for image in (OTHER, changed):
        emb = engine.embed([image])[0]
        assert emb.original_size == image.shape[:2]
    assert len(engine.encoded) == 3 and engine.cache.hits == 0 and engine.cache.misses == 3
    assert len(engine.cache) == 3
    # A mixed call: cached images are served, only the new one is encoded.
    third = random_image(64, 64, seed=23)
    engine.embed([OTHER, third, IMAGE])
    assert len(engine.encoded[-1]) == 1 and engine.cache.hits == 2


def test_use_cache_false_bypasses(make_engine):
    engine = make_engine()
    cached = engine.embed([IMAGE])[0]
    counts = (engine.cache.hits, engine.cache.misses)
    fresh = engine.embed([IMAGE], use_cache=False)[0]
    assert len(engine.encoded) == 2, "use_cache=False read the cache"
    assert (engine.cache.hits, engine.cache.misses) == counts
    assert fresh.key == cached.key
    engine.embed([OTHER], use_cache=False)
    assert len(engine.encoded) == 3 and len(engine.cache) == 1, "use_cache=False wrote the cache"
    assert (engine.cache.hits, engine.cache.misses) == counts


def test_engine_byte_bound_evicts(make_engine, tiny_engine):
    one = tiny_engine.embed([IMAGE])[0].nbytes
    assert one > 10 << 20  # ~16 MB of float32 features: worth bounding
    engine = make_engine(max_bytes=int(1.5 * one))
    a = engine.embed([IMAGE])[0]
    b = engine.embed([OTHER])[0]
    assert len(engine.cache) == 1 and engine.cache.nbytes == b.nbytes <= engine.cache.max_bytes
    assert b.key in engine.cache and a.key not in engine.cache
    engine.embed([IMAGE])
    assert len(engine.encoded) == 3, "an evicted image must be encoded again"

    # A bound below one embedding caches nothing, and still works.
    engine = make_engine(max_bytes=one - 1)
    for _ in range(2):
        engine.embed([IMAGE])
    assert len(engine.encoded) == 2 and len(engine.cache) == 0 and engine.cache.nbytes == 0


def test_engine_count_bound_evicts_lru(make_engine):
    engine = make_engine(max_entries=2)
    third = random_image(64, 64, seed=23)
    engine.embed([IMAGE])
    engine.embed([OTHER])
    engine.embed([IMAGE])  # hit: IMAGE is now the most recent
    engine.embed([third])  # evicts OTHER
    assert len(engine.encoded) == 3
    engine.embed([IMAGE])
    assert len(engine.encoded) == 3
    engine.embed([OTHER])
    assert len(engine.encoded) == 4


def test_shared_cache_across_threads(make_engine):
    """Several threads on one engine and cache: same results as one thread, bounds kept."""
    engine = make_engine(max_entries=2)
    images = [IMAGE, OTHER, random_image(64, 64, seed=23)]
    expected = [engine.predict(engine.embed([im])[0], boxes=[[5, 5, 50, 40]]) for im in images]
    results: dict[tuple[int, int], object] = {}
    errors: list[BaseException] = []

    def worker(t):
        try:
            for r in range(3):
                i = (t + r) % len(images)
                emb = engine.embed([images[i]])[0]
                results[(t, r)] = (i, engine.predict(emb, boxes=[[5, 5, 50, 40]]))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(results) == 12 and len(engine.cache) <= 2
    for i, pred in results.values():
        _same_prediction(pred, expected[i])


def test_engines_with_different_weights_share_a_cache_safely(tiny_engine):
    """Same size, different checkpoint (a fine-tune, say): one shared cache, no mixed embeddings."""
    import copy

    tuned = copy.deepcopy(tiny_engine.model)
    with torch.no_grad():  # a fine-tune that changed one element of one trunk block
        tuned.vision_encoder.backbone.blocks[5].mlp.proj_out.weight[3, 7] += 0.5
    other = Sam2Engine(tuned, tiny_engine.spec, device="cpu", dtype="float32", cache=tiny_engine.cache)
    image = random_image(96, 128, seed=21)
    a = tiny_engine.embed([image])[0]
    b = other.embed([image])[0]
    assert a.key != b.key
    assert not torch.allclose(a.image_embed, b.image_embed)
    assert tiny_engine.embed([image])[0] is a  # each engine still hits its own entry


def test_fingerprint_changes_with_any_weight(tiny_engine):
    """One element of any parameter or buffer changes the fingerprint (a sample across the network,
    from every top-level module, plus the first and last tensors)."""
    import copy

    from sam2flow.engine.engine import weights_fingerprint

    model = copy.deepcopy(tiny_engine.model)
    base = weights_fingerprint(model)
    assert weights_fingerprint(copy.deepcopy(model)) == base  # a copy hashes the same
    state = model.state_dict()
    names = sorted(state)
    rng = np.random.default_rng(0)
    picks = {names[0], names[-1], *rng.choice(names, 10, replace=False)}
    for prefix in ("vision_encoder.backbone.", "vision_encoder.neck.", "prompt_encoder.", "mask_decoder."):
        picks.add(next(n for n in names if n.startswith(prefix) and state[n].numel() > 1))
    with torch.no_grad():
        for name in sorted(picks):
            t = state[name]
            if not t.dtype.is_floating_point:
                continue
            flat = t.view(-1)
            i = int(rng.integers(flat.numel()))
            old = flat[i].clone()
            flat[i] = old + 1e-3 * (1 + old.abs())
            assert weights_fingerprint(model) != base, name
            flat[i] = old
    assert weights_fingerprint(model) == base
