"""``sam2flow batch --ray``: the batch job as a Ray Data pipeline, for datasets past one machine.

    file list (driver) → read + decode (CPU tasks, one row per image)
                       → embed + decode masks (an actor pool, one ``Sam2Engine`` per actor)
                       → records streamed back to the driver and written as plain mode writes them

``sam2flow embed --ray`` runs the same pipeline (``ray_records``) with its own actor
(``scale.embed``), which writes embeddings to the store instead of masks to records.

The stages call the same functions as plain mode (``scale/batch.py``: ``read_image_file``,
``segment_records``, the error records), so the records are the same; only their order may differ.
JSONL output is appended and flushed per record and resumes exactly as plain mode does. Parquet
output (``--out *.parquet``) is a directory of part files, each written whole (a temporary name,
then renamed), so an interruption loses only the part being collected and a re-run skips every
file in the finished parts.

Paths and the checkpoint must be readable from every node of the cluster (a shared file system),
and ``sam2flow`` installed on every node.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..workflows.step import StepParameters
from .batch import BatchSummary, JsonlSink, count, done_files, load_boxes, pending, read_image_file, segment_records
from .ray_common import ray_cluster

PARQUET_COLUMNS = ("file", "width", "height", "predictions", "error")
READ_CPUS = 0.5  # per read + decode task (see run_ray_batch)
_NO_IMAGE = np.zeros((0, 0, 3), np.uint8)  # the image column of a row that failed to decode


def actor_plan(
    resources: dict, actors: int | None = None, gpus_per_actor: float | None = None, cpus_per_actor: float = 1.0
) -> tuple[int, float, float]:
    """(actors, GPUs per actor, CPUs per actor) for a cluster's ``ray.cluster_resources()``.

    With GPUs: one actor per GPU (or per ``gpus_per_actor`` share: 0.5 puts two on each GPU).
    Without: one actor per ``cpus_per_actor`` CPUs, leaving one CPU to the read and decode tasks
    (an actor pool holding every CPU would starve them, and the pipeline would stall).
    """
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if gpus_per_actor is None:
        gpus_per_actor = min(1.0, gpus)
    if gpus_per_actor < 0 or cpus_per_actor <= 0 or (actors is not None and actors < 1):
        raise ValueError("--ray-actors must be >= 1, GPUs per actor >= 0 and CPUs per actor > 0")
    if actors is None:
        if gpus_per_actor > 0:
            actors = max(1, math.floor(gpus / gpus_per_actor + 1e-9))
        else:
            actors = max(1, math.floor((cpus - 1) / cpus_per_actor))
    # Asking for more than the cluster has would not fail: the pipeline would wait forever.
    if gpus_per_actor > 0 and actors * gpus_per_actor > gpus + 1e-9:
        raise ValueError(f"{actors} actors of {gpus_per_actor:g} GPU need more than the cluster's {gpus:g} GPUs")
    if gpus_per_actor == 0 and actors * cpus_per_actor + READ_CPUS > cpus + 1e-9:
        raise ValueError(
            f"{actors} actors of {cpus_per_actor:g} CPUs leave none of the cluster's {cpus:g} CPUs "
            "to read images: fewer actors or CPUs per actor"
        )
    return actors, gpus_per_actor, cpus_per_actor


def _read_row(row: dict) -> dict:
    """A CPU task: one file → its pixels (RGB uint8, H × W × 3) or the error plain mode records."""
    out = {"file": row["file"], "boxes": row["boxes"], "image": _NO_IMAGE, "error": ""}
    try:
        if row["boxes_file"]:  # a directory of detections: read next to the image, not on the driver
            out["boxes"] = Path(row["boxes_file"]).read_text()
        out["image"] = read_image_file(Path(row["path"]))
    except (OSError, ValueError) as e:
        out["error"] = str(e)
    return out


def decoded(batch: dict[str, np.ndarray]) -> tuple[list[str], dict[str, dict], list[int], list[np.ndarray]]:
    """An actor's batch of ``_read_row`` rows → (file names, error records of the rows that failed
    to read, indices of the others, their images as arrays of their own)."""
    names = [str(n) for n in batch["file"]]
    records, good = {}, []
    for i, name in enumerate(names):
        if batch["error"][i]:
            records[name] = {"file": name, "error": str(batch["error"][i])}
        else:
            good.append(i)
    # Batches arrive as read-only views of the object store; the engine gets arrays of its own.
    images = [np.array(batch["image"][i], dtype=np.uint8) for i in good]
    return names, records, good, images


class _Segmenter:
    """An actor of the pool: holds one engine and turns batches of decoded rows into records."""

    def __init__(self, engine_args: dict, params: StepParameters, mask_format: str, automatic_config, prompted: bool):
        from ..engine.engine import Sam2Engine

        self.engine = Sam2Engine.from_pretrained(**engine_args)
        self.params, self.mask_format, self.automatic_config = params, mask_format, automatic_config
        self.prompted = prompted

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names, records, good, images = decoded(batch)
        boxes = None
        if self.prompted:
            boxes = {Path(names[i]).stem: str(batch["boxes"][i]) for i in good if batch["boxes"][i]}
        records.update(
            segment_records(
                self.engine,
                [names[i] for i in good],
                images,
                boxes,
                self.params,
                self.mask_format,
                self.automatic_config,
            )
        )
        return {"record": np.array([json.dumps(records[n]) for n in names], dtype=object)}


def _rows(todo: list[Path], boxes) -> list[dict]:
    """The driver's rows: paths and detections only, never pixels."""
    rows = []
    for f in todo:
        entry = None if boxes is None else boxes.get(f.stem)
        rows.append(
            {
                "path": str(f.resolve()),
                "file": f.name,
                "boxes_file": str(entry.resolve()) if isinstance(entry, Path) else "",
                "boxes": json.dumps(entry) if entry is not None and not isinstance(entry, Path) else "",
            }
        )
    return rows


class ParquetSink:
    """Records into a directory of Parquet parts (columns ``PARQUET_COLUMNS``), ``part_rows`` a part.

    ``predictions`` holds the records' prediction list as JSON text (RLE or polygons as in the
    JSONL), ``width``/``height`` the image size; an unreadable image has only ``file`` and ``error``.
    """

    def __init__(self, out: Path, summary: BatchSummary, part_rows: int = 1000):
        self.out, self.summary, self.part_rows = out, summary, part_rows
        out.mkdir(parents=True, exist_ok=True)
        self._rows: list[dict] = []
        self._run = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        self._parts = 0

    def write(self, record: dict) -> None:
        image = record.get("image") or {}
        self._rows.append(
            {
                "file": record["file"],
                "width": image.get("width"),
                "height": image.get("height"),
                "predictions": json.dumps(record["predictions"]) if "predictions" in record else None,
                "error": record.get("error"),
            }
        )
        count(self.summary, record)
        if len(self._rows) >= self.part_rows:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._rows:
            return
        schema = pa.schema(
            [
                ("file", pa.string()),
                ("width", pa.int32()),
                ("height", pa.int32()),
                ("predictions", pa.string()),
                ("error", pa.string()),
            ]
        )
        table = pa.Table.from_pylist(self._rows, schema=schema)
        name = f"part-{self._run}-{self._parts:05d}.parquet"
        tmp = self.out / f".{name}.tmp"  # a crash mid-write leaves a hidden temporary, never a torn part
        pq.write_table(table, tmp)
        os.replace(tmp, self.out / name)
        self._parts += 1
        self._rows = []

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _parts(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet")) if out.is_dir() else []


def parquet_done_files(out: Path) -> set[str]:
    """File names already in the Parquet directory ``out``."""
    import pyarrow.parquet as pq

    return {name for part in _parts(out) for name in pq.read_table(part, columns=["file"]).column("file").to_pylist()}


def read_parquet_records(out: Path) -> list[dict]:
    """The Parquet directory ``out`` as the records plain mode writes to JSONL."""
    import pyarrow.parquet as pq

    records = []
    for part in _parts(out):
        for row in pq.read_table(part).to_pylist():
            if row["error"] is not None:
                records.append({"file": row["file"], "error": row["error"]})
            else:
                records.append(
                    {
                        "file": row["file"],
                        "image": {"width": row["width"], "height": row["height"]},
                        "predictions": json.loads(row["predictions"]),
                    }
                )
    return records


def run_ray_batch(
    source: str,
    out: Path,
    engine_args: dict,
    boxes_source: str | None = None,
    mask_format: str = "rle",
    batch_size: int = 4,
    params: StepParameters | None = None,
    automatic_config=None,
    address: str | None = None,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float = 1.0,
    progress: bool = True,
) -> BatchSummary:
    """Segment every image under ``source`` into ``out`` (``.jsonl`` or a ``.parquet`` directory) on Ray.

    ``engine_args``: ``Sam2Engine.from_pretrained`` keywords, used by each actor. ``address``: the
    cluster (``auto``, ``ray://host:10001``) or ``None`` for a local one. ``batch_size`` images are
    embedded together per actor call.
    """
    from tqdm import tqdm

    parquet = out.suffix == ".parquet"
    params = params or StepParameters()
    todo, summary = pending(source, parquet_done_files(out) if parquet else done_files(out))
    boxes = load_boxes(boxes_source)
    if not todo:
        return summary
    with ray_cluster(address) as ray:
        plan = actor_plan(ray.cluster_resources(), actors, gpus_per_actor, cpus_per_actor)
        segmenter = {
            "engine_args": engine_args,
            "params": params,
            "mask_format": mask_format,
            "automatic_config": automatic_config,
            "prompted": boxes is not None,
        }
        sink = ParquetSink(out, summary) if parquet else JsonlSink(out, summary)
        with sink, tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr) as bar:
            for record in ray_records(ray, _rows(todo, boxes), _Segmenter, segmenter, batch_size, plan):
                sink.write(record)
                bar.update(1)
    return summary


def ray_records(
    ray, rows: list[dict], actor: type, actor_kwargs: dict, batch_size: int, plan: tuple[int, float, float]
) -> Iterator[dict]:
    """The pipeline of the module docstring: ``rows`` (``_rows``) read and decoded by CPU tasks, then
    ``batch_size`` at a time through a pool of ``actor(**actor_kwargs)`` (``plan``: ``actor_plan``),
    which answers each batch with a ``record`` column of JSON; the records, as they come."""
    n, gpus, cpus = plan
    # Callers count images with their own bar; Ray's count rows per stage, and say so at INFO.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Half a CPU per read task: decoding is light and partly I/O. Different resources also keep
    # Ray from fusing the reads into the model actors on CPU-only clusters, where they would
    # then run one after the other with the model instead of beside it.
    ds = ray.data.from_items(rows).map(_read_row, num_cpus=READ_CPUS)
    ds = ds.map_batches(
        actor,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=n),
        num_gpus=gpus,
        num_cpus=cpus,
        fn_constructor_kwargs=actor_kwargs,
    )
    for row in ds.iter_rows():
        yield json.loads(row["record"])
