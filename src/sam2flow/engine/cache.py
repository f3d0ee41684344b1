"""A bounded, thread-safe LRU cache of image embeddings, keyed by image content."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import numpy as np

V = TypeVar("V")


def content_hash(image: np.ndarray) -> str:
    """A hash of an array's shape, dtype and bytes (blake2b, 128 bits, hex)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.shape}|{image.dtype}".encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()


class EmbeddingCache(Generic[V]):
    """LRU mapping bounded by entry count and by total bytes.

    ``size_of`` gives each value's size in bytes. A value larger than ``max_bytes`` is not stored.
    All operations hold one lock, so one cache can be shared by every caller and thread.

    >>> cache = EmbeddingCache(max_entries=2, max_bytes=100, size_of=len)
    >>> cache.put("a", b"1234"); cache.put("b", b"56"); cache.put("c", b"7")
    >>> "a" in cache, cache.get("b"), len(cache)
    (False, b'56', 2)
    """

    def __init__(self, max_entries: int = 64, max_bytes: int = 2 << 30, size_of: Callable[[V], int] | None = None):
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("cache bounds must be >= 0")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._size_of = size_of or (lambda v: int(v.nbytes))
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: V) -> None:
        size = self._size_of(value)
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            if size > self.max_bytes or self.max_entries == 0:
                return
            self._items[key] = (value, size)
            self._bytes += size
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes
