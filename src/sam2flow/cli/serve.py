"""``sam2flow serve``: the inference server (FastAPI on uvicorn), or the same app on Ray Serve."""

from __future__ import annotations

from ..engine.options import DTYPE_CHOICES
from ..models.registry import FAMILIES, VERSIONS
from .common import add_backend_arg, add_store_args, for_remote_workers


def add_parser(sub) -> None:
    srv = sub.add_parser("serve", help="run the SAM2 inference server (inference-sdk compatible HTTP API)")
    srv.add_argument("--host", help="default 127.0.0.1 (SAM2FLOW_HOST)")
    srv.add_argument("--port", type=int, help="default 9001 (SAM2FLOW_PORT)")
    srv.add_argument("--device", help="auto, cpu, cuda, mps (SAM2FLOW_DEVICE)")
    srv.add_argument("--dtype", choices=DTYPE_CHOICES, help="encoder precision, default auto (SAM2FLOW_DTYPE)")
    add_backend_arg(srv, default=None)
    srv.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the image encoder at load (SAM2FLOW_COMPILE)",
    )
    srv.add_argument("--family", choices=FAMILIES, help="sam2.1 or sam2 (SAM2FLOW_FAMILY)")
    srv.add_argument(
        "--preload",
        action="append",
        choices=VERSIONS,
        help="load this version at start-up; repeatable (SAM2FLOW_PRELOAD=a,b)",
    )
    srv.add_argument("--checkpoint", help="weights for the first preloaded version (SAM2FLOW_CHECKPOINT)")
    srv.add_argument("--max-batch-size", type=int, help="images embedded together (SAM2FLOW_MAX_BATCH_SIZE)")
    srv.add_argument("--max-wait-ms", type=float, help="batching wait (SAM2FLOW_MAX_WAIT_MS)")
    srv.add_argument(
        "--click-spin-ms",
        type=float,
        help="after a click, keep a CPU busy this long waiting for the next (default 1000; 0: off) "
        "(SAM2FLOW_CLICK_SPIN_MS)",
    )
    srv.add_argument("--images", metavar="DIR", help="labelling page: label the images of DIR (read-only)")
    srv.add_argument("--labels", metavar="A,B,...", help="labelling page: the class list (SAM2FLOW_LABELS)")
    srv.add_argument(
        "--annotations",
        metavar="OUT.json",
        help="with --images: the COCO file saved as you go (default <DIR name>.coco.json)",
    )
    add_store_args(srv, env=True)
    srv.add_argument("--ray", action="store_true", help="deploy on Ray Serve (pip install 'sam2flow[ray]')")
    srv.add_argument(
        "--ray-address",
        help="with --ray: the cluster to join ('auto': this machine's; default $RAY_ADDRESS, else a new local cluster)",
    )
    srv.add_argument(
        "--replicas", type=int, help="with --ray: model replicas (default 1; the initial number when autoscaling)"
    )
    srv.add_argument("--min-replicas", type=int, help="with --ray: autoscale from this many replicas")
    srv.add_argument("--max-replicas", type=int, help="with --ray: autoscale up to this many replicas")
    srv.add_argument(
        "--num-gpus-per-replica",
        type=float,
        help="with --ray: GPU share per replica (0.5: two per GPU; default 1 if the cluster has GPUs)",
    )
    srv.add_argument("--num-cpus-per-replica", type=float, default=1.0, help="with --ray: CPUs per replica")
    srv.set_defaults(run=run)


def run(args) -> int:
    from ..server.settings import ServerSettings

    overrides = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields and v is not None}
    settings = ServerSettings(**overrides)
    if args.ray:
        return _run_ray(args, settings)
    import uvicorn

    from ..server.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")
    return 0


def _run_ray(args, settings) -> int:
    from ..scale.ray_common import require_ray

    require_ray()  # before any work: without Ray this is the one line the user sees
    from ..scale.ray_serve import serve_forever

    settings.checkpoint = for_remote_workers(settings.checkpoint)
    settings.store = for_remote_workers(settings.store)
    serve_forever(
        settings,
        args.ray_address,
        replicas=args.replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        num_gpus_per_replica=args.num_gpus_per_replica,
        num_cpus_per_replica=args.num_cpus_per_replica,
    )
    return 0
