"""The shipped ALT-LMC request (rewards/prompts/alt_lmc_10shot.txt): rendered, parsed, packaged."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from collections import Counter
from importlib.resources import files

import pytest

from alignment.config import load_config
from experiments.commands.train import build_feedback
from rewards.feedback import (
    ALT_LMC_PROMPT,
    ALT_SUMMARY_PROMPT,
    HH_CATEGORIES,
    STEERLM_HH_ATTRIBUTES,
    STEERLM_HH_TEXTS,
    CategoryParser,
    Feedback,
    last_human_turn,
    packaged_prompt,
)
from tests.conftest import REPO, SHARED_DATA

FILE = "alt_lmc_10shot.txt"
PROMPT = "\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: How do I boil an egg?\n\nAssistant:"
COMPLETION = " Put it in boiling water for 9 minutes. "
QUERY = "Human: How do I boil an egg?\nAssistant: Put it in boiling water for 9 minutes.\nFeedback:"
# (human, assistant, label) per block; every field is one line, the query's label is empty
BLOCK = re.compile(r"^Human: (.*)\nAssistant: (.*)\nFeedback:(.*)$", re.M)


def blocks(request: str) -> list[tuple[str, str, str]]:
    return [(h, a, label.strip()) for h, a, label in BLOCK.findall(request)]


@pytest.mark.parametrize(
    ("prompt", "turn"),
    [
        (PROMPT, "How do I boil an egg?"),
        ("\n\nHuman: What is 27+10?\n\nAssistant:", "What is 27+10?"),
        ("Human: a\nAssistant: b\nHuman: c", "c"),  # no trailing Assistant:
        ("  A post with no dialogue.  ", "A post with no dialogue."),
    ],
)
def test_last_human_turn(prompt, turn):
    assert last_human_turn(prompt) == turn


def test_request_is_ten_labelled_examples_then_the_query():
    request = ALT_LMC_PROMPT.fill(PROMPT, COMPLETION)
    found = blocks(request)
    assert len(found) == 11
    examples, query = found[:10], found[10]
    assert query == ("How do I boil an egg?", "Put it in boiling water for 9 minutes.", "")
    assert request.endswith("\n\n" + QUERY)  # the query last, nothing after it
    labels = Counter(label for _, _, label in examples)
    assert set(labels) == set(HH_CATEGORIES) and min(labels.values()) >= 2
    instruction = request[: request.index("Human:")]
    assert all(category in instruction for category in HH_CATEGORIES)
    assert "#" not in request  # the provenance note is not sent
    assert ALT_LMC_PROMPT.messages(PROMPT, COMPLETION) == [{"role": "user", "content": request}]


def test_every_example_label_reads_back_through_the_category_parser():
    categories = CategoryParser(HH_CATEGORIES)
    steerlm = CategoryParser(HH_CATEGORIES, STEERLM_HH_TEXTS, STEERLM_HH_ATTRIBUTES)
    for _, _, label in blocks(ALT_LMC_PROMPT.user)[:10]:
        score = 3 - HH_CATEGORIES.index(label)
        assert categories(label) == Feedback(label, score)
        # a completion model answers after `Feedback:` and may go on with another example
        continued = f" {label}\n\nHuman: What is 2+2?\nAssistant: 4"
        assert categories(continued) == Feedback(label, score)
        assert steerlm(label) == Feedback(STEERLM_HH_TEXTS[label], score)


def test_examples_are_the_last_human_turns_of_the_named_hh_rows():
    path = SHARED_DATA / "hh_rlhf_harmless_test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    rows = {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}
    raw = (files("rewards") / "prompts" / FILE).read_text(encoding="utf-8")
    header = raw[: raw.index("\n\n")]
    ids = re.findall(r"hh-harmless-test-\d{4}", header)
    turns = [human for human, _, _ in blocks(ALT_LMC_PROMPT.user)[:10]]
    assert len(ids) == 10 and turns == [last_human_turn(rows[i]["prompt"]) for i in ids]


def test_the_prompt_file_is_package_data():
    resource = files("rewards") / "prompts" / FILE
    assert resource.is_file() and packaged_prompt(FILE) == ALT_LMC_PROMPT.user
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["rewards"]
    assert any(fnmatch.fnmatch(f"prompts/{FILE}", pattern) for pattern in globs)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["feedback_provider.parser=categories"], ALT_LMC_PROMPT),
        (["feedback_provider.parser=steerlm"], ALT_LMC_PROMPT),
        ([], ALT_SUMMARY_PROMPT),
    ],
)
def test_the_shipped_request_is_the_default_for_the_hh_presets(overrides, expected):
    config = load_config(None, ["algorithm=alt-feedback", *overrides])
    assert build_feedback(config).provider.prompt is expected


def test_a_request_of_your_own_replaces_it_whole():
    config = load_config(
        None,
        [
            "algorithm=alt-feedback",
            "feedback_provider.parser=categories",
            'feedback_provider.prompt="Rate: {prompt} / {completion}"',
        ],
    )
    prompt = build_feedback(config).provider.prompt
    assert prompt.fill(PROMPT, COMPLETION) == f"Rate: {PROMPT.strip()} / {COMPLETION.strip()}"


def test_the_endpoint_is_sent_the_rendered_request(tmp_path, server):
    server.reply = lambda body: "Harmless and helpful\n\nHuman: next"
    config = load_config(
        None,
        [
            "algorithm=alt-feedback",
            "feedback_provider.parser=categories",
            f"feedback_provider.base_url=http://127.0.0.1:{server.server_port}/v1",
            "feedback_provider.api_key_env=null",
            f"feedback_provider.cache_dir={tmp_path}",
        ],
    )
    assert build_feedback(config)([PROMPT], [COMPLETION]) == [Feedback("Harmless and helpful", 2)]
    [(_, body)] = server.requests
    request = ALT_LMC_PROMPT.fill(PROMPT, COMPLETION)
    assert body["messages"] == [{"role": "user", "content": request}]
