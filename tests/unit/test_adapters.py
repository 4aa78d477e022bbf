"""Adapter-only LoRA checkpoints: they load as the weights the training merged, or fail clearly."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch
from accelerate import Accelerator
from conftest import build_tiny_model
from test_trainer import SAMPLING, _items

from alignment.adapters import ADAPTER_BASE, CONTROL_ROWS, write_adapter_base
from alignment.conditioning import Conditioning, control_token_ids
from alignment.config import LoraConfig, TrainConfig
from alignment.errors import UserError
from alignment.models import load_model, load_model_and_tokenizer
from alignment.trainer import ConditionalTrainer

LORA = LoraConfig(r=2, alpha=4.0, dropout=0.0, checkpoint="adapter")


def _adapter_run(tmp_path, tokenizer, family, dtype, conditioned=True):
    """Two LoRA iterations from a saved tiny model, each saved as the loop saves an adapter
    checkpoint; returns (the base folder, the checkpoints, the trained policy, its tokenizer)."""
    base = tmp_path / "base"
    build_tiny_model(family, len(tokenizer), tokenizer.eos_token_id).save_pretrained(base)
    tokenizer.save_pretrained(base)
    policy, tokenizer = load_model_and_tokenizer(str(base), dtype=dtype, device="cpu")
    conditioning = Conditioning.quantile_tokens(5) if conditioned else None  # else as RFT
    if conditioning is not None:
        conditioning.prepare(tokenizer, policy, seed=7)
    config = TrainConfig(
        learning_rate=1e-2, batch_size=4, num_epochs=1, warmup_ratio=0.0, lora=LORA
    )
    trainer = ConditionalTrainer(
        policy, tokenizer, config, SAMPLING, conditioning, Accelerator(cpu=True)
    )
    checkpoints = []
    for iteration in (1, 2):
        trainer.train(_items(), seed=iteration)
        folder = tmp_path / "checkpoints" / f"iter_{iteration:03d}"
        folder.mkdir(parents=True)
        trainer.save_adapter(folder)
        write_adapter_base(folder, iteration, str(base), policy.dtype)
        tokenizer.save_pretrained(folder)
        checkpoints.append(folder)
    return base, checkpoints, policy, tokenizer


@pytest.mark.parametrize(
    ("family", "dtype", "conditioned"),
    [("gpt2", "float32", True), ("gptj", "bfloat16", True), ("gpt2", "float32", False)],
)
def test_an_adapter_checkpoint_loads_as_the_weights_training_merged(
    tmp_path, tiny_tokenizer, family, dtype, conditioned
):
    """Bit for bit, every weight: the resized embedding and the rows `prepare` drew for the
    control tokens (GPT-2: tied; GPT-J: an untied head with a bias, whose rows no adapter
    holds), the two merged adapters, in bfloat16 the merges' rounding too; loaded in another
    dtype, the same weights cast. Without control tokens (RFT) there are no rows to keep."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    base, checkpoints, policy, tokenizer = _adapter_run(
        tmp_path, tokenizer, family, dtype, conditioned
    )
    for folder in checkpoints:
        assert (folder / "adapter_model.safetensors").is_file()
        assert (folder / CONTROL_ROWS).is_file() == conditioned
        assert not list(folder.glob("model*.safetensors"))
    assert json.loads((checkpoints[0] / ADAPTER_BASE).read_text()) == {
        "model": str(base),
        "dtype": dtype,
    }
    assert json.loads((checkpoints[1] / ADAPTER_BASE).read_text()) == {
        "checkpoint": "../iter_001",
        "dtype": dtype,
    }
    loaded, loaded_tokenizer = load_model_and_tokenizer(str(checkpoints[1]), dtype=dtype)
    assert control_token_ids(loaded_tokenizer) == control_token_ids(tokenizer)
    expected = policy.state_dict()
    weights = loaded.state_dict()
    assert weights.keys() == expected.keys()
    for key, value in weights.items():
        assert torch.equal(value, expected[key]), key
    if family == "gptj":  # the untied head's control rows: as drawn, held by no adapter
        fresh, fresh_tokenizer = load_model_and_tokenizer(str(base), dtype=dtype, device="cpu")
        Conditioning.quantile_tokens(5).prepare(fresh_tokenizer, fresh, seed=7)
        rows = control_token_ids(tokenizer)
        assert torch.equal(weights["lm_head.weight"][rows], fresh.lm_head.weight[rows])
        assert torch.equal(weights["lm_head.bias"][rows], fresh.lm_head.bias[rows])
    as_float = load_model(str(checkpoints[1]), dtype="float32", device="cpu").state_dict()
    for key, value in as_float.items():
        assert torch.equal(value, expected[key].float()), key


def test_a_broken_chain_names_what_is_missing(tmp_path, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    base, (first, second), _, _ = _adapter_run(tmp_path, tokenizer, "gpt2", "float32")
    with pytest.raises(UserError, match="loads only as a causal LM"):
        load_model(str(second), head="sequence-classification")

    shutil.rmtree(base)
    with pytest.raises(
        UserError, match=re.escape(f"{first}: its base model '{base}' does not load")
    ):
        load_model(str(second))

    shutil.rmtree(first)
    with pytest.raises(
        UserError, match=re.escape(f"{second} is a LoRA adapter on {first}, which is missing")
    ):
        load_model(str(second))

    (second / ADAPTER_BASE).write_text('{"dtype": "float32"}')
    with pytest.raises(
        UserError, match=re.escape(f"{second / ADAPTER_BASE}: not a valid adapter base")
    ):
        load_model(str(second))
