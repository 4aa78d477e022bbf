"""The conditional trainer: one optimizer for the run, exact resets and resumes, its levers."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from accelerate import Accelerator
from conftest import build_tiny_model
from transformers import get_linear_schedule_with_warmup

from alignment.conditioning import Conditioning, control_token_ids
from alignment.config import SamplingConfig, TrainConfig
from alignment.pool import TrainItem
from alignment.trainer import ConditionalTrainer, collate, target_logits

SAMPLING = SamplingConfig(max_new_tokens=8, max_prompt_tokens=32, keep_tail_tokens=8)
PROMPTS = ["The dog ate my sock. TL;DR:", "We moved to a new city last spring. TL;DR:"]


def _items(n: int = 12) -> list[TrainItem]:
    words = ["dog", "sock", "city", "vet", "spring", "moved"]
    return [
        TrainItem(
            prompt=PROMPTS[i % 2],
            generation=" ".join(words[(i + j) % len(words)] for j in range(1 + i % 4)),
            quantile=i % 5,
            finish_reason="stop" if i % 3 else "length",
            reward=float(i),
        )
        for i in range(n)
    ]


def _setup(tokenizer, family="gpt2", conditioned=True, **train):
    """A tiny policy with control tokens and its trainer on a fresh CPU accelerator."""
    tokenizer = copy.deepcopy(tokenizer)
    model = build_tiny_model(family, len(tokenizer), tokenizer.eos_token_id)
    conditioning = Conditioning.quantile_tokens(5)
    conditioning.prepare(tokenizer, model, seed=0)
    config = TrainConfig(
        **{"learning_rate": 1e-2, "batch_size": 4, "num_epochs": 2, "warmup_ratio": 0.2, **train}
    )
    trainer = ConditionalTrainer(
        model,
        tokenizer,
        config,
        SAMPLING,
        conditioning if conditioned else None,
        Accelerator(cpu=True),
    )
    return model, tokenizer, trainer


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )


def test_optimizer_and_its_memory_stay_flat_over_iterations(tiny_tokenizer):
    """A reset per iteration must not leave the previous AdamW alive (accelerate keeps every
    optimizer it prepared, which leaked the whole optimizer state every iteration)."""
    _, _, trainer = _setup(tiny_tokenizer, reset_optimizer=True)
    sizes, live = [], []
    for iteration in range(4):
        trainer.train(_items(), seed=iteration)
        gc.collect()
        sizes.append(_state_bytes(trainer.optimizer))
        live.append(sum(type(o) is torch.optim.AdamW for o in gc.get_objects()))
        assert len(trainer.accelerator._optimizers) == 1
        assert len(trainer.accelerator._schedulers) == 1
    assert sizes[0] > 0 and sizes == [sizes[0]] * 4
    assert live == [1] * 4


def test_reset_trains_exactly_as_a_fresh_optimizer_and_schedule(tiny_tokenizer):
    """ALT builds a new optimizer and warm-up every iteration; the reset must equal that."""
    model, tokenizer, trainer = _setup(tiny_tokenizer, reset_optimizer=True)
    trainer.train(_items(), seed=1)
    fresh_model = copy.deepcopy(model)
    second = trainer.train(_items(), seed=2)
    fresh = ConditionalTrainer(
        fresh_model,
        tokenizer,
        trainer.config,
        SAMPLING,
        trainer.conditioning,
        Accelerator(cpu=True),
    )
    fresh_log = fresh.train(_items(), seed=2)
    assert [s["lr"] for s in second] == [s["lr"] for s in fresh_log]
    for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_schedule_is_transformers_linear_warmup(tiny_tokenizer):
    _, _, trainer = _setup(tiny_tokenizer, reset_optimizer=False)
    logs = trainer.train(_items(), seed=1, total_iterations=2)
    logs += trainer.train(_items(), seed=2, total_iterations=2)
    steps = len(logs)  # 2 iterations x 2 epochs x 3 batches: one schedule over all of them
    param = torch.nn.Parameter(torch.zeros(1))
    reference = torch.optim.SGD([param], lr=1e-2)
    expected = get_linear_schedule_with_warmup(reference, 3, steps)
    lrs = []
    for _ in range(steps):
        reference.step()
        expected.step()
        lrs.append(expected.get_last_lr()[0])
    assert [s["lr"] for s in logs] == pytest.approx(lrs, abs=1e-12)


@pytest.mark.parametrize("reset", [True, False])
def test_saved_state_resumes_exactly(tiny_tokenizer, tmp_path, reset):
    """Save after iteration 1, restore into a new process's objects: iteration 2 is identical."""
    model, tokenizer, trainer = _setup(tiny_tokenizer, reset_optimizer=reset)
    trainer.train(_items(), seed=1, total_iterations=2)
    trainer.save_state(tmp_path / "state")
    resumed_model = copy.deepcopy(model)
    expected = trainer.train(_items(), seed=2, total_iterations=2)
    resumed = ConditionalTrainer(
        resumed_model,
        tokenizer,
        trainer.config,
        SAMPLING,
        trainer.conditioning,
        Accelerator(cpu=True),
    )
    resumed.load_state(tmp_path / "state")
    assert {p.name for p in (tmp_path / "state").iterdir()} >= {"optimizer.bin", "scheduler.bin"}
    assert not list((tmp_path / "state").glob("model*"))  # the weights are the checkpoint's job
    got = resumed.train(_items(), seed=2, total_iterations=2)
    assert [s["lr"] for s in got] == [s["lr"] for s in expected]
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_control_lr_multiplier_scales_only_the_control_rows_step(tiny_tokenizer):
    steps = {}
    for factor in (1.0, 3.0):
        model, tokenizer, trainer = _setup(
            tiny_tokenizer,
            control_lr_multiplier=factor,
            num_epochs=1,
            batch_size=12,
            warmup_ratio=0.0,
        )
        before = model.get_input_embeddings().weight.detach().clone()
        trainer.train(_items(), seed=0)  # 12 items, batch 12: exactly one step
        steps[factor] = model.get_input_embeddings().weight.detach() - before
    rows = control_token_ids(tokenizer)
    others = [i for i in range(steps[1.0].shape[0]) if i not in rows]
    assert steps[1.0][rows].abs().sum() > 0
    torch.testing.assert_close(steps[3.0][rows], 3 * steps[1.0][rows])
    torch.testing.assert_close(steps[3.0][others], steps[1.0][others], rtol=0, atol=0)


@pytest.mark.parametrize("mask", [True, False])
def test_masked_control_logits_leave_unused_control_rows_alone(tiny_tokenizer, mask):
    """Unconditioned items never show a control token: with masked logits nothing pushes the
    control rows (tied embeddings); unmasked, the softmax pushes every one of them down."""
    model, tokenizer, trainer = _setup(
        tiny_tokenizer, conditioned=False, mask_control_logits=mask, weight_decay=0.0
    )
    rows = control_token_ids(tokenizer)
    before = model.get_input_embeddings().weight.detach()[rows].clone()
    trainer.train(_items(), seed=0)
    moved = (model.get_input_embeddings().weight.detach()[rows] - before).abs().sum()
    assert (moved == 0) if mask else (moved > 0)


@pytest.mark.parametrize("family", ["gpt2", "gptj"])
def test_collated_batch_gives_the_unpadded_logits(tiny_tokenizer, family):
    """Left-padded prompts and right-padded targets change no logit of a real target token."""
    model = build_tiny_model(family, len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
    prompts = [tiny_tokenizer(p)["input_ids"] for p in ["a dog", "my old sock was on the floor"]]
    targets = [tiny_tokenizer(t)["input_ids"] for t in [" it ate the vet bill", " gone"]]
    batch = collate(prompts, targets, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        batched = target_logits(model, batch)
        for row, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
            alone = model(input_ids=torch.tensor([prompt + target])).logits[0]
            expected = alone[len(prompt) - 1 : len(prompt) + len(target) - 1]
            torch.testing.assert_close(batched[row, : len(target)], expected, atol=1e-5, rtol=0)
