"""``sam2flow serve --ray``: the plain server's FastAPI app (``server/app.py``) behind Ray Serve.

Each replica is a Ray actor holding one ``create_app(settings)``, mounted with ``@serve.ingress``,
so routes, validation, errors and response bodies are the plain server's, byte for byte, and
``inference-sdk`` works unchanged. A replica asks for ``num_gpus`` (a share: 0.5 puts two replicas
on one GPU) and ``num_cpus``; Serve's router spreads requests over replicas and, given
``min_replicas``/``max_replicas``, adds or removes replicas with the load.

Batching: the plain app already batches embeddings itself (``server/batching.EmbedBatcher``, a
thread per app). In a replica that batcher is swapped for ``ServeEmbedBatcher``, which does the same
job with ``@serve.batch`` on the replica's event loop, so there is one batching layer, not two, and
it is Serve's (same ``max_batch_size``/``max_wait_ms`` settings, one batch at a time per replica).

The app is built inside each replica, not pickled from the driver: a live app holds threads and
models. ``app_builder`` is the entry point of ``serve run`` / ``serve deploy`` configs
(deploy/ray-serve.yaml).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import numpy as np

from ..engine.types import ImageEmbedding
from ..server import ready as server_ready
from ..server.batching import Engine, embed_each
from ..server.settings import ServerSettings
from .ray_common import ray_cluster, require_ray

APP_NAME = "sam2flow"
REPLICA_OPTIONS = (
    "replicas",
    "min_replicas",
    "max_replicas",
    "num_gpus_per_replica",
    "num_cpus_per_replica",
    "target_ongoing_requests",
)


class ServeEmbedBatcher:
    """The app's batcher interface (``server.batching.EmbeddingBatcher``: ``submit``, ``embed``,
    ``close``) on ``@serve.batch``.

    ``submit`` is called on the replica's event loop (request handlers); ``embed`` from worker
    threads (the workflow runner), which hand the work to that loop.
    """

    def __init__(self, max_batch_size: int, max_wait_s: float, on_batch=None):
        from ray import serve

        on_batch = on_batch or (lambda n: None)

        async def embed_many(items: list[tuple]) -> list:
            on_batch(len(items))
            results: list = [None] * len(items)
            groups: dict[int, list[int]] = {}  # concurrent requests may name different models
            for i, (engine, _) in enumerate(items):
                groups.setdefault(id(engine), []).append(i)
            for idx in groups.values():
                engine = items[idx[0]][0]
                # Model work off the event loop, which keeps collecting the next batch meanwhile.
                embs = await asyncio.to_thread(embed_each, engine, [items[i][1] for i in idx])
                for i, emb in zip(idx, embs):
                    results[i] = emb
            return results

        self._batched = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=max_wait_s)(embed_many)
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def _one(self, engine: Engine, image: np.ndarray) -> ImageEmbedding:
        result = await self._batched((engine, image))
        if isinstance(result, Exception):
            raise result
        return result

    def submit(self, engine: Engine, image: np.ndarray) -> asyncio.Future:
        """Queue one RGB image for ``engine`` (on the event loop); resolves to its ``ImageEmbedding``."""
        self._loop = asyncio.get_running_loop()
        return asyncio.ensure_future(self._one(engine, image))

    def embed(self, engine: Engine, images: list[np.ndarray]) -> list[ImageEmbedding]:
        """Blocking form for worker threads: same batching as ``submit``."""
        if self._loop is None:
            raise RuntimeError("ServeEmbedBatcher.embed called before the replica served a request")

        async def gather():
            return await asyncio.gather(*(self._one(engine, im) for im in images))

        return asyncio.run_coroutine_threadsafe(gather(), self._loop).result()

    def close(self) -> None:
        pass


class ReplicaApp:
    """An ASGI app that becomes ``create_app(settings)`` (with Serve's batcher) inside the replica.

    Only the settings travel to the replica; the first ASGI event there (the lifespan start-up, as
    the replica starts) builds the app, whose start-up then preloads the models.
    """

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.app = None
        self.batcher: ServeEmbedBatcher | None = None

    def _build(self):
        from ..server.app import create_app

        app = create_app(self.settings)
        state = app.state.sam2flow
        state.batcher.close()  # the app's own batching thread: Serve batches instead
        self.batcher = ServeEmbedBatcher(
            self.settings.embed_batch_size(), self.settings.max_wait_ms / 1000, state.metrics.batch_size.observe
        )
        state.batcher = self.batcher
        self.app = app

    async def __call__(self, scope, receive, send):
        if self.app is None:
            self._build()
        self.batcher.bind(asyncio.get_running_loop())
        await self.app(scope, receive, send)


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def build_app(
    settings: ServerSettings,
    replicas: int | None = None,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    num_gpus_per_replica: float | None = None,
    num_cpus_per_replica: float = 1.0,
    target_ongoing_requests: float = 2.0,
):
    """The Serve application (``serve.run`` it): ``replicas`` fixed, or autoscaling between
    ``min_replicas`` and ``max_replicas`` (starting at ``replicas`` if given) aiming at
    ``target_ongoing_requests`` per replica. ``num_gpus_per_replica``: default one GPU each on a
    cluster with GPUs, none otherwise. Must run where Ray is initialised.
    """
    ray = require_ray()
    serve = ray.serve
    if num_gpus_per_replica is None:
        num_gpus_per_replica = 1.0 if _cluster_gpus() >= 1 else 0.0
    if num_gpus_per_replica < 0 or num_cpus_per_replica < 0:
        raise ValueError("GPUs and CPUs per replica must be >= 0")
    if any(n is not None and n < 1 for n in (replicas, max_replicas)) or (min_replicas or 0) < 0:
        raise ValueError("replicas and max_replicas must be >= 1, min_replicas >= 0")
    options: dict = {
        "name": APP_NAME,
        "ray_actor_options": {"num_gpus": num_gpus_per_replica, "num_cpus": num_cpus_per_replica},
        # Enough requests in flight per replica to fill an embedding batch.
        "max_ongoing_requests": max(8, 2 * settings.embed_batch_size()),
    }
    if min_replicas is not None or max_replicas is not None:
        low = 1 if min_replicas is None else min_replicas
        high = max(low, 1) if max_replicas is None else max_replicas
        if low > high:
            raise ValueError(f"min_replicas {low} is more than max_replicas {high}")
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "target_ongoing_requests": target_ongoing_requests,
        }
        if replicas is not None:
            options["autoscaling_config"]["initial_replicas"] = min(max(replicas, low), high)
    else:
        options["num_replicas"] = 1 if replicas is None else replicas

    @serve.ingress(ReplicaApp(settings))
    class Sam2Server:
        """One replica: the plain server's app (see ``ReplicaApp``)."""

    return serve.deployment(Sam2Server, **options).bind()


def app_builder(args: dict):
    """``serve run`` / ``serve deploy`` entry point: ``args`` holds server settings (the
    ``ServerSettings`` fields, as ``SAM2FLOW_*`` variables name them, lower case without the prefix)
    and replica options (``REPLICA_OPTIONS``). Settings not given come from ``SAM2FLOW_*``.
    """
    args = dict(args or {})
    unknown = set(args) - set(REPLICA_OPTIONS) - set(ServerSettings.model_fields)
    if unknown:
        raise ValueError(f"unknown sam2flow option(s): {', '.join(sorted(unknown))}")
    replica = {k: args.pop(k) for k in REPLICA_OPTIONS if k in args and args[k] is not None}
    for key in ("replicas", "min_replicas", "max_replicas"):
        if key in replica:
            replica[key] = int(replica[key])
    for key in ("num_gpus_per_replica", "num_cpus_per_replica", "target_ongoing_requests"):
        if key in replica:
            replica[key] = float(replica[key])
    return build_app(ServerSettings(**args), **replica)


def wait_ready(url: str, timeout_s: float = 600) -> None:
    """Block until the Ray Serve app at ``url`` is ready (the replicas' preloaded models are in);
    ``ValueError`` if a model fails to load or the time runs out."""
    server_ready.wait_ready(url, timeout_s, name="the Ray Serve app (a replica)")


def _stop(signum, frame):
    raise KeyboardInterrupt


def serve_forever(settings: ServerSettings, address: str | None = None, **replica_options) -> None:
    """``sam2flow serve --ray``: deploy on the cluster at ``address`` (``None``: ``$RAY_ADDRESS`` or
    a new local cluster), wait until ready, then hold until Ctrl-C or SIGTERM and take the app down:
    on a cluster of our own all of Serve goes; on a shared one only this app."""
    import os

    ray = require_ray()
    shared = address is not None or bool(os.environ.get("RAY_ADDRESS")) or ray.is_initialized()
    with ray_cluster(address):
        serve = ray.serve
        # HTTP options bind when Serve first starts on a cluster; an already running Serve keeps its own.
        serve.start(http_options={"host": settings.host, "port": settings.port})
        signal.signal(signal.SIGTERM, _stop)  # a process manager's stop takes the app down as Ctrl-C does
        try:
            # Serve's access log names only the route prefix of a mounted ASGI app ("POST /" for every
            # route); the app counts requests and latency per route in /metrics instead.
            serve.run(
                build_app(settings, **replica_options),
                name=APP_NAME,
                route_prefix="/",
                logging_config={"enable_access_log": False},
            )
            host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
            url = f"http://{host}:{settings.port}"
            wait_ready(url)
            print(f"sam2flow serve: Ray Serve app '{APP_NAME}' ready at {url}", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            if shared:
                serve.delete(APP_NAME)
            else:
                serve.shutdown()
