"""The micro-batcher: one worker thread per server collects concurrent embedding requests.

Requests for the same engine that arrive within ``max_wait_s`` of each other (up to
``max_batch_size``) are embedded in one forward pass, so an accelerator sees batches; each waiting
request gets its own embedding back through a future. Request handlers await the future and never
block the event loop on model work.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable

import numpy as np


class EmbedBatcher:
    def __init__(self, max_batch_size: int = 4, max_wait_s: float = 0.005,
                 on_batch: Callable[[int], None] | None = None):
        if max_batch_size < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size must be >= 1 and max_wait_s >= 0")
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_s
        self._on_batch = on_batch or (lambda n: None)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="sam2flow-batcher", daemon=True)
        self._thread.start()

    def submit(self, engine, image: np.ndarray) -> Future:
        """Queue one RGB image for ``engine``; the future resolves to its ``ImageEmbedding``."""
        future: Future = Future()
        self._queue.put((engine, image, future))
        return future

    def embed(self, engine, images: list[np.ndarray]) -> list:
        """Blocking form for worker threads (the workflow runner): same batching as ``submit``."""
        futures = [self.submit(engine, im) for im in images]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _collect(self, first) -> list:
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # keep the stop signal for the loop
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = self._collect(first)
            groups: dict[int, list] = {}
            for item in batch:
                groups.setdefault(id(item[0]), []).append(item)
            for items in groups.values():
                self._embed_group(items)

    def _embed_group(self, items: list) -> None:
        engine = items[0][0]
        self._on_batch(len(items))
        try:
            results = engine.embed([im for _, im, _ in items])
        except Exception:
            # One bad image must not fail its neighbours: retry each alone.
            for _, im, future in items:
                try:
                    future.set_result(engine.embed([im])[0])
                except Exception as e:
                    future.set_exception(e)
            return
        for (_, _, future), emb in zip(items, results):
            future.set_result(emb)


class BatchedEngine:
    """An engine whose ``embed`` goes through the batcher (for code that calls ``engine.embed``)."""

    def __init__(self, engine, batcher: EmbedBatcher):
        self._engine, self._batcher = engine, batcher

    def embed(self, images, use_cache: bool = True):
        return self._batcher.embed(self._engine, list(images))

    def __getattr__(self, name):
        return getattr(self._engine, name)
