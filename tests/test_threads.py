"""Torch work runs on each engine's own long-lived threads, and libgomp gets our waiting policy.

Why (engine/threads.py): with a second OpenMP team in the process, libgomp's default makes idle
team threads sleep between kernels, which cost a click's decode ~20 ms on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sam2flow import Sam2Engine
from sam2flow.engine.threads import OPENMP_ENV

from conftest import random_image


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


@pytest.fixture
def engine(tiny_checkpoint):
    return Sam2Engine.from_pretrained(checkpoint=str(tiny_checkpoint), device="cpu", dtype="float32")


def test_each_side_runs_on_one_thread_whoever_calls(engine):
    """Embeds and decodes from the main thread and from a pool (as a web server calls) all run on the
    engine's two threads: one OpenMP team each, whatever thread asked."""
    seen = {"encode": set(), "decode": set()}

    def record(side):
        return lambda *_: seen[side].add(threading.current_thread().name)

    engine.model.vision_encoder.neck.register_forward_pre_hook(record("encode"))
    engine.model.prompt_encoder.register_forward_pre_hook(record("decode"))
    boxes = np.array([[10, 10, 50, 40]], np.float32)

    def work(seed):
        emb = engine.embed([random_image(48, 64, seed=seed)])[0]
        engine.predict(emb, boxes=boxes)
        engine.predict(emb, points=np.array([[20, 20]], np.float32), point_labels=np.array([1]))

    work(0)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(work, range(1, 7)))
    assert len(seen["encode"]) == 1 and len(seen["decode"]) == 1, seen
    (encode,), (decode,) = seen["encode"], seen["decode"]
    assert encode.startswith("sam2flow-encode") and decode.startswith("sam2flow-decode")


def test_an_error_on_the_decode_thread_reaches_the_caller(engine):
    emb = engine.embed([random_image(48, 64, seed=1)])[0]
    boxes = np.array([[10, 10, 50, 40]], np.float32)

    def fail(*_):
        raise RuntimeError("decoder broke")

    hook = engine.model.prompt_encoder.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="decoder broke"):
        engine.predict(emb, boxes=boxes)
    hook.remove()
    assert engine.predict(emb, boxes=boxes).masks.shape == (1, 48, 64)  # the thread lives on
