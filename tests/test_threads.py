"""libgomp gets our waiting policy when sam2flow is imported before torch, and an interactive engine
runs all its torch work on one thread.

Why (engine/threads.py): with a second OpenMP team in the process, libgomp's default makes idle
team threads sleep between kernels, which cost a click's decode ~20 ms on 2 cores; each thread that
runs torch kernels keeps a team of its own, so a server's engine works on one thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from tests.conftest import random_image

from sam2flow import Prompt, Sam2Engine
from sam2flow.engine.store import EmbeddingStore
from sam2flow.engine.threads import CLICK_SPIN_S, OPENMP_ENV, SPIN_AFTER_S, ComputeThread, compute_thread


def _libgomp_settings(code: str, **env: str) -> str:
    """What libgomp reports it runs with (``OMP_DISPLAY_ENV``) in a fresh interpreter running ``code``."""
    clean = {k: v for k, v in os.environ.items() if k not in OPENMP_ENV}  # this process set them already
    done = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env, "OMP_DISPLAY_ENV": "VERBOSE"}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


RUN_TORCH = "import torch; torch.ones(4).add(1)"


def test_importing_sam2flow_first_sets_libgomps_wait_policy():
    shown = _libgomp_settings(f"import sam2flow; {RUN_TORCH}")
    for name, value in OPENMP_ENV.items():
        assert f"{name} = '{value}'" in shown


def test_a_users_own_openmp_settings_are_kept():
    shown = _libgomp_settings(f"import sam2flow; {RUN_TORCH}", OMP_WAIT_POLICY="PASSIVE")
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in shown
    assert f"GOMP_SPINCOUNT = '{OPENMP_ENV['GOMP_SPINCOUNT']}'" not in shown


def test_torch_imported_first_is_left_alone():
    """libgomp read its settings when torch loaded: changing the environment then would only mislead."""
    code = f"{RUN_TORCH}; import os, sam2flow; assert 'OMP_WAIT_POLICY' not in os.environ"
    assert "OMP_WAIT_POLICY = 'ACTIVE'" not in _libgomp_settings(code)


# ---- one compute thread for an interactive engine ------------------------------------------------

GUARD_S = 120  # only against a hang


def test_compute_thread_runs_jobs_urgent_first_and_hands_back_errors():
    compute = ComputeThread("test-compute")
    started, release, order = threading.Event(), threading.Event(), []

    def hold():
        started.set()
        release.wait(GUARD_S)

    def submit(tag, urgent):
        t = threading.Thread(target=lambda: compute.call(order.append, tag, urgent=urgent))
        t.start()
        return t

    first = threading.Thread(target=lambda: compute.call(hold))
    first.start()
    assert started.wait(GUARD_S)
    waiting = [submit("embed", False)]
    _wait_for(lambda: compute.queued == 1)
    waiting.append(submit("click", True))
    _wait_for(lambda: compute.queued == 2)
    release.set()
    for t in [first, *waiting]:
        t.join(GUARD_S)
    assert order == ["click", "embed"]
    with pytest.raises(ValueError, match="bad prompt"):
        compute.call(_raise, ValueError("bad prompt"))
    # a call made on the thread itself runs at once instead of queueing behind its caller
    assert compute.call(lambda: compute.call(lambda: threading.current_thread().name)) == "test-compute"


def test_after_a_click_the_compute_thread_keeps_its_cpu_busy_for_spin_s_then_sleeps():
    """An idle CPU answers the next click slowly on the VMs measured (engine/threads.py): after an
    urgent job the thread polls for ``spin_s``, using CPU; after other jobs, and after the window, none."""
    compute = ComputeThread("test-spin", spin_s=0.6)
    clock = time.pthread_getcpuclockid(compute.call(threading.get_ident))

    def cpu_while_idle(seconds: float) -> float:
        before = time.clock_gettime(clock)
        time.sleep(seconds)
        return time.clock_gettime(clock) - before

    compute.call(int)  # an embed, say: the thread sleeps at once
    assert cpu_while_idle(0.3) < 0.05
    compute.call(int, urgent=True)  # a click
    time.sleep(SPIN_AFTER_S)
    assert cpu_while_idle(0.3) > 0.1
    # a job arriving meanwhile runs on the thread, and the window still ends
    assert compute.call(lambda: threading.current_thread().name) == "test-spin"
    time.sleep(0.5)
    assert cpu_while_idle(0.3) < 0.05


def test_a_server_sets_the_click_spin_of_its_compute_thread(monkeypatch):
    from pydantic import ValidationError

    from sam2flow.server.app import create_app
    from sam2flow.server.settings import ServerSettings

    monkeypatch.setattr(compute_thread(), "spin_s", 0.0)  # restored after the test
    create_app(ServerSettings(click_spin_ms=250))
    assert compute_thread().spin_s == 0.25
    monkeypatch.delenv("SAM2FLOW_CLICK_SPIN_MS")
    assert ServerSettings().click_spin_ms == 1000 * CLICK_SPIN_S  # the default outside the test suite
    with pytest.raises(ValidationError, match="click_spin_ms"):
        ServerSettings(click_spin_ms=-1)


def test_an_interactive_engine_does_all_its_torch_work_on_one_thread(tiny_checkpoint, tmp_path):
    """Embeds and clicks from several threads all run on the compute thread (libgomp: one team), and
    give the answers an engine running in its callers' threads gives."""
    kw = dict(checkpoint=str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch")
    plain = Sam2Engine.from_pretrained("hiera_tiny", **kw)
    engine = Sam2Engine.from_pretrained("hiera_tiny", **kw, interactive=True)
    ran_on = set()
    record = lambda *_: ran_on.add(threading.get_ident())  # noqa: E731
    handles = [
        engine.model.vision_encoder.backbone.blocks[0].register_forward_pre_hook(record),
        engine.model.prompt_encoder.register_forward_pre_hook(record),
    ]
    images = [random_image(120, 160, seed=s) for s in (61, 62, 63)]
    prompt = [Prompt(points=[[80, 60], [20, 20]], labels=[1, 0]), Prompt(box=[30, 20, 120, 100])]
    callers, answers = set(), {}

    def work(i):
        callers.add(threading.get_ident())
        emb = engine.embed([images[i]], use_cache=False)[0]
        answers[i] = engine.predict_prompts(emb, prompt)

    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(GUARD_S)
    finally:
        for h in handles:
            h.remove()
    assert ran_on == {compute_thread()._thread.ident} and not ran_on & callers
    for i, image in enumerate(images):
        want = plain.predict_prompts(plain.embed([image])[0], prompt)
        np.testing.assert_array_equal(answers[i].masks, want.masks)
        np.testing.assert_array_equal(answers[i].low_res_logits, want.low_res_logits)
    # an embedding store's writes and reads (float16 ↔ float32 conversions) run there too
    store = engine.store = EmbeddingStore(tmp_path, writable=True)
    for name in ("put", "get"):
        method = getattr(store, name)
        setattr(store, name, lambda *a, m=method: (record(), m(*a))[1])
    ran_on.clear()
    for _ in ("written", "read"):
        t = threading.Thread(target=lambda: engine.embed([images[0]], use_cache=False))
        t.start()
        t.join(GUARD_S)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1
    assert ran_on == {compute_thread()._thread.ident}


def test_submit_click_runs_on_the_compute_thread_and_its_future_hands_back_the_answer(tiny_checkpoint):
    """What a server's event loop awaits (``asyncio.wrap_future``) with no worker thread between."""
    kw = dict(checkpoint=str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch")
    plain = Sam2Engine.from_pretrained("hiera_tiny", **kw)
    engine = Sam2Engine.from_pretrained("hiera_tiny", **kw, interactive=True)
    image, prompt = random_image(120, 160, seed=64), [Prompt(points=[[80, 60]], labels=[1])]
    emb = engine.embed([image])[0]

    def click():
        return threading.current_thread().name, engine.predict_prompts(emb, prompt)

    name, answer = engine.submit_click(click).result(GUARD_S)
    assert name == compute_thread()._thread.name
    want = plain.predict_prompts(plain.embed([image])[0], prompt)
    np.testing.assert_array_equal(answer.masks, want.masks)
    with pytest.raises(ValueError, match="bad prompt"):
        engine.submit_click(_raise, ValueError("bad prompt")).result(GUARD_S)
    # a non-interactive engine runs it in its caller and hands back a finished future
    done = plain.submit_click(lambda: threading.current_thread().name)
    assert done.done() and done.result() == threading.current_thread().name
    with pytest.raises(ValueError, match="bad prompt"):
        plain.submit_click(_raise, ValueError("bad prompt")).result()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_click_queued_during_an_embed_runs_at_the_encoders_next_pause(tiny_checkpoint, dtype):
    """The compute thread is busy embedding when a click arrives: the click runs at the encoder's next
    pause point (within the block it is in), not after the image. (bfloat16: the engine copies its
    decoder, hooks and all, which must not copy the compute thread.)"""
    engine = Sam2Engine.from_pretrained(
        "hiera_tiny", checkpoint=str(tiny_checkpoint), device="cpu", dtype=dtype, interactive=True
    )
    image = random_image(120, 160, seed=71)
    emb = engine.embed([image])[0]
    prompt = [Prompt(points=[[80, 60]], labels=[1])]
    expected = engine.predict_prompts(emb, prompt)
    compute, events, answers = compute_thread(), [], []
    blocks = engine.model.vision_encoder.backbone.blocks

    def click_arrives(*_):  # on the compute thread, as block 1 starts: a click is sent and queues
        if "click sent" not in events:
            events.append("click sent")
            threading.Thread(target=lambda: answers.append(engine.predict_prompts(emb, prompt)), daemon=True).start()
            _wait_for(lambda: compute.queued == 1)

    handles = [
        blocks[1].register_forward_pre_hook(click_arrives),
        blocks[2].register_forward_pre_hook(lambda *_: events.append("block 2")),
        engine.model.prompt_encoder.register_forward_pre_hook(lambda *_: events.append("decode")),
    ]
    try:
        engine.embed([random_image(120, 160, seed=72)], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert events[:3] == ["click sent", "decode", "block 2"]
    np.testing.assert_array_equal(answers[0].masks, expected.masks)


def _wait_for(condition) -> None:
    deadline = time.monotonic() + GUARD_S
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _raise(e: Exception):
    raise e
