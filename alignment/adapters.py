"""Adapter-only LoRA checkpoints (`train.lora.checkpoint: adapter`): what they hold, how they load.

With LoRA every iteration trains a fresh adapter on the weights the previous one was merged into
(docs/algorithm.md section 19), so iteration n's adapter means something only on top of iteration
n-1's weights, and iteration 1's on top of the initial policy *with the control tokens added*.
An adapter checkpoint therefore holds, besides the tokenizer, conditioning, model card and
training state of every checkpoint:
- peft's adapter (`adapter_config.json`, `adapter_model.safetensors`): the LoRA matrices and,
  through `trainable_token_indices`, the control tokens' trained input rows (whole rows: peft
  writes them over the base's at the merge);
- `control_rows.safetensors`: the control tokens' rows of the weights the adapter was trained on
  (input rows; with an untied head, as GPT-J's, its rows and bias) and the embedding size. For
  iteration 1 that is what `model.policy` lacks: the resize and the rows `conditioning.prepare`
  drew from the run's seed, in the run's dtype; later it repeats the base checkpoint's rows;
- `adapter_base.json`: the base (`{"checkpoint": "../iter_{n-1}"}`, relative to this folder, or
  `{"model": <model.policy as the config gives it>}`) and the dtype the adapter was merged in.

`alignment.models.load_model` recognises such a folder, loads its base (recursively, in that
dtype) and merges the adapter in, so it yields the weights a `merged` checkpoint would hold.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import PreTrainedModel

from alignment.conditioning import tied_embeddings
from alignment.errors import UserError

ADAPTER_BASE = "adapter_base.json"
CONTROL_ROWS = "control_rows.safetensors"


@dataclass(frozen=True)
class AdapterBase:
    """What an adapter was trained on: a checkpoint folder or a model name, in `dtype`."""

    name: str
    dtype: str
    is_checkpoint: bool


def is_adapter_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_BASE).is_file()


def write_adapter_base(folder: Path, iteration: int, policy: str, dtype: torch.dtype) -> None:
    """Name the base of iteration `iteration`'s adapter: the previous checkpoint, or `policy`."""
    base = {"checkpoint": f"../iter_{iteration - 1:03d}"} if iteration > 1 else {"model": policy}
    data = {**base, "dtype": str(dtype).removeprefix("torch.")}
    (folder / ADAPTER_BASE).write_text(json.dumps(data, indent=1) + "\n")


def read_adapter_base(folder: Path) -> AdapterBase:
    """The base of an adapter checkpoint; a base checkpoint that is not there is an error."""
    path = folder / ADAPTER_BASE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        (key,) = {"checkpoint", "model"} & data.keys()
        name, dtype = data[key], data["dtype"]
        if not (isinstance(name, str) and name and isinstance(dtype, str)):
            raise ValueError(f"'{key}' and 'dtype' must be non-empty strings")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(
            f"{path}: not a valid adapter base file (one of 'checkpoint', 'model', and "
            f"'dtype'): {err}"
        ) from err
    if key == "model":
        return AdapterBase(name, dtype, is_checkpoint=False)
    base = Path(os.path.normpath(folder / name))
    if not base.is_dir():
        raise UserError(
            f"{folder} is a LoRA adapter on {base}, which is missing: an adapter checkpoint "
            "loads only with every earlier checkpoint of its run"
        )
    return AdapterBase(str(base), dtype, is_checkpoint=True)


def control_rows(model: PreTrainedModel, ids: list[int]) -> dict[str, Tensor]:
    """The control tokens' embedding rows of `model` and its embedding size, for `CONTROL_ROWS`.

    Tied embeddings (GPT-2, SmolLM2) need the input rows only; an untied head (GPT-J) has rows
    and a bias entry of its own, which a LoRA adapter never stores while the control logits are
    masked in training (they get no gradient).
    """
    index = torch.tensor(ids, device=model.get_input_embeddings().weight.device)
    embedding = model.get_input_embeddings().weight
    rows = {
        "ids": torch.tensor(ids),
        "num_embeddings": torch.tensor(embedding.shape[0]),
        "input": embedding.detach()[index].cpu(),
    }
    if not tied_embeddings(model):
        output = model.get_output_embeddings()
        rows["output"] = output.weight.detach()[index].cpu()
        if getattr(output, "bias", None) is not None:
            rows["output_bias"] = output.bias.detach()[index].cpu()
    return rows


def save_control_rows(rows: dict[str, Tensor], folder: Path) -> None:
    save_file(rows, str(folder / CONTROL_ROWS), metadata={"format": "pt"})


def set_control_rows(model: PreTrainedModel, rows: dict[str, Tensor]) -> None:
    """Give `model` the embedding size and control rows of `rows` (see `control_rows`)."""
    size = int(rows["num_embeddings"])
    current = model.get_input_embeddings().weight.shape[0]
    if current > size:
        raise ValueError(f"the base has {current} embedding rows, the adapter's base had {size}")
    if current < size:
        # the new rows are the control tokens', all set below: no initialisation survives
        model.resize_token_embeddings(size, mean_resizing=False)
    embedding = model.get_input_embeddings().weight
    index = rows["ids"].to(embedding.device)
    with torch.no_grad():
        embedding[index] = rows["input"].to(embedding)
        if "output" in rows:
            if tied_embeddings(model):
                raise ValueError("the adapter's base had an untied output layer, this one is tied")
            output = model.get_output_embeddings()
            output.weight[index] = rows["output"].to(output.weight)
            if "output_bias" in rows:
                output.bias[index] = rows["output_bias"].to(output.bias)


def apply_adapter(model: PreTrainedModel, folder: Path, base: str) -> PreTrainedModel:
    """`model`, the loaded base of the adapter checkpoint `folder`, with the base's control rows
    set and the adapter merged in: a plain model again (the same object, changed in place)."""
    try:
        rows_file = folder / CONTROL_ROWS
        if rows_file.is_file():
            set_control_rows(model, load_file(str(rows_file)))
        # not low_cpu_mem_usage: that makes the adapter in the base's dtype, which rounds the
        # float32 adapter of a bfloat16 model before the merge (the merged weights then differ)
        peft_model = PeftModel.from_pretrained(model, str(folder))
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise UserError(f"{folder}: cannot apply its LoRA adapter to {base}: {err}") from err
    except RuntimeError as err:
        if "size mismatch" not in str(err):  # anything else (out of memory) is no user error
            raise
        raise UserError(f"{folder}: its LoRA adapter does not fit {base}: {err}") from err
    return peft_model.merge_and_unload()
