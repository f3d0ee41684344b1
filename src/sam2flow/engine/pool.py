"""EnginePool: one engine per SAM2 version, loaded on first use, at most K resident (LRU)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..models.registry import DEFAULT_FAMILY, get_spec
from .cache import EmbeddingCache
from .engine import Sam2Engine
from .types import EmbeddingStorage


class EnginePool:
    """Lazily loaded engines keyed by version, sharing one embedding cache.

    ``checkpoints`` maps a version to an explicit checkpoint (a ``.pt``, a Hugging Face directory
    or repository id); other versions are found by ``load_model``'s usual search. Thread-safe:
    concurrent first requests for a version load it once. ``store``: the embedding store every
    engine reads (and writes, if writable), each under its own model id. ``quantize`` and
    ``calibration``: as ``Sam2Engine``'s.
    """

    def __init__(
        self,
        family: str = DEFAULT_FAMILY,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        checkpoints: Mapping[str, str] | None = None,
        max_resident: int = 2,
        max_batch_size: int | None = None,
        cache: EmbeddingCache | None = None,
        compile: bool = False,
        backend: str = "auto",
        store: EmbeddingStorage | None = None,
        interactive: bool = False,
        quantize: str = "auto",
        calibration: Sequence[np.ndarray] | None = None,
    ):
        if max_resident < 1:
            raise ValueError("max_resident must be >= 1")
        get_spec(family=family)  # validate early
        for version in checkpoints or {}:
            get_spec(version, family)
        self.family, self.device, self.dtype = family, device, dtype
        self.checkpoints = dict(checkpoints or {})
        self.max_resident, self.max_batch_size = max_resident, max_batch_size
        self.compile, self.backend = compile, backend
        self.store, self.interactive = store, interactive
        self.quantize, self.calibration = quantize, calibration
        self.cache = cache if cache is not None else EmbeddingCache()
        self._engines: OrderedDict[str, Sam2Engine] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    @classmethod
    def of(cls, engine: Sam2Engine) -> EnginePool:
        """A pool holding one ready engine (its version only, unless others can be found)."""
        pool = cls(
            engine.spec.family,
            engine.device,
            engine.dtype,
            cache=engine.cache,
            backend=engine.backend,
            store=engine.store,
            interactive=engine.interactive,
            # int8's calibration images are not kept: other versions quantise as "auto" does
            quantize="auto" if engine.quantize == "int8" else engine.quantize,
        )
        pool._engines[engine.spec.version] = engine
        return pool

    def get(self, version: str) -> Sam2Engine:
        """The engine for ``version``, loading it (and evicting the least recently used) if needed."""
        get_spec(version, self.family)
        with self._lock:
            if version in self._engines:
                self._engines.move_to_end(version)
                return self._engines[version]
            loading = self._loading.setdefault(version, threading.Lock())
        with loading:  # one loader per version; others wait for it
            with self._lock:
                if version in self._engines:
                    return self._engines[version]
            engine = Sam2Engine.from_pretrained(
                version,
                self.family,
                self.checkpoints.get(version),
                device=self.device,
                dtype=self.dtype,
                max_batch_size=self.max_batch_size,
                cache=self.cache,
                compile=self.compile,
                backend=self.backend,
                store=self.store,
                interactive=self.interactive,
                quantize=self.quantize,
                calibration=self.calibration,
            )
            with self._lock:
                self._engines[version] = engine
                while len(self._engines) > self.max_resident:
                    self._engines.popitem(last=False)
            return engine

    def loaded(self, version: str) -> Sam2Engine | None:
        """The engine for ``version`` if it is resident now (marked as just used, as ``get`` does), else
        None; never loads, so an event loop may call it."""
        with self._lock:
            engine = self._engines.get(version)
            if engine is not None:
                self._engines.move_to_end(version)
            return engine

    @property
    def resident(self) -> list[str]:
        with self._lock:
            return list(self._engines)
