"""The chat client, chat feedback and pairwise judge against a canned local HTTP server."""

from __future__ import annotations

import pytest
from chat_server import completion

from alignment.errors import UserError
from rewards.feedback import ChatFeedback, Feedback
from rewards.judge import PairwiseJudge, combine_orders, parse_preference
from rewards.llm_client import ChatClient, request_key

KEY_ENV = "QUARK_ALT_TEST_KEY"
SECRET = "sk-test-0123456789"


@pytest.fixture
def make_client(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)

    def make(**options) -> ChatClient:
        options = {"timeout": 0.2, "max_retries": 2, "backoff": 0.01, **options}
        url = f"http://127.0.0.1:{server.server_port}/v1"
        return ChatClient(url, "judge-model", api_key_env=KEY_ENV, **options)

    return make


def conversation(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_replies_come_back_in_order_with_the_key_and_parameters(server, make_client):
    server.reply = lambda body: body["messages"][0]["content"].upper()
    client = make_client(params={"temperature": 0, "max_tokens": 5})
    assert client.chat([conversation("a"), conversation("b"), conversation("c")]) == ["A", "B", "C"]
    headers, body = server.requests[0]
    assert headers["Authorization"] == f"Bearer {SECRET}"
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == 5
    assert client.stats.sent == 3 and client.stats.failed == 0


def test_the_cache_prevents_a_second_request_even_from_a_new_client(server, make_client, tmp_path):
    client = make_client(cache_dir=tmp_path)
    assert client.chat([conversation("a"), conversation("b")]) == ["ok", "ok"]
    assert len(server.requests) == 2
    resumed = make_client(cache_dir=tmp_path)
    assert resumed.chat([conversation("b"), conversation("a")]) == ["ok", "ok"]
    assert len(server.requests) == 2 and resumed.stats.cached == 2 and resumed.stats.sent == 0
    # any change to the request is a different key
    make_client(cache_dir=tmp_path, params={"temperature": 1}).chat([conversation("a")])
    assert len(server.requests) == 3
    cached = "".join(p.read_text() for p in tmp_path.rglob("*.json"))
    assert SECRET not in cached and len(list(tmp_path.rglob("*.json"))) == 3


def test_identical_requests_in_one_call_are_sent_once(server, make_client):
    client = make_client()
    assert client.chat([conversation("a"), conversation("b"), conversation("a")]) == ["ok"] * 3
    assert len(server.requests) == 2


def test_request_key_ignores_field_order_only():
    a = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0}
    b = {"temperature": 0, "messages": [{"content": "x", "role": "user"}], "model": "m"}
    assert request_key(a) == request_key(b)
    assert request_key(a) != request_key({**a, "temperature": 0.5})


def test_a_server_slower_than_the_time_out_is_retried_then_gives_none(server, make_client):
    server.script = [(200, completion("late"), 0.5)] * 2
    client = make_client(max_retries=1)
    assert client.chat([conversation("a")]) == [None]
    assert len(server.requests) == 2 and client.stats.failed == 1


@pytest.mark.parametrize("status", [500, 503, 429])
def test_a_transient_error_is_retried(server, make_client, status):
    server.script = [(status, b'{"error": "busy"}', 0.0)]
    client = make_client()
    assert client.chat([conversation("a")]) == ["ok"]
    assert len(server.requests) == 2 and client.stats.failed == 0


def test_malformed_json_gives_none_without_retry_and_is_not_cached(server, make_client, tmp_path):
    server.script = [(200, b"{not json", 0.0), (200, b'{"choices": []}', 0.0)]
    client = make_client(cache_dir=tmp_path)
    assert client.chat([conversation("a")]) == [None]
    assert client.chat([conversation("a")]) == [None]
    assert len(server.requests) == 2 and client.stats.failed == 2
    assert client.chat([conversation("a")]) == ["ok"]  # asked again: nothing was cached


def test_a_refused_key_is_a_clear_error_naming_the_variable_and_not_retried(server, make_client):
    server.script = [(401, b'{"error": {"message": "bad key sk-test-0123456789"}}', 0.0)]
    with pytest.raises(UserError, match=f"HTTP 401.*\\${KEY_ENV}") as err:
        make_client().chat([conversation("a")])
    assert SECRET not in str(err.value)
    assert len(server.requests) == 1


def test_a_missing_key_is_an_error_before_any_request(server, make_client, monkeypatch):
    client = make_client()
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(UserError, match=f"\\${KEY_ENV}"):
        client.chat([conversation("a")])
    assert server.requests == []


def test_other_client_errors_are_not_retried(server, make_client):
    server.script = [(404, b'{"error": "no such model"}', 0.0)]
    with pytest.raises(UserError, match="HTTP 404.*judge-model.*no such model"):
        make_client().chat([conversation("a")])
    assert len(server.requests) == 1


def test_concurrency_is_bounded_by_max_workers(server, make_client):
    server.script = [(200, completion("ok"), 0.05)] * 6
    assert make_client(max_workers=2).chat([conversation(str(i)) for i in range(6)]) == ["ok"] * 6
    assert server.max_in_flight == 2


ALT_REPLY = (
    "Analysis: Clear and accurate.\nFeedback: Accurate, coherent, misses the deadline.\nScore: 2"
)


def test_chat_feedback_parses_good_replies_and_counts_the_rest(server, make_client):
    server.reply = lambda body: ALT_REPLY if "Kept" in body["messages"][1]["content"] else "Nice!"
    provider = ChatFeedback(make_client())
    prompt = "SUBREDDIT: r/jobs\nPOST: I missed a deadline.\nTL;DR:"
    got = provider.feedback([prompt, prompt], ["Kept the deadline", "a bad one"])
    assert got == [Feedback("Accurate, coherent, misses the deadline.", 2), None]
    assert (provider.stats.requested, provider.stats.unparsable, provider.stats.failed) == (2, 1, 0)
    # the two requests run concurrently: find the first generation's by its content
    ((system, user),) = [
        body["messages"] for _, body in server.requests if "Kept" in body["messages"][1]["content"]
    ]
    assert system["role"] == "system" and "TL;DR" not in user["content"]
    assert (
        "POST: SUBREDDIT: r/jobs\nPOST: I missed a deadline.\n\nSUMMARY: Kept the deadline"
        in (user["content"])
    )


def test_parse_preference():
    assert parse_preference("Comparison: 2 is shorter.\nPreferred: 2") == 2
    assert parse_preference("Comparison: x\n**Preferred:** Summary 1.") == 1
    assert parse_preference("Preferred: 1 or 2") is None  # the template echoed
    assert parse_preference("Preferred: 1\nPreferred: 2") is None
    assert parse_preference("I prefer the first one.") is None


def test_combine_orders():
    # A is summary 1 in the first order and summary 2 in the second
    assert combine_orders(1, 2) == "win"
    assert combine_orders(2, 1) == "loss"
    assert combine_orders(1, 1) == "tie" and combine_orders(2, 2) == "tie"  # position bias
    assert combine_orders(None, 2) is None and combine_orders(1, None) is None


def _preferred(body: dict, judge: str) -> str:
    text = body["messages"][-1]["content"]
    first = text.split("Summary 1:\n")[1].split("\n\nSummary 2:")[0]
    if judge == "fair":
        return f"Comparison: one is better.\nPreferred: {1 if first == 'good' else 2}"
    if judge == "first":
        return "Comparison: the first.\nPreferred: 1"
    return "Both are fine."


@pytest.mark.parametrize(
    ("judge", "expected"),
    [("fair", ["win", "loss"]), ("first", ["tie", "tie"]), ("mute", [None, None])],
)
def test_pairwise_judge_asks_both_orders(server, make_client, judge, expected):
    server.reply = lambda body: _preferred(body, judge)
    pairwise = PairwiseJudge(make_client())
    assert pairwise.compare(["post 1", "post 2"], ["good", "bad"], ["bad", "good"]) == expected
    assert len(server.requests) == 4
    firsts = [b["messages"][-1]["content"].split("Summary 1:\n")[1][:4] for _, b in server.requests]
    assert sorted(firsts) == ["bad\n", "bad\n", "good", "good"]
    assert pairwise.unusable == (4 if judge == "mute" else 0)
