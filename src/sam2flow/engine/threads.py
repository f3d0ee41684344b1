"""Torch's CPU threads: how its OpenMP teams wait between kernels.

torch's CPU kernels run on GNU OpenMP (libgomp) teams, one per thread that calls them. When a process
has more OpenMP threads than cores (a second caller's team is enough on 2 cores), libgomp stops letting
idle team threads spin between parallel regions: every kernel then wakes its helpers from sleep.
Measured on a 2-core CPU: a 10 × 256 × 256 matmul on a second caller thread took 100-300 µs instead of
~20 µs, and a click's decode (~300 kernels) ~20 ms more. ``tune_openmp`` asks libgomp for a short,
bounded spin in every case; it must run before torch loads libgomp, so ``sam2flow.engine`` calls it on
import, and it leaves alone a process where torch is already imported or the user set either variable.
"""

from __future__ import annotations

import os
import sys

# Spin ~30k iterations, then sleep; measured on 2 cores: 10k-100k keep a second team's small kernels at
# the first team's speed, libgomp's own 300k let the idle team's spinning slow the busy one again.
OPENMP_ENV = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "30000"}


def tune_openmp() -> bool:
    """Set ``OPENMP_ENV`` for libgomp, before torch loads it; True if it did."""
    if "torch" in sys.modules or any(k in os.environ for k in OPENMP_ENV):
        return False
    os.environ.update(OPENMP_ENV)
    return True
