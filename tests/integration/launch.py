"""`accelerate launch` on 2 processes (gloo on CPU) with a shipped accelerate config (DDP unless
said), for the tests that run the real CLI on several processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONFIGS = REPO / "experiments" / "accelerate"
ENV = {
    **os.environ,
    "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}",
    "OMP_NUM_THREADS": "1",
    "PYTHONFAULTHANDLER": "1",
}


def free_port() -> int:
    """A port nothing listens on now: each launch gets its own rendezvous port, so one launch
    cannot collide with the last one's socket on accelerate's default 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_2_command(*args: str, config: str = "ddp.yaml") -> list[str]:
    """The command line; `args` is what follows `accelerate launch [options]`, `config` the shipped
    accelerate config (experiments/accelerate/) it launches with."""
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    launch += ["--config_file", str(CONFIGS / config), "--num_processes", "2"]
    return [*launch, "--main_process_port", str(free_port()), *args]


def launch_2(*args: str, timeout: int = 300, config: str = "ddp.yaml") -> None:
    """Run it to the end; a failure shows the end of both output streams, a hang (`timeout` s) every
    live rank's Python stacks (SIGABRT, which faulthandler answers with them)."""
    proc = subprocess.Popen(
        launch_2_command(*args, config=config),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.send_signal(signal.SIGABRT)
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"hung for {timeout} s; the ranks' stacks:\n{err[-6000:]}") from None
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
