"""EmbeddingStore: image embeddings on disk, for whole datasets, one safetensors file per image.

Layout: ``DIR/<model>/<id[:2]>/<id>.safetensors``, where ``<model>`` names the engine's version,
encoder precision and weights fingerprint (``Sam2Engine.store_id``; the device is left out, so
embeddings made on a GPU serve a CPU server) and ``<id>`` is the image's content hash
(``ImageEmbedding.image_id``). Each file holds the three tensors the decoder needs, in float16:
``image_embed`` (256, 64, 64) and ``high_res_0`` (32, 256, 256), ``high_res_1`` (64, 128, 128),
about 8.4 MB an image (``BYTES_PER_IMAGE``), and in its header the format, the model id, the image
id and the original size (H, W).

Precision: the decoder runs on the stored values widened back (to float32, or bfloat16 for a bf16
engine), so float16 only rounds them (relative error <= 2**-11, well under the difference a
bfloat16 encoder makes). ``put`` hands back the embedding as stored, and the engine decodes that
one even on the run that computed it, so an image's masks do not depend on whether its embedding
was just computed or read back
(tests/test_store.py measures stored vs fresh float32 masks: IoU >= 0.99).

Files are written whole (a temporary name in the same folder, flushed to disk, then renamed), so
a crash leaves an old file, a new one or none, never half of one. Reading checks everything
(header, names, dtypes, shapes, model, image, finite values): a damaged or foreign file raises
``StoreError`` naming it and is never decoded into a mask. A store opened read-only never writes.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from .types import ImageEmbedding

FORMAT = "sam2flow.embedding"
FORMAT_VERSION = "1"
STORED_DTYPE = torch.float16
SHAPES = {"image_embed": (256, 64, 64), "high_res_0": (32, 256, 256), "high_res_1": (64, 128, 128)}
BYTES_PER_IMAGE = sum(2 * c * h * w for c, h, w in SHAPES.values())  # tensor data; the header adds < 1 KB
SUFFIX = ".safetensors"
_IMAGE_ID = re.compile(r"[0-9a-f]{32}")


class StoreError(ValueError):
    """A store file that cannot be used (damaged, foreign, or for other weights), or a write refused."""


def model_dir_name(model_id: str) -> str:
    """``"sam2.1_hiera_tiny|torch.float32|<fingerprint>"`` → ``"sam2.1_hiera_tiny-float32-<fingerprint>"``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model_id.replace("torch.", "")).strip("-.")


class EmbeddingStore:
    """Embeddings of many images under ``root``, keyed by model id and image id (see the module docstring).

    ``writable=False`` (read-only): ``root`` must exist and nothing is ever written. ``writable=True``
    creates ``root`` if needed. Thread- and process-safe: readers see whole files only, and two
    writers of one image write the same bytes.
    """

    def __init__(self, root: str | os.PathLike, writable: bool = False):
        self.root = Path(root).absolute()  # the same folder from a Ray actor or a server started elsewhere
        self.writable = writable
        if writable:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise StoreError(f"embedding store {self.root} is not a directory")

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.root)!r}, writable={self.writable})"

    def path(self, model_id: str, image_id: str) -> Path:
        """Where the embedding of ``image_id`` for ``model_id`` lives (whether or not it is there)."""
        if not _IMAGE_ID.fullmatch(image_id):
            raise StoreError(f"{image_id!r} is not an image id (32 lowercase hex digits)")
        return self.root / model_dir_name(model_id) / image_id[:2] / f"{image_id}{SUFFIX}"

    def __contains__(self, item: tuple[str, str]) -> bool:
        """``(model_id, image_id) in store``: whether a whole file for these ids is there, its header
        checked (about a millisecond; the tensor values are read and checked by ``get``). A damaged
        or foreign file counts as absent, so ``sam2flow embed`` writes it again."""
        path = self.path(*item)
        if not path.is_file():
            return False
        try:
            _read(path, *item, data=False)
        except StoreError:
            return False
        return True

    def get(self, model_id: str, image_id: str, device: str | torch.device = "cpu") -> ImageEmbedding | None:
        """The stored embedding (float32 on ``device``, key ``"<model_id>|<image_id>"``), or ``None``
        if there is none; ``StoreError`` naming the file if it is not a valid one for these ids."""
        path = self.path(model_id, image_id)
        if not path.is_file():
            return None
        tensors, size = _read(path, model_id, image_id)
        t = [tensors[name].to(device) for name in SHAPES]
        return ImageEmbedding(t[0], (t[1], t[2]), size, f"{model_id}|{image_id}")

    def put(self, model_id: str, embedding: ImageEmbedding) -> ImageEmbedding:
        """Write ``embedding`` (replacing any file of the same image) and return it as stored:
        rounded to float16, back in float32 on its device, with the same key."""
        if not self.writable:
            raise StoreError(f"embedding store {self.root} is read-only")
        image_id = embedding.image_id
        path = self.path(model_id, image_id)
        tensors = dict(zip(SHAPES, (embedding.image_embed, *embedding.high_res_feats)))
        stored = {}
        for name, t in tensors.items():
            if tuple(t.shape) != SHAPES[name]:
                raise StoreError(f"{name} of image {image_id} has shape {tuple(t.shape)}, expected {SHAPES[name]}")
            stored[name] = t.detach().to("cpu", STORED_DTYPE).contiguous()
            if not torch.isfinite(stored[name]).all():
                raise StoreError(f"{name} of image {image_id} is not finite in float16: not stored")
        h, w = embedding.original_size
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_id": model_id,
            "image_id": image_id,
            "original_size": f"{h},{w}",
        }
        _write_atomically(path, save(stored, metadata))
        device = embedding.image_embed.device
        t = [stored[name].to(device, torch.float32) for name in SHAPES]
        return ImageEmbedding(t[0], (t[1], t[2]), embedding.original_size, embedding.key)

    def usage(self, model_id: str | None = None) -> tuple[int, int]:
        """(images, bytes) stored for ``model_id`` (``None``: for every model)."""
        models = "*" if model_id is None else model_dir_name(model_id)
        files = list(self.root.glob(f"{models}/??/*{SUFFIX}"))
        return len(files), sum(f.stat().st_size for f in files)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(
    path: Path, model_id: str, image_id: str, data: bool = True
) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    """The tensors (float32 on the CPU) and original size (H, W) of a store file, every part checked
    (the header, and that the file holds all the data it declares, before any tensor is read);
    ``data=False``: the header only, and no tensors."""
    try:
        with safe_open(path, framework="pt") as f:
            size = _check_header(path, f.metadata() or {}, model_id, image_id)
            names = set(f.keys())
            if names != set(SHAPES):
                raise _bad(path, f"holds tensors {sorted(names)}, expected {sorted(SHAPES)}")
            for name in SHAPES:
                part = f.get_slice(name)
                if part.get_dtype() != "F16" or tuple(part.get_shape()) != SHAPES[name]:
                    raise _bad(path, f"{name} is {part.get_dtype()} {part.get_shape()}, expected F16 {SHAPES[name]}")
            if not data:
                return {}, size
            tensors = {name: f.get_tensor(name).float() for name in SHAPES}
    except StoreError:
        raise
    except Exception as e:  # safetensors' own errors (a torn or garbage file) have no common base class
        raise _bad(path, f"not a readable safetensors file ({type(e).__name__}: {e})") from None
    for name, t in tensors.items():
        if not torch.isfinite(t.sum()):  # any inf or NaN makes the sum so (float16 values cannot overflow it)
            raise _bad(path, f"{name} holds values that are not finite")
    return tensors, size


def _check_header(path: Path, meta: dict[str, str], model_id: str, image_id: str) -> tuple[int, int]:
    """The original size (H, W) from a store file's header, after checking its format and ids."""
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise _bad(path, f"not a {FORMAT} file of format version {FORMAT_VERSION}")
    if meta.get("model_id") != model_id:
        raise _bad(path, f"made by another model ({meta.get('model_id')!r}), expected {model_id!r}")
    if meta.get("image_id") != image_id:
        raise _bad(path, f"holds image {meta.get('image_id')!r}, expected {image_id!r}")
    try:
        h, w = (int(v) for v in meta.get("original_size", "").split(","))
    except ValueError:
        raise _bad(path, f"original_size {meta.get('original_size')!r} is not 'H,W'") from None
    if h < 1 or w < 1:
        raise _bad(path, f"original_size {h},{w} is not positive")
    return h, w


def _bad(path: Path, problem: str) -> StoreError:
    return StoreError(f"embedding store file {path}: {problem}")
