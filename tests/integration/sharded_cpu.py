"""accelerate's FSDP 2 and DeepSpeed on CPU (gloo), for tests. accelerate turns either on only
with GPUs (on CPU it runs plain DDP), so `force` makes a launched process's accelerate state
sharded after the fact:

- "fsdp": FSDP 2 with the settings of the shipped experiments/accelerate/fsdp.yaml and the toy
  model's block class;
- "deepspeed": the DeepSpeed plugin accelerate would build from the environment that
  `accelerate launch --config_file experiments/accelerate/zero*.yaml` sets, so the shipped
  config's own settings.

`accelerate launch [options] sharded_cpu.py ENGINE ARGS` runs `quark-alt ARGS` so, with every
Accelerator the loop makes turned sharded as it is made.
"""

from __future__ import annotations

import importlib
import sys

import yaml
from accelerate import Accelerator, DeepSpeedPlugin, FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from launch import CONFIGS

BLOCK = "GPT2Block"  # the toy model's (toy.py)


def force(engine: str) -> None:
    state = AcceleratorState()
    if engine == "fsdp":
        config = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())["fsdp_config"]
        state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=config["fsdp_version"],
            auto_wrap_policy=config["fsdp_auto_wrap_policy"].lower(),
            transformer_cls_names_to_wrap=[BLOCK],
            reshard_after_forward=config["fsdp_reshard_after_forward"],
            state_dict_type=config["fsdp_state_dict_type"],
            cpu_ram_efficient_loading=config["fsdp_cpu_ram_efficient_loading"],
            cpu_offload=config["fsdp_offload_params"],
        )
        distributed_type = DistributedType.FSDP
    elif engine == "deepspeed":
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory allreduce (30 s of C++ build)
        # when its backend starts; without it the same collectives run on gloo. (By module name:
        # the attribute `deepspeed.comm.torch` is torch itself.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        plugin = DeepSpeedPlugin()  # from the ACCELERATE_DEEPSPEED_* variables the launch set
        plugin.set_mixed_precision(state.mixed_precision)
        if plugin.zero_stage == 3:
            # DeepSpeed keeps parameters of up to 1e5 elements whole on every rank: all of the
            # toy model's would be; 0 partitions every one, as a 6B model's large ones are
            plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin
        distributed_type = DistributedType.DEEPSPEED
    else:
        raise ValueError(f"engine {engine!r}: fsdp or deepspeed")
    # AcceleratorState() copies PartialState's fields each time it is called: set both
    state.distributed_type = PartialState().distributed_type = distributed_type


def sharded_accelerator(engine: str):
    def make(*args, **kwargs) -> Accelerator:
        accelerator = Accelerator(*args, **kwargs)
        force(engine)
        return accelerator

    return make


if __name__ == "__main__":
    import alignment.loop
    from experiments.cli import main

    alignment.loop.Accelerator = sharded_accelerator(sys.argv[1])  # type: ignore[misc]
    sys.exit(main(sys.argv[2:]))
