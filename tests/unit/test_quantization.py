"""8/4-bit frozen models: refused with the option's name where bitsandbytes cannot run."""

import pytest
import torch

from alignment.config import load_config
from alignment.errors import UserError
from alignment.loop import run
from alignment.models import quantization_config
from rewards import load_reward

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")


def test_full_precision_needs_no_config():
    assert quantization_config(None, "model.reference_quantization") is None


def test_unknown_quantization_is_named():
    with pytest.raises(UserError, match="reward quantization must be 8bit or 4bit"):
        quantization_config("16bit", "reward quantization")
    with pytest.raises(UserError, match="'model.reference_quantization' must be one of"):
        load_config(None, ["model.reference_quantization=16bit"])


@needs_cpu_only
def test_a_quantized_reference_on_cpu_fails_before_the_run_dir_is_claimed(tmp_path):
    config = load_config(None, [f"out_dir={tmp_path / 'run'}", "model.reference_quantization=8bit"])
    with pytest.raises(UserError, match=r"model.reference_quantization=8bit needs a CUDA GPU"):
        run(config, score=lambda p, c: [0.0] * len(c), make_sampler=None)  # type: ignore[arg-type]
    assert not (tmp_path / "run" / "config.yaml").exists()


@needs_cpu_only
def test_a_quantized_reward_on_cpu_is_refused(tiny_model_dir):
    with pytest.raises(UserError, match="reward quantization=4bit needs a CUDA GPU"):
        load_reward(f"classifier:{tiny_model_dir}", quantization="4bit", label=0)
