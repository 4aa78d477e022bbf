"""`accelerate launch` on 2 processes (gloo on CPU) with the shipped DDP config, for the tests
that run the real CLI on several processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONFIGS = REPO / "experiments" / "accelerate"
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    """A port nothing listens on now: each launch gets its own rendezvous port, so one launch
    cannot collide with the last one's socket on accelerate's default 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_2_command(*args: str) -> list[str]:
    """The command line; `args` is what follows `accelerate launch [options]`."""
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    launch += ["--config_file", str(CONFIGS / "ddp.yaml"), "--num_processes", "2"]
    return [*launch, "--main_process_port", str(free_port()), *args]


def launch_2(*args: str) -> None:
    """Run it to the end; a failure shows the end of both output streams."""
    done = subprocess.run(
        launch_2_command(*args), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
