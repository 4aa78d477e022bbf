"""One ConditionalTrainer.train call on fixed items, the updated weights saved by the main process.

Run as `python train_shard.py OUT [lora] [fsdp|deepspeed]` (one process) or under `accelerate
launch --num_processes 2` (`fsdp`, `deepspeed`: through that engine, `sharded_cpu.force`;
`deepspeed` with the stage of the config launched with); tests/integration/test_multiprocess.py
compares them. The items have
targets of different lengths and the last batch holds one item, so the ranks' shards differ in
token count and one rank has nothing to train on in the last step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from sharded_cpu import force
from toy import write_toy_task

from alignment.conditioning import Conditioning
from alignment.config import LoraConfig, SamplingConfig, TrainConfig
from alignment.models import load_model_and_tokenizer
from alignment.pool import TrainItem
from alignment.sharding import loading_whole, whole_state_dict
from alignment.trainer import ConditionalTrainer


def main(
    out: str, lora: bool = False, engine: str | None = None, control_lr_multiplier: float = 2.0
) -> None:
    accelerator = Accelerator(cpu=True)
    if engine is not None:
        force(engine)
    folder = Path(out)
    if accelerator.is_main_process:
        write_toy_task(folder)
    accelerator.wait_for_everyone()
    conditioning = Conditioning.quantile_tokens(3)
    with loading_whole(accelerator):  # as the loop loads
        model, tokenizer = load_model_and_tokenizer(str(folder / "toy-model"), device="cpu")
        conditioning.prepare(tokenizer, model, seed=0)
    for module in model.modules():  # dropout masks cannot match across process counts
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    words = "the dog ate my sock and we moved to a new city last spring".split()
    items = [
        TrainItem(
            prompt=f"{words[i]} {words[i + 1]} TL;DR:",
            generation=" ".join(words[i : i + 1 + 3 * (i % 3)]),
            quantile=i % 3,
            finish_reason="stop" if i % 2 else "length",
            reward=float(i),
        )
        for i in range(9)
    ]
    sampling = SamplingConfig(max_new_tokens=12, max_prompt_tokens=32, keep_tail_tokens=8)
    config = TrainConfig(
        learning_rate=1e-2,
        batch_size=4,
        num_epochs=2,
        warmup_ratio=0.0,
        **({"lora": LoraConfig(dropout=0.0)} if lora else {"unfrozen_layers_ratio": 0.5}),
        max_grad_norm=1.0,
        control_lr_multiplier=control_lr_multiplier,
    )
    trainer = ConditionalTrainer(model, tokenizer, config, sampling, conditioning, accelerator)
    history = trainer.train(items, seed=3)
    weights = whole_state_dict(model, accelerator) or model.state_dict()
    if accelerator.is_main_process:
        state = {k: v.clone() for k, v in weights.items()}  # untie
        save_file(state, str(folder / "weights.safetensors"))
        (folder / "history.json").write_text(json.dumps(history))


if __name__ == "__main__":
    engines = [a for a in sys.argv[2:] if a in ("fsdp", "deepspeed")]
    engine = engines[0] if engines else None
    # DeepSpeed steps its own fp32 copy of the weights, which a scaled row step cannot reach
    multiplier = 1.0 if engine == "deepspeed" else 2.0
    main(sys.argv[1], lora="lora" in sys.argv[2:], engine=engine, control_lr_multiplier=multiplier)
