"""Waiting for a server to come up: for whoever starts one (the Ray Serve launcher, tests, benchmarks).

A server answers ``GET /readyz`` with 200 once its preloaded models are in, and with 503 and a JSON
``{"error": ...}`` when one failed to load (``server/app.py``).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import requests


def _tail(log: Path | None, chars: int = 2000) -> str:
    if log is None:
        return ""
    try:
        return ": " + Path(log).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def wait_ready(
    url: str,
    timeout_s: float = 600,
    process: subprocess.Popen | None = None,
    log: Path | None = None,
    name: str = "the server",
) -> None:
    """Block until ``url``/readyz answers 200.

    ``ValueError`` (its message names ``name``, ends with the tail of ``log`` when given) if a model
    failed to load, if ``process`` (the server's, when the caller started one) exits first, or if
    ``timeout_s`` passes.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise ValueError(f"{name} exited with code {process.returncode} before it was ready{_tail(log)}")
        try:
            response = requests.get(f"{url}/readyz", timeout=5)
            if response.status_code == 200:
                return
            if response.headers.get("content-type", "").startswith("application/json"):
                error = response.json().get("error")
                if error:
                    raise ValueError(f"{name} could not load its model: {error}{_tail(log)}")
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise ValueError(f"{name} at {url} was not ready after {timeout_s:.0f} s{_tail(log)}")
        time.sleep(0.25)
