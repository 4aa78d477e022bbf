"""The arithmetic that makes a multi-process run train and sample as intended."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType
from conftest import build_tiny_model

from alignment.config import SamplingConfig, load_config
from alignment.errors import UserError
from alignment.evaluation import (
    ScoredSamples,
    combine_likelihood_terms,
    likelihood_metrics,
    likelihood_terms,
)
from alignment.interfaces import Generation
from alignment.loop import rank_seed
from alignment.sharding import check_weight_sharding, deepspeed_settings
from alignment.trainer import shard_loss_weight, shard_slice


def test_shard_weights_make_the_ddp_mean_the_batch_token_mean():
    # ranks with 30 and 10 tokens, token means 2.0 and 6.0: the batch mean is
    # (30 * 2 + 10 * 6) / 40 = 3.0; DDP averages (1.5 * 2.0 + 0.5 * 6.0) / 2 = 3.0
    weights = [shard_loss_weight(n, 40, 2) for n in (30, 10)]
    assert weights == [1.5, 0.5]
    assert sum(w * m for w, m in zip(weights, (2.0, 6.0), strict=True)) / 2 == pytest.approx(3.0)
    assert shard_loss_weight(0, 40, 2) == 0.0  # an empty shard adds nothing
    assert shard_loss_weight(17, 17, 1) == 1.0  # one process: the loss as it was


def test_rank_seeds_differ_and_one_process_keeps_the_seed():
    assert rank_seed(7, 0, 1) == 7
    seeds = {rank_seed(s, r, 4) for s in range(10) for r in range(4)}
    assert len(seeds) == 40


def test_shard_slices_split_as_accelerate_and_cover_every_item_once():
    # 5 items on 3 ranks: divmod(5, 3) = (1, 2), so ranks 0 and 1 take 2 and rank 2 takes 1
    assert [shard_slice(5, r, 3) for r in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert shard_slice(1, 1, 2) == slice(1, 1)  # more ranks than items: an empty share
    assert shard_slice(9, 0, 1) == slice(0, 9)  # one process: everything
    for n in range(12):
        for world in range(1, 6):
            items = list(range(n))
            assert [i for r in range(world) for i in items[shard_slice(n, r, world)]] == items


def test_likelihood_terms_of_every_rank_combine_to_the_one_process_metrics(tiny_tokenizer):
    """Ranks simulated by their slices: the gathered per-sample terms give the metrics of all
    samples on one process, whatever the number of ranks (the batches differ, so up to float
    rounding); a rank with no sample adds nothing."""
    eos = tiny_tokenizer.eos_token_id
    policy = build_tiny_model("gpt2", len(tiny_tokenizer), eos, seed=0)
    reference = build_tiny_model("gpt2", len(tiny_tokenizer), eos, seed=1)
    prompts = ["My landlord kept the deposit. TL;DR:", "We adopted a cat. TL;DR:"] * 3 + ["Hi"]
    texts = ["he kept it", "cat", "the deposit is gone and I am sad", "a", "b c", "", "ok then"]
    scored = ScoredSamples(
        prompts=prompts,
        conditioned=["Good summary: " + p for p in prompts],
        generations=[Generation(t, "stop", len(t.split())) for t in texts],
        rewards=[None] * len(texts),
        samples_per_prompt=1,
    )
    sampling = SamplingConfig(max_new_tokens=6)
    args = (policy, reference, tiny_tokenizer, sampling, 2)
    whole = likelihood_metrics(*args, scored)
    assert whole["ref_perplexity"] > 1 and math.isfinite(whole["kl"]) and whole["kl"] != 0
    for world in (1, 2, 3, 9):
        parts = [likelihood_terms(*args, scored, shard_slice(7, r, world)) for r in range(world)]
        assert sum(len(p.kl) for p in parts) == 7  # each sample scored on exactly one rank
        combined = combine_likelihood_terms(parts)
        assert combined == pytest.approx(whole, rel=1e-6), world
        if world == 1:
            assert combined == whole  # one process: exactly today's numbers
    assert all(math.isnan(v) for v in combine_likelihood_terms([parts[-1]]).values())  # empty


def accelerator_like(distributed_type: DistributedType, fsdp2: bool = True, zero_stage=None):
    """What `check_weight_sharding` reads of an Accelerator."""
    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage is not None else None
    return SimpleNamespace(
        distributed_type=distributed_type,
        is_fsdp2=fsdp2,
        state=SimpleNamespace(deepspeed_plugin=plugin),
    )


ZERO2 = accelerator_like(DistributedType.DEEPSPEED, zero_stage=2)
ZERO3 = accelerator_like(DistributedType.DEEPSPEED, zero_stage=3)


@pytest.mark.parametrize(
    ("accelerator", "overrides", "message"),
    [
        (accelerator_like(DistributedType.FSDP, fsdp2=False), [], "fsdp_version: 2"),
        (accelerator_like(DistributedType.FSDP), ["algorithm=ppo"], "algorithm ppo under FSDP"),
        (accelerator_like(DistributedType.FSDP), ["train.lora={}"], "train.lora under FSDP"),
        (ZERO2, ["algorithm=grpo"], "algorithm grpo under DeepSpeed ZeRO-2"),
        (ZERO3, ["algorithm=ppo"], "algorithm ppo under DeepSpeed ZeRO-3"),
        (ZERO3, ["train.lora={}"], "train.lora under DeepSpeed ZeRO-3"),
        (ZERO2, ["train.control_lr_multiplier=2"], "control_lr_multiplier under DeepSpeed"),
    ],
    ids=["fsdp1", "fsdp-ppo", "fsdp-lora", "zero2-grpo", "zero3-ppo", "zero3-lora", "zero2-rows"],
)
def test_sharded_setups_the_loop_was_not_written_for_are_refused(accelerator, overrides, message):
    with pytest.raises(UserError, match=message):
        check_weight_sharding(accelerator, load_config(None, overrides))


@pytest.mark.parametrize(
    ("accelerator", "overrides"),
    [
        (accelerator_like(DistributedType.FSDP), ["algorithm=quark"]),
        (accelerator_like(DistributedType.FSDP), ["algorithm=rft"]),
        (ZERO3, ["algorithm=alt-rm"]),
        (ZERO2, ["train.lora={}", "train.control_lr_multiplier=2"]),
        (accelerator_like(DistributedType.MULTI_CPU), ["algorithm=grpo"]),
    ],
    ids=["fsdp-quark", "fsdp-rft", "zero3-alt-rm", "zero2-lora-rows", "ddp-grpo"],
)
def test_supported_setups_pass(accelerator, overrides):
    check_weight_sharding(accelerator, load_config(None, overrides))


def test_deepspeed_settings_fill_what_the_trainer_decides():
    given = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto", "x": 1}
    settled = deepspeed_settings(given, micro_batch=3, num_processes=4, max_grad_norm=0.5)
    assert settled == {
        "train_micro_batch_size_per_gpu": 3,
        "train_batch_size": 12,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.5,
        "x": 1,
    }
    assert given["gradient_clipping"] == "auto"  # a new dict: the caller decides where it goes
    # no clipping is DeepSpeed's 0; an explicit micro batch is kept, the total made to agree
    settled = deepspeed_settings({"train_micro_batch_size_per_gpu": 1}, 3, 4, None)
    assert (settled["train_batch_size"], settled["gradient_clipping"]) == (4, 0.0)
    # explicit values that agree with the trainer are fine
    deepspeed_settings({"gradient_accumulation_steps": 1, "gradient_clipping": 1.0}, 3, 4, 1.0)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps: 4 contradicts train"),
        ({"gradient_clipping": 1.0}, "gradient_clipping: 1.0 contradicts train.max_grad_norm"),
    ],
)
def test_deepspeed_settings_refuse_a_contradiction(entry, message):
    with pytest.raises(UserError, match=message):
        deepspeed_settings(entry, micro_batch=2, num_processes=2, max_grad_norm=0.5)


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_an_engine_accelerate_did_not_turn_on_is_reported(monkeypatch, caplog, variable):
    """On CPU accelerate runs a DeepSpeed or FSDP launch as plain DDP: said, not silent."""
    monkeypatch.setenv(variable, "true")
    check_weight_sharding(accelerator_like(DistributedType.MULTI_CPU), load_config(None, []))
    assert "turns on only with GPUs: this run is plain MULTI_CPU" in caplog.text
    caplog.clear()
    monkeypatch.setenv(variable, "false")
    check_weight_sharding(accelerator_like(DistributedType.MULTI_CPU), load_config(None, []))
    assert not caplog.text
