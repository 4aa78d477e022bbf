import errno
import json
import os

import pytest

from alignment.errors import UserError
from alignment.io import atomic_directory, atomic_write, parse_shard, write_jsonl
from alignment.records import SampleRecord, load_samples, save_samples


def test_full_disk_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"a": 1}])

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(UserError, match="No space left on device"):
        write_jsonl(path, [{"a": 2}])
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_a_crash_inside_the_block_writes_nothing(tmp_path):
    path = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_write(path) as handle:
        handle.write("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_alt_file_round_trip_keeps_unknown_fields(tmp_path):
    path = tmp_path / "alt.jsonl"
    path.write_text(
        json.dumps(
            {"prompt": "p", "generations": ["a", "b"], "rewards": [1, None], "source": "alt"}
        )
        + "\n"
    )
    record = load_samples(path)[0]
    assert record.rewards == [1.0, None] and record.extra == {"source": "alt"}
    record.rewards = [float("nan"), 2.0]
    save_samples(path, [record])
    assert json.loads(path.read_text()) == {
        "prompt": "p",
        "generations": ["a", "b"],
        "rewards": [None, 2.0],
        "source": "alt",
    }


def test_reference_shaped_rewards_round_trip(tmp_path):
    """reward.subtract_reference keeps the raw rewards and the reference's next to the shaped."""
    path = tmp_path / "scored.jsonl"
    record = SampleRecord(
        prompt="p",
        generations=["a", "b"],
        rewards=[0.5, None],
        raw_rewards=[2.5, None],
        reference_reward=2.0,
    )
    save_samples(path, [record])
    assert json.loads(path.read_text())["raw_rewards"] == [2.5, None]
    assert load_samples(path) == [record]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"generations": ["a"]}, "s.jsonl:2: field 'prompt' is missing"),
        ({"prompt": "p", "generations": []}, "s.jsonl:2: field 'generations' is empty"),
        (
            {"prompt": "p", "generations": ["a"], "rewards": [1, 2]},
            "s.jsonl:2: field 'rewards' has 2 entries but 'generations' has 1",
        ),
        (
            {"prompt": "p", "generations": ["a"], "finish_reasons": ["eos"]},
            "s.jsonl:2: field 'finish_reasons' has a value of the wrong type",
        ),
        (
            {"prompt": "p", "generations": ["a"], "raw_rewards": [1, 2]},
            "s.jsonl:2: field 'raw_rewards' has 2 entries but 'generations' has 1",
        ),
        (
            {"prompt": "p", "generations": ["a"], "reference_reward": "high"},
            "s.jsonl:2: field 'reference_reward' must be a number",
        ),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "s.jsonl"
    good = SampleRecord(prompt="p", generations=["a"]).to_json()
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_samples(path)


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(UserError):
            parse_shard(bad)


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed mid-save")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    old = os.umask(0o027)
    try:
        with atomic_directory(target) as tmp:
            assert tmp.name.startswith(".ckpt.") and tmp.name.endswith(".tmp")
            (tmp / "weights").write_text("whole")
    finally:
        os.umask(old)
    assert (target / "weights").read_text() == "whole" and list(tmp_path.iterdir()) == [target]
    assert target.stat().st_mode & 0o777 == 0o750
