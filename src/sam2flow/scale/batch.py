"""``sam2flow batch``: segment a directory of images into JSON Lines, resumably.

One record per image, appended and flushed as soon as it is done, so an interrupted run loses
nothing written; a re-run skips every file already in the output. Unreadable images get a record
with an ``error`` and never stop the run.
"""

from __future__ import annotations

import glob
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..formats import detections_to_predictions, predictions_to_detections
from ..images import read_image_file as _read_image_file
from ..workflows.step import StepParameters, segment_images

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class BatchSummary:
    done: int = 0
    failed: list[str] = field(default_factory=list)
    skipped: int = 0

    def line(self) -> str:
        return f"{self.done} segmented, {len(self.failed)} failed, {self.skipped} already done"


def list_images(source: str) -> list[Path]:
    """A directory's images (sorted), or the files a glob pattern matches."""
    path = Path(source)
    if path.is_dir():
        files = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    else:
        files = [Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file()]
    if not files:
        raise ValueError(f"no images found at {source}")
    return sorted(files)


def load_boxes(source: str | None) -> dict[str, object] | None:
    """Detections per image: a directory of ``<stem>.json`` files or one JSONL with a ``file`` key."""
    if source is None:
        return None
    path = Path(source)
    if path.is_dir():
        return {p.stem: p for p in path.glob("*.json")}
    if not path.is_file():
        raise ValueError(f"--boxes {source} does not exist")
    boxes = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
                boxes[Path(record["file"]).stem] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"--boxes {source} line {n}: expected JSON with a 'file' key") from None
    return boxes


def done_files(out: Path) -> set[str]:
    """File names already recorded in ``out`` (a torn last line from a crash is ignored)."""
    if not out.exists():
        return set()
    names = set()
    for line in out.read_text().splitlines():
        try:
            names.add(json.loads(line)["file"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return names


def _detections_for(boxes, stem: str, hw):
    entry = boxes.get(stem)
    if entry is None:
        return predictions_to_detections([], hw)
    if isinstance(entry, Path):
        entry = entry.read_text()
    data = json.loads(entry) if isinstance(entry, str) else entry  # str: JSON text, as Ray rows carry it
    return predictions_to_detections(data, hw)


def _segment(engine, names, images, boxes, params, mask_format, automatic_config) -> dict[str, dict]:
    if not images:
        return {}
    dets = (
        None if boxes is None else [_detections_for(boxes, Path(n).stem, im.shape[:2]) for n, im in zip(names, images)]
    )
    results = segment_images(engine, images, names, dets, params, automatic_config)  # one batched embedding
    return {
        n: {
            "file": n,
            "image": {"width": im.shape[1], "height": im.shape[0]},
            "predictions": detections_to_predictions(d, mask_format),
        }
        for n, im, d in zip(names, images, results)
    }


def read_image_file(path: Path) -> np.ndarray:
    """A batch job's image as RGB uint8 (H, W, 3); its ``ValueError`` names the file by its name."""
    return _read_image_file(path, path.name)


def error_record(name: str, error: Exception) -> dict:
    return {"file": name, "error": str(error)}


def segment_records(
    engine,
    names: list[str],
    images: list[np.ndarray],
    boxes,
    params: StepParameters,
    mask_format: str = "rle",
    automatic_config=None,
) -> dict[str, dict]:
    """Records of decoded images (RGB uint8, any sizes), embedded together, keyed by file name.

    ``boxes`` maps a file stem to its detections (a ``Path`` of JSON, JSON text or a parsed record), or is
    ``None`` for unprompted mode. One image whose boxes are invalid gets an error record and does
    not lose the others.
    """
    try:
        return _segment(engine, names, images, boxes, params, mask_format, automatic_config)
    except ValueError:  # redo them one by one, so only the bad one fails
        records = {}
        for n, im in zip(names, images):
            try:
                records.update(_segment(engine, [n], [im], boxes, params, mask_format, automatic_config))
            except ValueError as e:
                records[n] = error_record(n, e)
        return records


def pending(source: str, seen: set[str]) -> tuple[list[Path], BatchSummary]:
    """The images under ``source`` not yet in ``seen`` (file names), and a summary counting the skipped."""
    files = list_images(source)
    todo = [f for f in files if f.name not in seen]
    return todo, BatchSummary(skipped=len(files) - len(todo))


class JsonlSink:
    """Appends records to a JSONL file, one flushed line each, and counts them into a summary."""

    def __init__(self, out: Path, summary: BatchSummary):
        self.summary = summary
        out.parent.mkdir(parents=True, exist_ok=True)
        # A crash can leave a last line without its newline: start the next record on a line of its own.
        torn = out.exists() and out.stat().st_size > 0 and not out.read_bytes().endswith(b"\n")
        self._file = open(out, "a")
        if torn:
            self._file.write("\n")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        count(self.summary, record)

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def count(summary: BatchSummary, record: dict) -> None:
    if "error" in record:
        summary.failed.append(record["file"])
    else:
        summary.done += 1


def _chunks(files: list[Path], size: int) -> Iterator[list[Path]]:
    for i in range(0, len(files), size):
        yield files[i : i + size]


def run_batch(
    engine,
    source: str,
    out: Path,
    boxes_source: str | None = None,
    mask_format: str = "rle",
    batch_size: int = 4,
    params: StepParameters | None = None,
    progress: bool = True,
    automatic_config=None,
) -> BatchSummary:
    """Segment every image under ``source`` into ``out`` (JSONL); see the module docstring."""
    from tqdm import tqdm

    params = params or StepParameters()
    todo, summary = pending(source, done_files(out))
    boxes = load_boxes(boxes_source)
    with (
        JsonlSink(out, summary) as sink,
        tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr) as bar,
    ):
        for chunk in _chunks(todo, batch_size):
            records = {f.name: None for f in chunk}
            images, names = [], []
            for f in chunk:
                try:
                    images.append(read_image_file(f))
                    names.append(f.name)
                except (OSError, ValueError) as e:
                    records[f.name] = error_record(f.name, e)
            records.update(segment_records(engine, names, images, boxes, params, mask_format, automatic_config))
            for record in records.values():
                sink.write(record)
            bar.update(len(chunk))
    return summary
