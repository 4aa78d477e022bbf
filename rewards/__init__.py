"""Rewards: one protocol, four model backends, and any Python function.

`load_reward(spec, **options)` turns the name a user types into a Reward:

- `embedded` or `embedded:minilm-l6`: EmbeddedSummaryReward, TL;DR summary quality, offline.
- `value-head:BACKBONE:WEIGHTS`: ValueHeadReward in the CarperAI layout. BACKBONE (hub id or
  folder) gives the config and tokenizer, WEIGHTS (`.safetensors`, or `.bin` loaded weights-only;
  the spec is split at its last colon) gives every weight.
- `MODULE:FUNCTION` or `path/to/file.py:FUNCTION`: FunctionReward around a trl-style function.
  This imports the module (or runs the file) and calls the function: arbitrary code by design,
  so only use modules and files you trust.
- `classifier:NAME`, or a bare hub id or folder: ClassifierReward, any sequence classifier.
- `seq2seq:MODEL` (`template=`, and `labels=WORD=WEIGHT,...` or `target=TEXT`), `kaleido:MODEL`
  (`value=`, `vrd=`, `task=valence|relevance`) and `flipped:MODEL` (`instruction=`):
  Seq2SeqReward, an encoder-decoder read as a verbaliser (`rewards/seq2seq.py`).

`options` are the backend's keyword arguments (`batch_size`, `device`, `label`, `template`,
`tokenizer`, ...); for a function they are passed to every call. The CarperAI TL;DR RM is
`value-head:CarperAI/openai_summarize_tldr_sft:PATH/pytorch_model.bin` with
`tokenizer=EleutherAI/gpt-j-6b`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignment.errors import UserError, suggest
from rewards.base import FunctionReward, Reward, RewardBase

log = logging.getLogger(__name__)

__all__ = ["REWARDS", "FunctionReward", "Reward", "RewardBase", "load_function", "load_reward"]

_FUNCTION_SPEC = re.compile(r"^(?P<module>[A-Za-z_][\w.]*|.+\.py):(?P<attr>[A-Za-z_]\w*)$")
_EMBEDDED_REWARDS = {"embedded", "embedded:minilm-l6"}


def _embedded(target: str, /, **options: Any) -> Reward:
    if target not in _EMBEDDED_REWARDS:
        raise UserError(
            f"{target!r} is not a reward{suggest(target, sorted(_EMBEDDED_REWARDS))}; "
            "embedded rewards: embedded:minilm-l6"
        )
    from rewards.embedded import EmbeddedSummaryReward

    return _construct(EmbeddedSummaryReward, target, "embedded:minilm-l6", **options)


def _value_head(target: str, /, **options: Any) -> Reward:
    backbone, _, weights = target.removeprefix("value-head:").rpartition(":")
    if not backbone or not weights:
        raise UserError(f"{target!r}: write value-head:BACKBONE:WEIGHTS_FILE")
    from rewards.value_head import ValueHeadReward

    return _construct(ValueHeadReward, target, backbone, weights, **options)


def _classifier(target: str, /, **options: Any) -> Reward:
    from rewards.classifier import ClassifierReward

    return _construct(ClassifierReward, target, target.removeprefix("classifier:"), **options)


def _seq2seq(target: str, /, **options: Any) -> Reward:
    from rewards.seq2seq import Seq2SeqReward

    return _construct(Seq2SeqReward, target, target.removeprefix("seq2seq:"), **options)


def _kaleido(target: str, /, **options: Any) -> Reward:
    from rewards.seq2seq import Seq2SeqReward, kaleido_options

    model = target.removeprefix("kaleido:")
    preset = {k: options.pop(k) for k in ("value", "vrd", "task", "labels") if k in options}
    if "value" not in preset:
        raise UserError(f"reward {target}: give the value to score against, e.g. value=Honesty")
    return _construct(Seq2SeqReward, target, model, **kaleido_options(model, **preset), **options)


def _flipped(target: str, /, **options: Any) -> Reward:
    from rewards.seq2seq import FLIPPED_TEMPLATE, Seq2SeqReward

    if "instruction" not in options:
        raise UserError(f"reward {target}: give the instruction whose likelihood is the score")
    options.setdefault("template", FLIPPED_TEMPLATE)
    target_text = options.pop("instruction")
    model = target.removeprefix("flipped:")
    return _construct(Seq2SeqReward, target, model, target=target_text, **options)


def _function(target: str, /, **options: Any) -> Reward:
    if options.pop("device", None) is not None:
        log.info("reward %s is a Python function: --device does not apply", target)
    found = load_function(target)
    if isinstance(found, Reward):
        if options:
            raise UserError(f"{target} is a ready reward object; it takes no options")
        return found
    return FunctionReward(found, target.rpartition(":")[2], **options)


# Which backend builds a spec, by the text before its first colon.
REWARDS: dict[str, Callable[..., Reward]] = {
    "embedded": _embedded,
    "value-head": _value_head,
    "classifier": _classifier,
    "seq2seq": _seq2seq,
    "kaleido": _kaleido,
    "flipped": _flipped,
}


def load_reward(spec: str, **options: Any) -> Reward:
    """Build the reward a spec names (module docstring); unknown options are a UserError.

    A `module:function` spec imports that module and runs the function: arbitrary code, on
    purpose (it is how custom rewards plug in), so only name modules you trust.
    """
    spec = spec.strip()
    prefix = spec.partition(":")[0]
    if prefix in REWARDS:
        return REWARDS[prefix](spec, **options)
    if _FUNCTION_SPEC.match(spec):
        return _function(spec, **options)
    _refuse_near_miss(spec)
    return _classifier(spec, **options)


def _refuse_near_miss(spec: str) -> None:
    """A bare word close to a reward name ('embeded') is a typo, not a hub classifier id:
    say so at once instead of letting the hub lookup retry for a minute."""
    if "/" in spec or Path(spec).exists():
        return
    known = sorted(_EMBEDDED_REWARDS | {f"{name}:" for name in REWARDS if name != "embedded"})
    hint = suggest(spec, known)
    if hint:
        raise UserError(f"unknown reward {spec!r}{hint}")


def load_function(spec: str) -> Callable[..., Any]:
    """Import `module:attr` or `file.py:attr`; the module must be importable (or a file)."""
    match = _FUNCTION_SPEC.match(spec)
    if not match:
        raise UserError(f"{spec!r}: a function reward is written module:function")
    module_name, attr = match["module"], match["attr"]
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise UserError(f"{path}: no such file (reward {spec})")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise UserError(f"{path}: cannot be imported as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules.setdefault(path.stem, module)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            hint = suggest(module_name, [f"{name}" for name in REWARDS])
            raise UserError(
                f"reward {spec}: cannot import module {module_name!r} ({err}){hint}"
            ) from err
    function = getattr(module, attr, None)
    if function is None or not callable(function):
        raise UserError(f"reward {spec}: {module_name} has no callable {attr!r}")
    return function


def _construct(factory: Callable[..., Reward], spec: str, *args: Any, **options: Any) -> Reward:
    """Call a backend constructor, turning an unknown or missing option into a UserError."""
    try:
        inspect.signature(factory).bind(*args, **options)
    except TypeError as err:
        takes = [p for p in inspect.signature(factory).parameters if p not in ("self",)]
        raise UserError(f"reward {spec}: {err}; options it takes: {', '.join(takes)}") from err
    return factory(*args, **options)
