"""The micro-batcher: one worker thread per server collects concurrent embedding requests.

Requests for the same engine that arrive within ``max_wait_s`` of each other (up to
``max_batch_size``) are embedded in one forward pass, so an accelerator sees batches; each waiting
request gets its own embedding back through a future. Request handlers await the future and never
block the event loop on model work.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Protocol

import numpy as np

from ..engine.types import AutomaticConfig, ImageEmbedding, Prediction, Prompt, ScoredMasks, SegmentingEngine

Engine = SegmentingEngine[ImageEmbedding]  # the server's engines: ``Sam2Engine``, or any backend like it


class EmbeddingBatcher(Protocol):
    """What the app needs of a batcher (``state.batcher``): ``EmbedBatcher`` here, or Ray Serve's
    ``scale.ray_serve.ServeEmbedBatcher`` swapped in by each replica.

    ``submit`` queues one image for an engine from the event loop (await the result with
    ``asyncio.wrap_future``); ``embed`` is the blocking form for worker threads; ``close`` stops it.
    """

    def submit(self, engine: Engine, image: np.ndarray) -> Future | asyncio.Future: ...

    def embed(self, engine: Engine, images: list[np.ndarray]) -> list[ImageEmbedding]: ...

    def close(self) -> None: ...


def embed_each(engine: Engine, images: Sequence[np.ndarray]) -> list[ImageEmbedding | Exception]:
    """Embeddings of ``images`` in one call; if that fails, each image alone, so one bad image does
    not fail its neighbours: a failure is returned in its place as the exception it raised."""
    try:
        return engine.embed(list(images))
    except Exception:
        out: list[ImageEmbedding | Exception] = []
        for image in images:
            try:
                out.append(engine.embed([image])[0])
            except Exception as e:
                out.append(e)
        return out


class EmbedBatcher:
    def __init__(
        self, max_batch_size: int = 4, max_wait_s: float = 0.005, on_batch: Callable[[int], None] | None = None
    ):
        if max_batch_size < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size must be >= 1 and max_wait_s >= 0")
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_s
        self._on_batch = on_batch or (lambda n: None)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="sam2flow-batcher", daemon=True)
        self._thread.start()

    def submit(self, engine: Engine, image: np.ndarray) -> Future:
        """Queue one RGB image for ``engine``; the future resolves to its ``ImageEmbedding``."""
        future: Future = Future()
        self._queue.put((engine, image, future))
        return future

    def embed(self, engine: Engine, images: list[np.ndarray]) -> list[ImageEmbedding]:
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
        for (_, _, future), result in zip(items, embed_each(engine, [im for _, im, _ in items])):
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


class BatchedEngine:
    """A ``SegmentingEngine`` whose ``embed`` goes through the batcher; decoding is the engine's own.

    The workflow runner gets these from the server (``ServerState.get``), so concurrent workflow
    requests are embedded together with the segment requests.
    """

    def __init__(self, engine: Engine, batcher: EmbeddingBatcher):
        self._engine, self._batcher = engine, batcher

    def embed(self, images: Sequence[np.ndarray], use_cache: bool = True) -> list[ImageEmbedding]:
        return self._batcher.embed(self._engine, list(images))

    def predict_prompts(
        self,
        embedding: ImageEmbedding,
        prompts: Sequence[Prompt],
        multimask_output: bool = True,
        max_hole_area: int = 0,
        max_sprinkle_area: int = 0,
    ) -> Prediction:
        return self._engine.predict_prompts(embedding, prompts, multimask_output, max_hole_area, max_sprinkle_area)

    def automatic(self, embedding: ImageEmbedding, config: AutomaticConfig | None = None) -> ScoredMasks:
        return self._engine.automatic(embedding, config)
