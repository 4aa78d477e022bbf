"""LoRA in the conditional trainer: what trains, what is merged, what is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from conftest import build_tiny_model
from test_trainer import SAMPLING, _items, _setup

from alignment.conditioning import Conditioning, control_token_ids
from alignment.config import LoraConfig, TrainConfig, dump_config, load_config
from alignment.errors import UserError
from alignment.trainer import ConditionalTrainer

RANK = 2
LORA = {"lora": LoraConfig(r=RANK, alpha=4.0, dropout=0.0), "num_epochs": 1, "warmup_ratio": 0.0}
# peft's defaults: the attention projections (GPT-2 fuses q, k and v in c_attn)
ADAPTED = {"gpt2": ("attn.c_attn.weight",), "gptj": ("attn.q_proj.weight", "attn.v_proj.weight")}


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["gpt2", "gptj"])
def test_one_iteration_changes_only_the_adapted_matrices_and_the_control_rows(
    tiny_tokenizer, family
):
    """After an iteration the policy (the same object) is a plain model again in which:
    - the adapted projections moved by a matrix of rank <= r (the merged B @ A * alpha / r);
    - of the input embedding only the control tokens' rows moved;
    - every other weight (other blocks' matrices, biases, norms, the untied GPT-J head, the
      position embeddings) is bit for bit what it was."""
    model, tokenizer, trainer = _setup(tiny_tokenizer, family, **LORA)
    before = _state(model)
    trainer.train(_items(), seed=0)
    assert trainer.policy is model
    assert not [n for n, _ in model.named_modules() if "lora" in n or "token_adapter" in n]
    after = _state(model)
    assert after.keys() == before.keys()
    controls = control_token_ids(tokenizer)
    embedding = "transformer.wte.weight"
    moved = [
        i
        for i in range(after[embedding].shape[0])
        if not torch.equal(after[embedding][i], before[embedding][i])
    ]
    assert moved == controls
    adapted = [k for k in after if k.endswith(ADAPTED[family])]
    assert len(adapted) == 2 * len(ADAPTED[family])  # two blocks
    for key in adapted:
        singular = torch.linalg.svdvals((after[key] - before[key]).double())
        assert singular[0] > 0, key
        assert singular[RANK:].max() < 1e-4 * singular[0], key  # rank <= r, up to rounding
    tied_head = "lm_head.weight" if family == "gpt2" else None  # it is the embedding
    for key in after.keys() - {embedding, tied_head, *adapted}:
        assert torch.equal(after[key], before[key]), key


def test_a_second_iteration_starts_a_fresh_adapter_on_the_merged_weights(tiny_tokenizer):
    model, _, trainer = _setup(tiny_tokenizer, **LORA)
    trainer.train(_items(), seed=0)
    merged = _state(model)
    out = torch.tensor([[400, 10, 11]])
    with torch.no_grad():
        logits = model(out).logits
    trainer.train(_items(), seed=1)
    assert trainer.policy is model
    changed = [k for k in merged if not torch.equal(merged[k], model.state_dict()[k])]
    assert "transformer.h.0.attn.c_attn.weight" in changed
    with torch.no_grad():
        assert not torch.equal(model(out).logits, logits)


def test_control_lr_multiplier_scales_the_control_rows_step(tiny_tokenizer):
    """One AdamW step (12 items, batch 12): the rows' param group has lr x factor, so their
    step is exactly factor times as large, and nothing else changes."""
    steps, states = {}, {}
    for factor in (1.0, 3.0):
        model, tokenizer, trainer = _setup(
            tiny_tokenizer, control_lr_multiplier=factor, batch_size=12, weight_decay=0.0, **LORA
        )
        before = _state(model)
        trainer.train(_items(), seed=0)
        states[factor] = _state(model)
        steps[factor] = states[factor]["transformer.wte.weight"] - before["transformer.wte.weight"]
    rows = control_token_ids(tokenizer)
    assert steps[1.0][rows].abs().sum() > 0
    torch.testing.assert_close(steps[3.0][rows], 3 * steps[1.0][rows])
    for key, value in states[1.0].items():
        if key not in ("transformer.wte.weight", "lm_head.weight"):
            assert torch.equal(states[3.0][key], value), key


def test_untied_head_without_bias_trains_the_control_output_rows_when_unmasked(tiny_tokenizer):
    """mask_control_logits=false: the control tokens' output rows get a gradient, so on an
    untied head (GPT-J's, here without its bias) peft trains those rows too, and only those."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    model = build_tiny_model("gptj", len(tokenizer), tokenizer.eos_token_id)
    model.lm_head.bias = None
    Conditioning.quantile_tokens(5).prepare(tokenizer, model, seed=0)
    config = TrainConfig(
        learning_rate=1e-2, batch_size=4, num_epochs=1, mask_control_logits=False, lora=LoraConfig()
    )
    trainer = ConditionalTrainer(
        model, tokenizer, config, SAMPLING, Conditioning.quantile_tokens(5), Accelerator(cpu=True)
    )
    before = model.lm_head.weight.detach().clone()
    trainer.train(_items(), seed=0)
    after = model.lm_head.weight.detach()
    moved = [i for i in range(after.shape[0]) if not torch.equal(after[i], before[i])]
    assert moved == control_token_ids(tokenizer)


def test_unmasked_control_logits_under_a_head_with_a_bias_are_refused(tiny_tokenizer):
    """peft 0.21 computes a wrapped output layer without its bias (GPT-J's head has one)."""
    with pytest.raises(UserError, match="mask_control_logits"):
        _setup(tiny_tokenizer, "gptj", mask_control_logits=False, **LORA)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lora={}", "train.unfrozen_layers_ratio=1.0"], "does not apply with train.lora"),
        (["train.lora={}", "train.reset_optimizer=false"], "new adapter"),
        (["train.lora.r=0"], "train.lora.r must be >= 1"),
        (["train.lora.alpha=0"], "train.lora.alpha must be > 0"),
        (["train.lora.dropout=1.0"], r"train.lora.dropout must be in \[0, 1\)"),
        (["train.lora.target_modules=[]"], "target_modules must name modules"),
        (["train.lora=16"], "'train.lora' must be a section"),
        (["train.lora.rank=16"], "unknown key 'train.lora.rank'"),
        (["train.lora.checkpoint=full"], r"'train.lora.checkpoint' must be one of \['merged', "),
    ],
)
def test_bad_lora_settings_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_lora_settings_load_and_round_trip(tmp_path):
    assert load_config(None, []).train.lora is None
    config = load_config(None, ["train.lora={}"])
    assert config.train.lora == LoraConfig(r=16, alpha=32.0, dropout=0.05, target_modules=None)
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(load_config(None, ["train.lora.target_modules=[q_proj]"])))
    assert load_config(path).train.lora == LoraConfig(target_modules=["q_proj"])
