"""libgomp gets our waiting policy when sam2flow is imported before torch.

Why (engine/threads.py): with a second OpenMP team in the process, libgomp's default makes idle
team threads sleep between kernels, which cost a click's decode ~20 ms on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys

from sam2flow.engine.threads import OPENMP_ENV


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
