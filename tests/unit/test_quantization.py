"""8/4-bit frozen models through bitsandbytes, which runs on CPU too (its CPU backend): quantized
for real and close to full precision; refused with the option's name where it is not installed."""

import importlib.util

import pytest
import torch
from conftest import build_tiny_tokenizer
from transformers import GPTJConfig, GPTJForCausalLM, GPTJForSequenceClassification

from alignment.config import load_config
from alignment.errors import UserError
from alignment.loop import run
from alignment.models import load_model_and_tokenizer, quantization_config
from rewards import load_reward

# bitsandbytes is a dependency on Linux only
needs_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes"
)


def test_full_precision_needs_no_config():
    assert quantization_config(None, "model.reference_quantization") is None


def test_unknown_quantization_is_named():
    with pytest.raises(UserError, match="reward quantization must be 8bit or 4bit"):
        quantization_config("16bit", "reward quantization")
    with pytest.raises(UserError, match="'model.reference_quantization' must be one of"):
        load_config(None, ["model.reference_quantization=16bit"])


@pytest.fixture
def without_bitsandbytes(monkeypatch):
    """This process as on a machine where bitsandbytes is not installed (not Linux)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a),
    )


def test_a_quantized_reference_without_bitsandbytes_fails_before_the_run_dir_is_claimed(
    tmp_path, without_bitsandbytes
):
    config = load_config(None, [f"out_dir={tmp_path / 'run'}", "model.reference_quantization=8bit"])
    with pytest.raises(UserError, match=r"model.reference_quantization=8bit needs bitsandbytes"):
        run(config, score=lambda p, c: [0.0] * len(c), make_sampler=None)  # type: ignore[arg-type]
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_quantized_reward_without_bitsandbytes_is_refused(tiny_model_dir, without_bitsandbytes):
    with pytest.raises(UserError, match="reward quantization=4bit needs bitsandbytes"):
        load_reward(f"classifier:{tiny_model_dir}", quantization="4bit", label=0)


def save_small_gptj(folder, head):
    """A random GPT-J (the target's architecture) 128 wide: bitsandbytes' 4-bit blocks hold 64
    values, wider than the 32 of the shared tiny models."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = GPTJConfig(
        vocab_size=len(tokenizer), n_positions=256, n_embd=128, n_layer=2, n_head=4, rotary_dim=16
    )
    config.num_labels = 1
    head(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def small_gptj_dir(tmp_path_factory):
    return save_small_gptj(tmp_path_factory.mktemp("small-gptj"), GPTJForCausalLM)


@needs_bitsandbytes
@pytest.mark.parametrize(
    ("bits", "layer", "max_kl"),
    [("8bit", "Linear8bitLt", 1e-3), ("4bit", "Linear4bit", 2e-2)],
)
def test_a_quantized_frozen_model_is_quantized_and_close_to_full_precision(
    small_gptj_dir, bits, layer, max_kl
):
    """As the KL reference: the blocks' linear layers become bitsandbytes layers on the CPU, and
    the next-token distributions stay within a small KL of the full-precision model's, not equal
    to them."""
    full, tokenizer = load_model_and_tokenizer(str(small_gptj_dir), device="cpu")
    option = "model.reference_quantization"
    quantized, _ = load_model_and_tokenizer(
        str(small_gptj_dir), device="cpu", quantization=quantization_config(bits, option)
    )
    assert type(quantized.transformer.h[0].mlp.fc_in).__name__ == layer  # bitsandbytes' layer
    ids = tokenizer(["the cat sat on the mat", "a dog ran"], return_tensors="pt", padding=True)
    with torch.no_grad():
        p = torch.log_softmax(full(**ids).logits.float(), -1)
        q = torch.log_softmax(quantized(**ids).logits.float(), -1)
    kl = (p.exp() * (p - q)).sum(-1)[ids.attention_mask.bool()].mean().item()
    assert 0 < kl < max_kl


@needs_bitsandbytes
def test_a_quantized_reward_scores_as_the_full_precision_one(tmp_path):
    """`reward.quantization=4bit` reaches the classifier reward: its layers are bitsandbytes' and
    its scores stay close to the full-precision classifier's."""
    folder = save_small_gptj(tmp_path, GPTJForSequenceClassification)
    prompts = ["POST: my cat ate my homework TL;DR:"] * 4
    completions = ["the cat did it", "a dog", "homework is gone", "cats eat paper"]
    full = load_reward(f"classifier:{folder}")
    quantized = load_reward(f"classifier:{folder}", quantization="4bit")
    assert type(quantized.model.transformer.h[0].mlp.fc_in).__name__ == "Linear4bit"
    a, b = full.score(prompts, completions), quantized.score(prompts, completions)
    assert a != b  # quantized (4-bit, bf16 compute): ~0.04 apart on scores spread over 0.6
    assert b == pytest.approx(a, abs=0.1)
    assert sorted(range(4), key=a.__getitem__) == sorted(range(4), key=b.__getitem__)
