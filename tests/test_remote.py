"""Remote step execution against a live server gives the same detections as local execution."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from sam2flow import EnginePool, run_workflow
from sam2flow.engine.automatic import AutomaticConfig
from sam2flow.workflows.remote import RemoteStepError

from conftest import SERVER_API_KEY, SERVER_POINTS_PER_SIDE, random_image
from test_workflow_run import DEFINITION, DETECTIONS, IMAGES


def test_remote_equals_local(live_server, tiny_engine):
    inputs = {"image": IMAGES, "detections": DETECTIONS}
    local = run_workflow(DEFINITION, inputs, EnginePool.of(tiny_engine))
    remote = run_workflow(DEFINITION, inputs, execution="remote", api_url=live_server, api_key=SERVER_API_KEY)
    for a, b in zip(local, remote):
        a, b = a["predictions"], b["predictions"]
        assert np.array_equal(a.mask, b.mask)
        assert np.array_equal(a.xyxy, b.xyxy) and np.array_equal(a.class_id, b.class_id)
        np.testing.assert_allclose(a.confidence, b.confidence, atol=1e-6)
        for key in ("class_name", "parent_id", "root_parent_id", "prediction_type", "image_dimensions"):
            assert list(map(str, a.data[key])) == list(map(str, b.data[key])), key


def test_remote_unprompted_equals_local(live_server, tiny_engine):
    definition = {
        **DEFINITION,
        "inputs": [i for i in DEFINITION["inputs"] if i["name"] != "detections"],
        "steps": [{k: v for k, v in DEFINITION["steps"][0].items() if k != "boxes"}],
    }
    image = random_image(96, 128, seed=77)
    config = AutomaticConfig(points_per_side=SERVER_POINTS_PER_SIDE)  # what the server uses
    local = run_workflow(definition, {"image": image}, EnginePool.of(tiny_engine), config)[0]["predictions"]
    remote = run_workflow(
        definition, {"image": image}, execution="remote", api_url=live_server, api_key=SERVER_API_KEY
    )[0]["predictions"]
    assert np.array_equal(local.mask, remote.mask) and list(local.data["class_name"]) == list(remote.data["class_name"])


def test_remote_env_variable_and_errors(live_server, monkeypatch):
    inputs = {"image": IMAGES[0], "detections": DETECTIONS[0]}
    monkeypatch.setenv("SAM2FLOW_REMOTE_URL", live_server)
    monkeypatch.setenv("SAM2FLOW_API_KEY", "wrong-key")
    with pytest.raises(RemoteStepError, match=rf"{live_server}.*401"):
        run_workflow(DEFINITION, inputs)
    monkeypatch.setenv("SAM2FLOW_API_KEY", SERVER_API_KEY)
    assert len(run_workflow(DEFINITION, inputs)[0]["predictions"]) == 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(RemoteStepError, match=rf"cannot reach the SAM2 server at {dead}"):
        run_workflow(DEFINITION, inputs, execution="remote", api_url=dead)
    with pytest.raises(ValueError, match="local' or 'remote"):
        run_workflow(DEFINITION, inputs, execution="cloud")


def test_cli_remote_flag(live_server, tmp_path, monkeypatch):
    import json
    import subprocess
    import sys

    from PIL import Image

    Image.fromarray(IMAGES[0]).save(tmp_path / "a.png")
    (tmp_path / "wf.json").write_text(json.dumps(DEFINITION))
    (tmp_path / "d.json").write_text(json.dumps(DETECTIONS[0]))
    env = {**__import__("os").environ, "SAM2FLOW_API_KEY": SERVER_API_KEY}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sam2flow",
            "run-workflow",
            str(tmp_path / "wf.json"),
            "--remote",
            live_server,
            "--input",
            f"image={tmp_path / 'a.png'}",
            "--input",
            f"detections=@{tmp_path / 'd.json'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert [p["class"] for p in json.loads(proc.stdout)[0]["predictions"]["predictions"]] == ["cat", "dog"]
