"""``sam2flow embed IMAGES --store DIR``: a dataset's image embeddings into a store, resumably (or on Ray)."""

from __future__ import annotations

import sys

from .common import add_model_args, add_ray_args, engine_args, for_remote_workers


def add_parser(sub) -> None:
    emb = sub.add_parser(
        "embed", help="compute image embeddings ahead of time into a store (for serve/batch --store), resumably"
    )
    emb.add_argument("images", nargs="+", help="directories of images, glob patterns (quote them) or files")
    emb.add_argument("--store", required=True, metavar="DIR", help="the store (created if missing; re-runs skip)")
    emb.add_argument("--batch-size", type=int, help="images embedded together (default 1 on a CPU, 4 on GPUs)")
    add_model_args(emb)
    emb.add_argument("--ray", action="store_true", help="spread the work over Ray (pip install 'sam2flow[ray]')")
    add_ray_args(emb, "embedding")
    emb.set_defaults(run=run)


def run(args) -> int:
    from ..engine.engine import default_batch_size
    from ..engine.store import BYTES_PER_IMAGE, EmbeddingStore
    from ..scale.embed import job_engine, run_embed, run_ray_embed

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    job = engine_args(args, max_batch_size=args.batch_size)
    if args.ray:
        from ..scale.ray_common import require_ray

        require_ray()  # before any work: without Ray this is the one line the user sees
    store = EmbeddingStore(args.store, writable=True)
    if args.ray:
        job["checkpoint"] = for_remote_workers(args.checkpoint)
        ray_args = (args.ray_address, args.ray_actors, args.ray_gpus_per_actor, args.ray_cpus_per_actor)
        batch = args.batch_size or default_batch_size(args.device)
        summary = run_ray_embed(str(store.root), args.images, job, batch, *ray_args)
        model_id = None  # the actors' engines know it; the whole store is counted
    else:
        engine = job_engine(job)
        summary = run_embed(engine, store, args.images, engine.max_batch_size)
        model_id = engine.store_id
    images, size = store.usage(model_id)
    per_image = size / images if images else BYTES_PER_IMAGE
    print(
        f"sam2flow embed: {summary.line()}; store {store.root}: {images} images, "
        f"{size / 1e9:.2f} GB ({per_image / 1e6:.1f} MB per image, float16)",
        file=sys.stderr,
    )
    return 1 if summary.failed else 0
