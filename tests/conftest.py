"""Tiny offline models and tokenizers, built in-process (no hub, no downloads)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from chat_server import CannedServer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_PROMPTS = REPO / "experiments" / "data" / "tldr_demo.jsonl"


def _corpus() -> list[str]:
    rows = [json.loads(line) for line in DEMO_PROMPTS.read_text().splitlines()]
    return [f"{r['title']} {r['post']} {r['summary']}" for r in rows]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) with ~400 tokens, trained on the shipped demo posts."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


def build_tiny_model(
    family: str, vocab_size: int, eos_id: int, seed: int = 0, *, width: int = 32, heads: int = 4
) -> PreTrainedModel:
    """A 2-layer random GPT-2 (tied embeddings) or GPT-J (untied, rotary) for fast tests."""
    torch.manual_seed(seed)
    common = {
        "vocab_size": vocab_size,
        "n_positions": 1024,
        "n_embd": width,
        "n_layer": 2,
        "n_head": heads,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
    }
    if family == "gpt2":
        model: PreTrainedModel = GPT2LMHeadModel(GPT2Config(**common))
    elif family == "gptj":
        model = GPTJForCausalLM(GPTJConfig(rotary_dim=4, tie_word_embeddings=False, **common))
    else:
        raise ValueError(family)
    return model.eval()


@pytest.fixture(params=["gpt2", "gptj"])
def tiny_model(request, tiny_tokenizer) -> PreTrainedModel:
    return build_tiny_model(request.param, len(tiny_tokenizer), tiny_tokenizer.eos_token_id)


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer) -> Path:
    """A saved tiny GPT-J checkpoint folder (model + tokenizer), loadable by path."""
    model = build_tiny_model("gptj", len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
    folder = tmp_path / "tiny-gptj"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def build_tiny_t5(folder: Path, words: list[str], **config: object) -> Path:
    """A 1-layer random T5 saved in `folder` with a word-level tokenizer over `words` (split on
    whitespace, `</s>` appended); ids 0, 1, 2 are pad, eos, unk. `config` adds T5Config fields."""
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    t5 = T5Config(
        vocab_size=len(vocab),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        **config,
    )
    T5ForConditionalGeneration(t5).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tldr_dev() -> Path:
    path = SHARED_DATA / "tldr_dev.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture
def server():
    srv = CannedServer()
    thread = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
