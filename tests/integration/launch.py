"""`accelerate launch` on 2 processes (gloo on CPU) with the shipped DDP config, for the tests
that run the real CLI on several processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONFIGS = REPO / "experiments" / "accelerate"
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}


def launch_2_command(*args: str) -> list[str]:
    """The command line; `args` is what follows `accelerate launch [options]`."""
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    return [*launch, "--config_file", str(CONFIGS / "ddp.yaml"), "--num_processes", "2", *args]


def launch_2(*args: str) -> None:
    """Run it to the end; a failure shows the end of both output streams."""
    done = subprocess.run(
        launch_2_command(*args), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
