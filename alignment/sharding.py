"""The policy's weights sharded across ranks: FSDP 2 and DeepSpeed (ZeRO-2, ZeRO-3).

The loop samples, evaluates and saves a whole policy, while FSDP 2 and ZeRO-3 keep only a slice of
every weight on each rank, gathered one module at a time inside the prepared model's forward.
Sampling cannot use that: ranks decode different prompts for different numbers of steps, and
every gather is a collective all ranks must join equally often. So each stage that reads the
policy gathers it once and keeps it whole until the stage ends (`whole_weights`), which is what
trl does to generate under ZeRO-3; checkpoints gather it onto the main process
(`whole_state_dict`). ZeRO-2 shards only gradients and optimizer states: its weights are whole.

The conditional trainer (`SHARDED_ALGORITHMS`) is the update written for these engines;
`check_weight_sharding` refuses, before any model loads, the setups nothing here was written for.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from alignment.config import Config
from alignment.errors import UserError

log = logging.getLogger(__name__)

# The algorithms whose update is the conditional trainer's (`ConditionalTrainer`), and best-of-n,
# which trains nothing; PPO's value wrapper and trl's trainers prepare their models their own way.
SHARDED_ALGORITHMS = ("quark", "rft", "alt-rm", "alt-feedback", "best-of-n")


# What `accelerate launch --config_file` sets for an engine, and the engine it should give.
ENGINE_REQUESTS = {
    "ACCELERATE_USE_DEEPSPEED": DistributedType.DEEPSPEED,
    "ACCELERATE_USE_FSDP": DistributedType.FSDP,
}


def zero_stage(accelerator: Accelerator) -> int | None:
    """The DeepSpeed ZeRO stage the run is prepared with; None without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    return None if plugin is None else plugin.zero_stage


def check_weight_sharding(accelerator: Accelerator, config: Config) -> None:
    """Refuse the sharded setups the loop was not written for, before any model loads; say so
    when a launch asked for an engine that accelerate did not turn on."""
    for variable, engine_type in ENGINE_REQUESTS.items():
        asked = os.environ.get(variable, "false").lower() == "true"
        if asked and accelerator.distributed_type != engine_type:
            log.warning(
                "the accelerate config asks for %s, which accelerate turns on only with GPUs: "
                "this run is plain %s (weights whole on every rank)",
                engine_type.value,
                accelerator.distributed_type.value,
            )
    stage = zero_stage(accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        if not accelerator.is_fsdp2:
            raise UserError("FSDP 1 is not supported: set fsdp_version: 2 in the accelerate config")
        engine = "FSDP"
    elif stage is not None:
        engine = f"DeepSpeed ZeRO-{stage}"
    else:
        return
    if config.algorithm not in SHARDED_ALGORITHMS:
        raise UserError(
            f"algorithm {config.algorithm} under {engine} is not supported (it is for "
            f"{', '.join(SHARDED_ALGORITHMS)}); use DDP (experiments/accelerate/ddp.yaml)"
        )
    if config.train.lora is not None and (engine == "FSDP" or stage == 3):
        raise UserError(
            f"train.lora under {engine} is not supported: LoRA trains a few million parameters "
            "over a frozen base, which DDP or ZeRO-2 hold whole on every rank (docs/memory.md)"
        )
    # with LoRA the rows are their own parameter group, with its own learning rate
    scaled_rows = config.train.control_lr_multiplier != 1.0 and config.train.lora is None
    if stage is not None and scaled_rows:
        raise UserError(
            f"train.control_lr_multiplier under {engine} is not supported: DeepSpeed steps its own "
            "fp32 copy of the weights, which the scaled step of the control rows cannot reach; "
            "set it to 1, or use LoRA, DDP or FSDP"
        )


def deepspeed_settings(
    ds_config: dict[str, Any], micro_batch: int, num_processes: int, max_grad_norm: float | None
) -> dict[str, Any]:
    """`ds_config` with the entries the trainer decides filled where they are "auto" (or absent).

    `train.batch_size` is the global batch of one optimizer step, split across ranks, so each rank
    runs `micro_batch` items and accumulates nothing: an explicit `gradient_accumulation_steps`
    other than 1 is an error. `train.max_grad_norm` is the clipping, which DeepSpeed applies
    inside its step (accelerate's `clip_grad_norm_` only reads the norm then): an explicit
    `gradient_clipping` other than it is an error. Explicit batch sizes are kept: DeepSpeed only
    counts with them (and checks them against each other).
    """
    settled = dict(ds_config)
    # bookkeeping only (the trainer, not DeepSpeed, splits the batch), kept consistent as
    # DeepSpeed checks: train_batch_size = micro batch x accumulation (1) x ranks
    if settled.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        settled["train_micro_batch_size_per_gpu"] = micro_batch
    if settled.get("train_batch_size", "auto") == "auto":
        settled["train_batch_size"] = settled["train_micro_batch_size_per_gpu"] * num_processes
    for key, value, source in (
        ("gradient_accumulation_steps", 1, "train.batch_size, one optimizer step per batch"),
        ("gradient_clipping", max_grad_norm or 0.0, "train.max_grad_norm"),
    ):
        given = settled.get(key, "auto")
        if given == "auto":
            settled[key] = value
        elif given != value:
            raise UserError(
                f"DeepSpeed config {key}: {given} contradicts {source} (so: {value}); "
                'set it to "auto" or remove it'
            )
    return settled


@contextlib.contextmanager
def loading_whole(accelerator: Accelerator) -> Iterator[None]:
    """Models loaded inside the block load whole on every rank, even under ZeRO-3.

    accelerate announces a ZeRO-3 config to transformers, which then loads every model already
    partitioned (`deepspeed.zero.Init`): the reference too, which DeepSpeed never prepares (so
    nothing would gather it for a forward), and the policy before its control rows are added.
    As under FSDP 2 here (`fsdp_cpu_ram_efficient_loading: false`), every rank loads each model
    whole instead, and `accelerator.prepare` partitions the policy alone.
    """
    if zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations.deepspeed import (
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(accelerator.state.deepspeed_plugin.dschf)


@contextlib.contextmanager
def whole_weights(model: nn.Module, accelerator: Accelerator) -> Iterator[None]:
    """The sharded policy with its whole weights on every rank, until the block ends.

    Gathered once and kept, every forward inside is local, for the whole weights' memory on every
    rank meanwhile. FSDP 2: every unit unsharded, with no reshard after forward. ZeRO-3:
    DeepSpeed's own `unwrap_model_for_generation` (its hooks off, the parameters gathered; an
    exception inside leaves the hooks off, which ends the run anyway). Otherwise nothing happens.
    Not to be nested with `whole_state_dict`: DeepSpeed refuses to gather gathered parameters.
    """
    if zero_stage(accelerator) == 3 and accelerator.deepspeed_engine_wrapped is not None:
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        with unwrap_model_for_generation(accelerator.deepspeed_engine_wrapped.engine):
            yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        if units:
            reshard = accelerator.state.fsdp_plugin.reshard_after_forward
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(reshard, recurse=False)


def whole_state_dict(model: nn.Module, accelerator: Accelerator) -> dict[str, Tensor] | None:
    """The sharded policy's whole weights on the main process (a collective: every rank calls it;
    the others get an empty dict), on the CPU; None for a model whose weights are not sharded.

    Tied weights are named once, under their first name, as `save_pretrained` names an unsharded
    model's. ZeRO-3 gathers one parameter at a time: the peak is one weight, not the model.
    """
    main = accelerator.is_main_process
    if zero_stage(accelerator) == 3:
        from deepspeed.runtime.zero import GatheredParameters

        state: dict[str, Tensor] = {}
        for name, param in model.named_parameters():  # each tied weight once
            with GatheredParameters([param]):
                if main:
                    state[name] = param.detach().to("cpu", copy=True)
        saved = model.state_dict().keys()  # the persistent buffers, besides the parameters
        if main:
            state |= {n: b.detach().cpu() for n, b in model.named_buffers() if n in saved}
        return state
    if not isinstance(model, FSDPModule):
        return None
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            state.pop(name, None)
        seen.add(id(param))
    return state


def shards_weights(model: nn.Module, accelerator: Accelerator) -> bool:
    """Whether each forward of the prepared `model` gathers its weights: a collective, so every
    rank must run as many forwards as every other."""
    return isinstance(model, FSDPModule) or zero_stage(accelerator) == 3


def local_rows(weight: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """The tensor this rank updates of `weight` and the indices in it of those of `rows` it holds.

    A plain tensor holds every row. FSDP 2 shards a weight by rows (a DTensor placed
    `Shard(0)`, laid out as `torch.chunk` splits: rank r holds rows r * ceil(n / N) onwards), so
    a rank writes only its own rows and the others write theirs.
    """
    if not isinstance(weight, DTensor):
        return weight, rows.to(weight.device)
    if weight.placements != (Shard(0),):
        raise ValueError(f"rows of a DTensor placed {weight.placements}, not (Shard(0),)")
    local = weight.to_local()
    mesh = weight.device_mesh
    start = mesh.get_local_rank() * math.ceil(weight.shape[0] / mesh.size())
    rows = rows.to(local.device)
    mine = (rows >= start) & (rows < start + local.shape[0])
    return local, rows[mine] - start
