"""One PPO update on a fixed scored.jsonl, the weights and value head saved by the main process.

Run as `python ppo_shard.py OUT` (one process) or under `accelerate launch --num_processes 2`;
tests/integration/test_multiprocess.py compares the two. 13 episodes of different lengths (two
unscored generations are left out) in minibatches of 4: the ranks' shares differ in token count
and the last minibatch of each epoch leaves one rank with nothing to train on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from toy import TOY_OVERRIDES, write_toy_task

from alignment.algorithms.base import Models
from alignment.algorithms.ppo import PPO
from alignment.config import load_config
from alignment.models import load_model_and_tokenizer
from alignment.records import SampleRecord, save_samples


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():  # dropout masks cannot match across process counts
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def main(out: str) -> None:
    accelerator = Accelerator(cpu=True)
    folder = Path(out)
    it_dir = folder / "iter_001"
    words = "the dog ate my sock and we moved to a new city last spring".split()
    if accelerator.is_main_process:
        write_toy_task(folder)
        records = [
            SampleRecord(
                prompt=f"{words[i]} {words[i + 1]} TL;DR:",
                generations=[" ".join(words[j : j + 1 + (i + j) % 5]) for j in range(i, i + 3)],
                rewards=[float(i - j % 3) for j in range(3)],
                finish_reasons=["stop", "length", "stop"],
            )
            for i in range(5)
        ]
        records[0].rewards[1] = records[3].rewards[2] = None  # left out: unscored
        it_dir.mkdir(parents=True)
        save_samples(it_dir / "scored.jsonl", records)
    accelerator.wait_for_everyone()
    model_dir = str(folder / "toy-model")
    overrides = [o for o in TOY_OVERRIDES if not o.startswith("train.")]
    config = load_config(
        None,
        [
            *overrides,
            "algorithm=ppo",
            f"model.policy={model_dir}",
            "ppo.batch_size=4",
            "ppo.ppo_epochs=2",
            "ppo.learning_rate=1e-2",
            "ppo.unfrozen_layers_ratio=0.5",
            "ppo.max_grad_norm=1.0",
            "ppo.target_kl=0.1",
        ],
    )
    policy, tokenizer = load_model_and_tokenizer(model_dir, device="cpu")
    reference, _ = load_model_and_tokenizer(model_dir, device="cpu")
    models = Models(no_dropout(policy), tokenizer, no_dropout(reference).requires_grad_(False))
    ppo = PPO(config, models, accelerator, score=lambda prompts, completions: [])
    history = ppo.update(1, it_dir, seed=3, rows=[])
    if accelerator.is_main_process:
        state = {k: v.clone() for k, v in policy.state_dict().items()}  # untie
        state.update({f"value_head.{k}": v for k, v in ppo.value_head.state_dict().items()})
        save_file(state, str(folder / "weights.safetensors"))
        kl_coef = ppo.kl_controller.value
        (folder / "history.json").write_text(json.dumps({"steps": history, "kl_coef": kl_coef}))


if __name__ == "__main__":
    main(sys.argv[1])
