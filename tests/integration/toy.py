"""A toy task a 2-layer random model learns within a minute on CPU, to test the algorithm itself.

Word-level tokenizer (decode/encode round trips exactly, unlike byte-level BPE on a random
model's byte soup), short prompts, a 100-word vocabulary, and a reward counting generated
words that contain an 'e' (22 of the 100 words).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

DEMO = Path(__file__).resolve().parents[2] / "experiments" / "data" / "tldr_demo.jsonl"


def count_e_words(prompts, completions, **kwargs):
    """trl reward convention; loadable as `toy:count_e_words` with tests/integration on the path."""
    return [float(sum("e" in word for word in c.split())) for c in completions]


def write_toy_task(folder: Path, vocab_size: int = 100, heads: int = 4) -> tuple[Path, Path]:
    """Save a tiny word-level GPT-2 and a short-prompt set; return (model dir, prompts file)."""
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()]
    counts: dict[str, int] = {}
    splitter = pre_tokenizers.Whitespace()
    for row in rows:
        for word, _ in splitter.pre_tokenize_str(f"{row['title']} {row['summary']}"):
            counts[word] = counts.get(word, 0) + 1
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "TL": 2, ";": 3, "DR": 4, ":": 5}
    for word in sorted(counts, key=lambda w: (-counts[w], w)):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = splitter
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
    )
    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=heads,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model_dir = folder / "toy-model"
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = folder / "toy-prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": row["id"], "prompt": f"{row['title']} TL;DR:"}) + "\n" for row in rows
        )
    )
    return model_dir, prompts


# Measured over 4 model seeds: held-out reward 1.6-1.8 -> 6.2-6.9 (of 8) in 3 iterations, ~16 s.
# Large batches and many epochs matter: the samples of a random model are nearly uniform noise,
# and the quantile signal is a small shift in word frequencies; with 8 epochs at lr 1e-2 two of
# three seeds drifted down instead.
TOY_OVERRIDES = [
    "model.device=cpu",
    "iterations=3",
    "data.prompts_per_iteration=40",
    "data.num_eval_prompts=8",
    "sampling.max_new_tokens=8",
    "sampling.max_prompt_tokens=64",
    "sampling.keep_tail_tokens=8",
    "data.samples_per_prompt=20",
    "train.learning_rate=3e-3",
    "train.batch_size=64",
    "train.num_epochs=16",
    "train.unfrozen_layers_ratio=1.0",
    "train.warmup_ratio=0.0",
    "eval.samples_per_prompt=8",
    "eval.conditioning_curve=false",  # K - 1 more sampling passes; on where a test checks it
]


def run_overrides(out: Path, model_dir: Path, prompts: Path) -> list[str]:
    """The overrides that point a config at a run directory and the toy task."""
    return [f"out_dir={out}", f"model.policy={model_dir}", f"data.train_prompts={prompts}"]


def slow_count_e_words(prompts, completions, **kwargs):
    """The same reward, slowed down so a test can kill the process while it scores."""
    import time

    time.sleep(0.05)
    return count_e_words(prompts, completions)
