"""``sam2flow batch``: segment a directory of images into JSON Lines, resumably.

One record per image, appended and flushed as soon as it is done, so an interrupted run loses
nothing written; a re-run skips every file already in the output. Unreadable images get a record
with an ``error`` and never stop the run.
"""

from __future__ import annotations

import glob
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..formats import detections_to_predictions, predictions_to_detections
from ..workflows.inputs import decode_image_bytes
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
    data = json.loads(entry.read_text()) if isinstance(entry, Path) else entry
    return predictions_to_detections(data, hw)


def _segment(engine, names, images, boxes, params, mask_format, automatic_config) -> dict[str, dict]:
    if not images:
        return {}
    dets = None if boxes is None else [_detections_for(boxes, Path(n).stem, im.shape[:2]) for n, im in zip(names, images)]
    results = segment_images(engine, images, names, dets, params, automatic_config)  # one batched embedding
    return {n: {"file": n, "image": {"width": im.shape[1], "height": im.shape[0]},
                "predictions": detections_to_predictions(d, mask_format)}
            for n, im, d in zip(names, images, results)}


def _chunks(files: list[Path], size: int) -> Iterator[list[Path]]:
    for i in range(0, len(files), size):
        yield files[i : i + size]


def run_batch(engine, source: str, out: Path, boxes_source: str | None = None, mask_format: str = "rle",
              batch_size: int = 4, params: StepParameters | None = None, progress: bool = True,
              automatic_config=None) -> BatchSummary:
    """Segment every image under ``source`` into ``out`` (JSONL); see the module docstring."""
    from tqdm import tqdm

    params = params or StepParameters()
    files = list_images(source)
    boxes = load_boxes(boxes_source)
    seen = done_files(out)
    summary = BatchSummary(skipped=sum(f.name in seen for f in files))
    todo = [f for f in files if f.name not in seen]
    out.parent.mkdir(parents=True, exist_ok=True)
    # A crash can leave a last line without its newline: start the next record on a line of its own.
    needs_newline = out.exists() and out.stat().st_size > 0 and not out.read_bytes().endswith(b"\n")
    with open(out, "a") as sink, tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr) as bar:
        if needs_newline:
            sink.write("\n")
        for chunk in _chunks(todo, batch_size):
            records = {f.name: None for f in chunk}
            images, names = [], []
            for f in chunk:
                try:
                    images.append(decode_image_bytes(f.read_bytes(), f.name))
                    names.append(f.name)
                except (OSError, ValueError) as e:
                    records[f.name] = {"file": f.name, "error": str(e)}
            try:
                records.update(_segment(engine, names, images, boxes, params, mask_format, automatic_config))
            except ValueError:  # one image's bad boxes must not lose the others: redo them one by one
                for n, im in zip(names, images):
                    try:
                        records.update(_segment(engine, [n], [im], boxes, params, mask_format, automatic_config))
                    except ValueError as e:
                        records[n] = {"file": n, "error": str(e)}
            for name, record in records.items():
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                if "error" in record:
                    summary.failed.append(name)
                else:
                    summary.done += 1
            bar.update(len(chunk))
    return summary
