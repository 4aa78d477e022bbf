"""Dependencies between the top-level packages point one way.

alignment (records, config, conditioning, models, losses, the algorithms and the loop) imports
none of the others; samplers and rewards build on alignment's core only; experiments wires them
together. A cycle here is what made `samplers` import half-initialised modules before.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ALLOWED = {
    "alignment": set(),
    "samplers": {"alignment"},
    "rewards": {"alignment"},
    "experiments": {"alignment", "samplers", "rewards"},
}
# What a sampler or a reward never needs: the training stack (transformers itself loads
# accelerate when it is installed, so only our side of it is checked at run time).
TRAINING_STACK = ("alignment.loop", "alignment.trainer", "alignment.algorithms")


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in `path` (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_downwards(package):
    wrong = []
    for path in sorted((REPO / package).rglob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in ALLOWED and top != package and top not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(REPO)} imports {name}")
            if package in ("samplers", "rewards") and name.startswith(
                (*TRAINING_STACK, "accelerate")
            ):
                wrong.append(f"{path.relative_to(REPO)} imports the training stack: {name}")
    assert not wrong, "\n".join(wrong)


def test_rewards_and_samplers_load_without_the_training_stack():
    code = (
        "import sys, samplers, rewards, rewards.cli\n"
        "from rewards import load_reward\n"
        f"print([m for m in sys.modules if m.startswith({TRAINING_STACK!r})])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
