"""Timing: interleaved repeats of competing callables, medians, and device synchronisation."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for queued device work (a no-op on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


@dataclass
class Measured:
    """Seconds per call for each competitor, and the result of its last call."""

    samples: dict[str, list[float]]
    last: dict[str, Any] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])


def measure(
    fns: dict[str, Callable[[], Any]],
    warmup: int,
    repeats: int,
    sync: Callable[[], None] = lambda: None,
    block: int = 1,
    settle_s: float = 0.0,
) -> Measured:
    """Run every callable ``warmup`` times untimed, then ``repeats`` timed calls of each.

    Rounds interleave the competitors (A B C, then C B A, ...), so a slow spell of a shared
    machine hits all of them alike instead of one; a garbage collection runs before each timed
    call, outside the timing. What exists before the timed rounds (models, libraries: ~475,000
    objects with both sides loaded) is frozen out of those collections: a full one took ~165 ms,
    during which a server measured over HTTP sat idle, which slows its next answer
    (``sam2flow/engine/threads.py``).

    ``block``: calls of one competitor in a row per round, for calls of a few milliseconds whose
    competitors share the CPU in other processes; ``settle_s``: a pause before each block, outside
    the timing. Call by call, each side meets the other's leftovers: this process's idle OpenMP
    helper spins on after a torch call (libgomp's default 300,000 spins: 4-7 ms of a core on the
    2-core Xeon), a server's compute thread polls for the next click (``click_spin_ms``), and each
    evicts the other's working set from the caches. Measured: a click over HTTP right after 10 ms
    of torch work in the client took p50/p99 19.6/33.6 ms, 18.2/22.0 with the client's helpers
    passive, 15.5/17.5 with none.
    """
    names = list(fns)
    last: dict[str, Any] = {}
    for _ in range(warmup):
        for name in names:
            last[name] = fns[name]()
            sync()
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.freeze()
    try:
        for r in range(-(-repeats // block)):
            for name in names if r % 2 == 0 else names[::-1]:
                if settle_s:
                    time.sleep(settle_s)
                for _ in range(min(block, repeats - r * block)):
                    last.pop(name, None)  # free the previous output before the next run allocates its own
                    gc.collect()
                    sync()
                    t0 = time.perf_counter()
                    out = fns[name]()
                    sync()
                    samples[name].append(time.perf_counter() - t0)
                    last[name] = out
    finally:
        gc.unfreeze()
    return Measured(samples, last)
