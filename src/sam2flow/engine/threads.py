"""Torch's CPU threads: how its OpenMP teams wait between kernels, and one thread for a server's torch work.

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
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np

R = TypeVar("R")

# Spin ~30k iterations, then sleep; measured on 2 cores: 10k-100k keep a second team's small kernels at
# the first team's speed, libgomp's own 300k let the idle team's spinning slow the busy one again.
OPENMP_ENV = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "30000"}


# A server's compute thread polls for the next click this long after answering one (``ComputeThread``).
CLICK_SPIN_S = 1.0
SPIN_AFTER_S = 0.02  # ... starting this long after it: the answer's RLE and JSON get the CPU first


def tune_openmp() -> bool:
    """Set ``OPENMP_ENV`` for libgomp, before torch loads it; True if it did."""
    if "torch" in sys.modules or any(k in os.environ for k in OPENMP_ENV):
        return False
    os.environ.update(OPENMP_ENV)
    return True


class ComputeThread:
    """One thread that runs every torch computation of a process's interactive engines (a server's).

    libgomp gives each thread that runs torch kernels a team of its own, and keeps it for the
    thread's lifetime. A server calls the engine from many threads (the embed batcher, a request
    pool, the model loader), so even with ``tune_openmp`` its 2-core process holds three or four
    teams, and every kernel of a click waits for a helper thread to wake. Measured on 2 cores
    (hiera_tiny, bf16, one refining click on an 800 × 600 image, 20 ms apart): p50 26-30 ms when
    one thread does all the torch work, 34-37 ms when the embeds and the clicks run on two threads.

    ``call`` runs a function on this thread and returns its result (or raises its exception) to the
    caller, which waits; on this thread itself it just calls it (after the urgent jobs waiting, if it
    is urgent itself: a long job's decodes let clicks through). ``urgent`` jobs (clicks) go before
    the others, and ``run_urgent``, called at an encoder's pause points, runs the urgent jobs waiting
    now: a click waits for at most one stretch of encoder work, never a whole image.

    ``spin_s``: for this long after an urgent job (from ``SPIN_AFTER_S`` on) the idle thread keeps its
    CPU busy while it waits for the next job, instead of sleeping. On the 2-core VMs measured, a CPU
    left idle for more than ~100 ms answers the next click slowly: one click every 250 ms over HTTP
    (hiera_tiny, bf16, 800 × 600, ``/page/decode``, an Intel Xeon with AMX) took p50/p90/p99 33/59/72 ms
    against 18-22/19-23/20-29 back to back; polling took it to 24-26/25-31/30-39, one core busy
    meanwhile. Short naps instead (0.2-5 ms sleeps) did not help: the CPU still idles. libgomp's own
    spinning does, with a spin count (``GOMP_SPINCOUNT`` 3,000,000: ~0.2 s here) whose length in time
    depends on the CPU model. 0 (the default; a server sets its ``click_spin_ms``) sleeps at once.
    """

    def __init__(self, name: str = "sam2flow-compute", spin_s: float = 0.0):
        self.spin_s = spin_s
        self._spin_until = 0.0
        self._cv = threading.Condition()
        self._urgent: deque = deque()
        self._normal: deque = deque()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[..., R], *args: Any, urgent: bool = False) -> R:
        if self.on_thread():  # nested in a job: an urgent call is a pause point of a long job (unprompted mode)
            if urgent:
                self.run_urgent()
            return fn(*args)
        return self.submit(fn, *args, urgent=urgent).result()

    def submit(self, fn: Callable[..., R], *args: Any, urgent: bool = False) -> Future:
        """Queue ``fn(*args)`` for this thread; its future. An event loop awaits it with
        ``asyncio.wrap_future`` and no worker thread in between (each hop is a thread to wake)."""
        future: Future = Future()
        with self._cv:
            (self._urgent if urgent else self._normal).append((future, fn, args))
            self._cv.notify()
        return future

    def run_urgent(self) -> int:
        """On this thread: run the urgent jobs queued now (and any queued meanwhile); how many ran."""
        ran = 0
        while self.on_thread():
            with self._cv:
                if not self._urgent:
                    break
                job = self._urgent.popleft()
            self._run(job)
            ran += 1
        if ran:
            self._clicked()
        return ran

    @property
    def queued(self) -> int:
        with self._cv:
            return len(self._urgent) + len(self._normal)

    def _clicked(self) -> None:
        """An urgent job just ran: poll for the next job for ``spin_s`` from now."""
        self._spin_until = time.monotonic() + self.spin_s

    def _pending(self) -> bool:
        return bool(self._urgent or self._normal)

    def _loop(self) -> None:
        while True:
            if time.monotonic() < self._spin_until:
                with self._cv:
                    self._cv.wait_for(self._pending, SPIN_AFTER_S)
                _poll(self._pending, self._spin_until)
            with self._cv:
                self._cv.wait_for(self._pending)
                urgent = bool(self._urgent)
                job = (self._urgent or self._normal).popleft()
            self._run(job)
            if urgent:
                self._clicked()

    @staticmethod
    def _run(job) -> None:
        future, fn, args = job
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # handed to the caller, which re-raises it
            future.set_exception(e)


def _poll(ready: Callable[[], bool], until: float) -> None:
    """Keep this CPU busy until ``ready()`` or ``until`` (``time.monotonic()``), holding the GIL little:
    numpy adds 64 KB (L2-resident, a few µs) without it between two checks."""
    scratch = np.zeros(16384, np.float32)
    while not ready() and time.monotonic() < until:
        np.add(scratch, 1.0, out=scratch)


_compute: tuple[int, ComputeThread] | None = None
_compute_lock = threading.Lock()


def compute_thread() -> ComputeThread:
    """This process's ``ComputeThread``, started on first use (again in a forked child)."""
    global _compute
    with _compute_lock:
        if _compute is None or _compute[0] != os.getpid():
            _compute = (os.getpid(), ComputeThread())
        return _compute[1]
