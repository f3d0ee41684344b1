"""What the Ray modules share: a clear error when Ray is missing, and joining or starting a cluster."""

from __future__ import annotations

import logging
from contextlib import contextmanager

INSTALL_HINT = "pip install 'sam2flow[ray]'"


def require_ray():
    """The ``ray`` module with Serve and Data importable, or a ``ValueError`` telling how to get them."""
    try:
        import ray
        import ray.data  # noqa: F401  (both parts must be there, not just the core)
        import ray.serve  # noqa: F401
    except ImportError as e:
        raise ValueError(f"--ray needs Ray (Serve and Data), which is not installed ({e}): {INSTALL_HINT}") from None
    return ray


@contextmanager
def ray_cluster(address: str | None):
    """Connect to the cluster at ``address`` (``auto``: the one this machine belongs to), or start a
    local one when ``address`` is ``None`` and ``RAY_ADDRESS`` is unset.

    A Ray session the caller already opened (a notebook, a test) is used as it is and left running;
    one opened here is shut down on exit.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    ray.init(address=address, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()
