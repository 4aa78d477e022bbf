"""accelerate's FSDP 2 on CPU (gloo), for tests. accelerate turns FSDP on only with GPUs, so
`force_fsdp2` makes a launched process's accelerate state FSDP 2 after the fact, with the
settings of the shipped experiments/accelerate/fsdp.yaml and the toy model's block class.

`accelerate launch [options] fsdp_cpu.py ARGS` runs `quark-alt ARGS` so, with every Accelerator
the loop makes turned FSDP 2 as it is made.
"""

from __future__ import annotations

import sys

import yaml
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from launch import CONFIGS

BLOCK = "GPT2Block"  # the toy model's (toy.py)


def force_fsdp2() -> None:
    config = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())["fsdp_config"]
    state = AcceleratorState()
    state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=config["fsdp_version"],
        auto_wrap_policy=config["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=[BLOCK],
        reshard_after_forward=config["fsdp_reshard_after_forward"],
        state_dict_type=config["fsdp_state_dict_type"],
        cpu_ram_efficient_loading=config["fsdp_cpu_ram_efficient_loading"],
        cpu_offload=config["fsdp_offload_params"],
    )
    # AcceleratorState() copies PartialState's fields each time it is called: set both
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP


def sharded_accelerator(*args, **kwargs) -> Accelerator:
    accelerator = Accelerator(*args, **kwargs)
    force_fsdp2()
    return accelerator


if __name__ == "__main__":
    import alignment.loop
    from experiments.cli import main

    alignment.loop.Accelerator = sharded_accelerator  # type: ignore[misc]
    sys.exit(main(sys.argv[1:]))
