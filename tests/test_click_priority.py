"""Clicks go ahead of images: a decode on a cached embedding never waits for an encoder forward.

Checked with events, not timings: the encoder is held inside its forward by a hook until the test
lets it go, and the decode must answer (the same masks as before) while it is held.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from tests.conftest import random_image

from sam2flow import Prompt

GUARD_S = 120  # only against a hang: a correct engine answers long before


def _prompts():
    return [Prompt(points=[[200, 150], [260, 180]], labels=[1, 0]), Prompt(box=[40, 30, 250, 200])]


def test_decode_answers_while_an_embed_is_held_mid_forward(tiny_engine):
    engine = tiny_engine
    image = random_image(240, 320, seed=7)
    emb = engine.embed([image])[0]
    before = engine.predict_prompts(emb, _prompts())
    started, release, decoded = threading.Event(), threading.Event(), threading.Event()
    embedded, answers = [], []

    def hold(*_):
        started.set()
        release.wait(GUARD_S)

    handle = engine.model.vision_encoder.backbone.blocks[3].register_forward_pre_hook(hold)
    batch = [image] + [random_image(240, 320, seed=s) for s in range(8, 8 + engine.max_batch_size - 1)]
    embedder = threading.Thread(target=lambda: embedded.append(engine.embed(batch, use_cache=False)))

    def decode():
        answers.append(engine.predict_prompts(emb, _prompts()))
        decoded.set()

    try:
        embedder.start()
        assert started.wait(GUARD_S), "the embed never reached the encoder"
        threading.Thread(target=decode, daemon=True).start()
        assert decoded.wait(GUARD_S), "the decode waited for the encoder forward"
        assert not embedded, "the embed finished before the decode: nothing was checked"
    finally:
        release.set()
        embedder.join(GUARD_S)
        handle.remove()
    after = answers[0]
    np.testing.assert_array_equal(after.masks, before.masks)
    np.testing.assert_array_equal(after.scores, before.scores)
    np.testing.assert_array_equal(after.low_res_logits, before.low_res_logits)
    # the held embed's result is the cached embedding of the same image, bit for bit
    np.testing.assert_array_equal(embedded[0][0].image_embed.numpy(), emb.image_embed.numpy())


def test_encoder_pauses_at_a_block_while_a_decode_runs(tiny_engine):
    engine = tiny_engine
    gate = engine._decode_first
    entered = threading.Event()
    handle = engine.model.vision_encoder.backbone.blocks[0].register_forward_pre_hook(lambda *_: entered.set())
    done = []
    embedder = threading.Thread(
        target=lambda: done.append(engine.embed([random_image(96, 128, seed=3)], use_cache=False))
    )
    try:
        with gate.decoding():
            embedder.start()
            deadline = time.monotonic() + GUARD_S
            while gate.paused == 0 and embedder.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert gate.paused == 1, "the encoder did not pause for the running decode"
            assert not entered.is_set() and not done
        embedder.join(GUARD_S)
    finally:
        handle.remove()
    assert entered.is_set() and done and gate.paused == 0


def test_encoder_pauses_inside_a_global_attention(tiny_engine):
    """A click arriving while a global attention runs (4096 query rows at 1024², ~200 ms on 2 cores)
    gets the cores before that attention's rows are done: the rows go in chunks with a pause between."""
    engine = tiny_engine
    gate = engine._decode_first
    block = next(b for b in engine.model.vision_encoder.backbone.blocks if b.window_size == 0)
    image = random_image(96, 128, seed=4)
    expected = engine.embed([image], use_cache=False)[0]
    clicked, release, reached_proj = threading.Event(), threading.Event(), threading.Event()

    def click_arrives(*_):  # inside the attention, after q/k/v, before any row is attended
        if not clicked.is_set():
            threading.Thread(target=lambda: _hold_decode(gate, clicked, release), daemon=True).start()
            clicked.wait(GUARD_S)

    handles = [
        block.attn.qkv.register_forward_hook(click_arrives),
        block.attn.proj.register_forward_pre_hook(lambda *_: reached_proj.set(), prepend=True),
    ]
    done = []
    embedder = threading.Thread(target=lambda: done.append(engine.embed([image], use_cache=False)))
    try:
        embedder.start()
        deadline = time.monotonic() + GUARD_S
        while gate.paused == 0 and embedder.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gate.paused == 1, "the encoder did not pause for the click"
        assert not reached_proj.is_set(), "the encoder paused only after the attention's rows were done"
    finally:
        release.set()
        embedder.join(GUARD_S)
        for h in handles:
            h.remove()
    assert done and gate.paused == 0
    np.testing.assert_array_equal(done[0][0].image_embed.numpy(), expected.image_embed.numpy())


def _hold_decode(gate, started: threading.Event, release: threading.Event) -> None:
    with gate.decoding():
        started.set()
        release.wait(GUARD_S)
