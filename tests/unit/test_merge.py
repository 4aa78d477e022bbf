"""`quark-alt merge`: shard files of a `--shard i/n` fan-out back into one, each prompt once."""

import json
import re

import pytest

from alignment.records import SampleRecord, load_samples, save_samples
from experiments.cli import main


def _prompts(tmp_path, n):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": f"post {i}"}) + "\n" for i in range(n))
    )
    return path


def _shards(tmp_path, ids_by_shard, with_ids=True):
    paths = []
    for i, ids in enumerate(ids_by_shard):
        path = tmp_path / f"shard{i}.jsonl"
        save_samples(
            path,
            [
                SampleRecord(
                    prompt=f"post {k}", id=f"p{k}" if with_ids else None, generations=[f"g{k}"]
                )
                for k in ids
            ],
        )
        paths.append(str(path))
    return paths


def test_sample_shards_merge_back_into_the_prompt_order(tmp_path, tiny_model_dir):
    prompts = _prompts(tmp_path, 5)
    shards = []
    for i in range(2):
        out = tmp_path / f"s{i}.jsonl"
        args = ["sample", "--model", str(tiny_model_dir), "--prompts", str(prompts)]
        args += ["--out", str(out), "-k", "2", "--max-new-tokens", "3", "--shard", f"{i}/2"]
        assert main(args) == 0
        shards.append(str(out))
    merged = tmp_path / "all.jsonl"
    assert main(["merge", *shards, "--out", str(merged), "--prompts", str(prompts)]) == 0
    assert [r.id for r in load_samples(merged)] == [f"p{i}" for i in range(5)]
    # without the prompt set, the shards are interleaved back the way --shard dealt them out
    assert main(["merge", *shards, "--out", str(merged)]) == 0
    assert [r.id for r in load_samples(merged)] == [f"p{i}" for i in range(5)]


def test_alt_files_without_ids_merge_by_prompt_text(tmp_path):
    prompts = _prompts(tmp_path, 3)
    shards = _shards(tmp_path, [[2, 0], [1]], with_ids=False)
    merged = tmp_path / "all.jsonl"
    assert main(["merge", *shards, "--out", str(merged), "--prompts", str(prompts)]) == 0
    assert [r.prompt for r in load_samples(merged)] == ["post 0", "post 1", "post 2"]


@pytest.mark.parametrize(
    ("ids_by_shard", "message"),
    [
        ([[0, 2], [1, 2]], r"shard1.jsonl:2: prompt 'p2' is also in .*shard0.jsonl:2"),
        ([[0, 2], []], r"1 prompt\(s\) of the prompt set are in no shard: 'p1'"),
        ([[0, 2, 7], [1]], r"shard0.jsonl:3: this prompt is not in the prompt set"),
    ],
)
def test_a_shard_that_died_or_ran_twice_is_refused(tmp_path, capsys, ids_by_shard, message):
    prompts = _prompts(tmp_path, 3)
    shards = _shards(tmp_path, ids_by_shard)
    out = tmp_path / "all.jsonl"
    assert main(["merge", *shards, "--out", str(out), "--prompts", str(prompts)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()  # nothing half-written
