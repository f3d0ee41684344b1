"""``sam2flow embed``: the embeddings of a dataset's images into an ``EmbeddingStore``, resumably.

Each image is read and hashed; one whose embedding is already in the store is skipped without
running the encoder, so a re-run after an interruption does only what is left (files are written
whole, so an interruption never leaves a half one; a file damaged since, its header checked, is
written again). Unreadable images are reported and skipped;
every other image is still stored. ``--ray`` runs the same steps as ``batch --ray``'s pipeline
(``scale.ray_batch.ray_records``), with an actor per engine that writes to the store itself: the
store's directory must then be shared by every node.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine.cache import EmbeddingCache, content_hash
from ..engine.store import EmbeddingStore
from .batch import list_images, read_image_file


@dataclass
class EmbedSummary:
    embedded: int = 0
    already: int = 0  # found in the store
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, error)

    def line(self) -> str:
        return f"{self.embedded} embedded, {self.already} already stored, {len(self.failed)} failed"

    def count(self, record: dict) -> None:
        if "error" in record:
            self.failed.append((record["file"], record["error"]))
        elif record["embedded"]:
            self.embedded += 1
        else:
            self.already += 1


def image_files(sources: Sequence[str]) -> list[Path]:
    """The images of every source (a directory, a glob pattern or a file), each once, in order."""
    seen: dict[Path, Path] = {}
    for source in sources:
        for f in list_images(source):
            seen.setdefault(f.resolve(), f)
    return list(seen.values())


def job_engine(engine_args: dict):
    """A ``Sam2Engine`` that keeps nothing in memory (a dataset is not a session) and reads no store:
    ``embed_records`` writes to it, replacing what is damaged instead of failing on it."""
    from ..engine.engine import Sam2Engine

    return Sam2Engine.from_pretrained(**engine_args, cache=EmbeddingCache(max_entries=0))


def embed_records(engine, store: EmbeddingStore, names: list[str], images: list[np.ndarray]) -> list[dict]:
    """Embed the images (RGB uint8, H × W × 3) not yet in ``store`` (or whose file there is damaged),
    in one batch, and store them → one record per image: ``{"file", "image_id", "embedded"}``
    (``embedded``: False if it was already stored), or ``{"file", "error"}`` for an image the engine
    or the store refused (the others are still stored)."""
    ids = [content_hash(im) for im in images]
    records = [{"file": n, "image_id": i, "embedded": False} for n, i in zip(names, ids)]
    todo = [k for k, i in enumerate(ids) if (engine.store_id, i) not in store]

    def put(ks: list[int]) -> None:
        for emb in engine.embed([images[k] for k in ks]):
            store.put(engine.store_id, emb)

    try:
        put(todo)
        done = todo
    except ValueError:  # one by one, so only the bad one fails
        done = []
        for k in todo:
            try:
                put([k])
                done.append(k)
            except ValueError as e:
                records[k] = {"file": names[k], "error": str(e)}
    for k in done:
        records[k]["embedded"] = True
    return records


def run_embed(
    engine, store: EmbeddingStore, sources: Sequence[str], batch_size: int = 4, progress: bool = True
) -> EmbedSummary:
    """Store the embedding of every image of ``sources`` (see ``image_files``), ``batch_size`` at a time."""
    files = image_files(sources)
    with _bar(len(files), progress) as bar:
        summary = EmbedSummary()
        for start in range(0, len(files), batch_size):
            chunk, names, images, records = files[start : start + batch_size], [], [], []
            for f in chunk:
                try:
                    images.append(read_image_file(f))
                    names.append(str(f))
                except (OSError, ValueError) as e:
                    records.append({"file": str(f), "error": str(e)})
            for record in records + embed_records(engine, store, names, images):
                _report(summary, record, bar.write)
            bar.update(len(chunk))
    return summary


class _Embedder:
    """An actor of the Ray pipeline: one engine writing to the store; decoded rows in, records out."""

    def __init__(self, engine_args: dict, store_root: str):
        self.store = EmbeddingStore(store_root, writable=True)
        self.engine = job_engine(engine_args)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import json

        from .ray_batch import decoded

        names, failed, good, images = decoded(batch)
        good_names = [names[i] for i in good]
        records = dict(zip(good_names, embed_records(self.engine, self.store, good_names, images)))
        records.update(failed)
        return {"record": np.array([json.dumps(records[n]) for n in names], dtype=object)}


def run_ray_embed(
    store_root: str,
    sources: Sequence[str],
    engine_args: dict,
    batch_size: int = 4,
    address: str | None = None,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float = 1.0,
    progress: bool = True,
) -> EmbedSummary:
    """``run_embed`` on Ray: ``engine_args`` are ``Sam2Engine.from_pretrained`` keywords for each actor;
    ``address``, ``actors`` and the shares per actor as in ``scale.ray_batch.run_ray_batch``."""
    from .ray_batch import _rows, actor_plan, ray_records
    from .ray_common import ray_cluster

    files = image_files(sources)
    rows = _rows(files, None)
    for row, f in zip(rows, files):
        row["file"] = str(f)  # as plain mode names them: two folders may hold the same file name
    summary = EmbedSummary()
    with ray_cluster(address) as ray, _bar(len(files), progress) as bar:
        plan = actor_plan(ray.cluster_resources(), actors, gpus_per_actor, cpus_per_actor)
        kwargs = {"engine_args": engine_args, "store_root": str(Path(store_root).resolve())}
        for record in ray_records(ray, rows, _Embedder, kwargs, batch_size, plan):
            _report(summary, record, bar.write)
            bar.update(1)
    return summary


def _bar(total: int, progress: bool):
    from tqdm import tqdm

    # Always images/s (tqdm's default turns a rate under 1 into s/img) and the ETA.
    form = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]"
    return tqdm(total=total, unit="img", disable=not progress, file=sys.stderr, bar_format=form)


def _report(summary: EmbedSummary, record: dict, write: Callable[..., None]) -> None:
    """Count a record; a failure is one line on stderr (above the bar), as it happens."""
    summary.count(record)
    if "error" in record:
        write(f"sam2flow embed: skipped {record['file']}: {record['error']}", file=sys.stderr)
