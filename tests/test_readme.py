"""The README's first run works as written, offline, with no files of the user's.

The commands of the "Set up and run" section (all but the set-up script, which CI has just run)
are run as a new user would type them, in an empty directory, with the Hugging Face Hub offline.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def first_run_commands() -> list[str]:
    """The offline commands of "## Set up and run": its bash blocks up to the one that needs weights."""
    section = README.read_text().split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    commands = []
    for block in blocks[:2]:  # set-up + demo, then the step-by-step offline block; the third needs weights
        for line in block.splitlines():
            command = line.split("  #", 1)[0].strip()
            if command and not command.startswith("bash tools/setup-dev.sh"):
                commands.append(command)
    return commands


def test_the_first_run_works_offline(tmp_path):
    commands = first_run_commands()
    assert commands[0].startswith("sam2flow demo") and any(c.startswith("sam2flow segment") for c in commands)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "SAM2FLOW_WEIGHTS_DIR": str(tmp_path / "no-weights"),
    }
    outputs = []
    for command in commands:
        run = subprocess.run(shlex.split(command), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, (command, run.stderr[-2000:])
        outputs.append(run.stdout)
    result = json.loads((tmp_path / "sam2flow-demo" / "result.json").read_text())
    assert len(result["predictions"]["predictions"]) == 4
    segmented = json.loads(outputs[-1])
    assert segmented["image"] == {"width": 640, "height": 480}
    (pred,) = segmented["predictions"]
    # the box of the README's command is the demo scene's polygon (98..168 x 129..183): its mask fills it
    assert abs(pred["x"] - 133.5) < 6 and abs(pred["y"] - 156.5) < 6 and pred["width"] > 50, pred
    assert (tmp_path / "out.png").is_file()
