"""The shipped TL;DR split: disjoint by post, reproducible byte for byte, loadable."""

from __future__ import annotations

import hashlib
import json
import runpy
from pathlib import Path

from alignment.prompts import load_prompts

DATA = Path(__file__).resolve().parents[2] / "experiments" / "data"
FILES = {name: DATA / f"tldr_{name}.jsonl" for name in ("train", "validation", "heldout")}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_split_is_disjoint_by_post_and_by_id():
    posts, ids = {}, {}
    for name, path in FILES.items():
        posts[name] = {" ".join(r["post"].split()) for r in rows(path)}
        ids[name] = {r["id"] for r in rows(path)}
    assert (len(ids["heldout"]), len(ids["validation"])) == (128, 128)
    assert len(ids["train"]) > 1000
    for a, b in (("train", "validation"), ("train", "heldout"), ("validation", "heldout")):
        assert not posts[a] & posts[b] and not ids[a] & ids[b], (a, b)
    for path in FILES.values():
        assert path.stat().st_size < 2_100_000


def test_the_loader_reads_all_three_with_references():
    for path in FILES.values():
        loaded = load_prompts(path)
        assert len(loaded) == len(rows(path))
        assert all(r.reference and r.prompt.endswith("TL;DR:") for r in loaded)


def test_the_script_reproduces_the_files(tmp_path, tldr_dev):
    script = runpy.run_path(str(DATA / "make_split.py"))
    written = script["write_split"](tldr_dev, tmp_path)
    for name, path in FILES.items():
        digest = hashlib.sha256(written[name].read_bytes()).hexdigest()
        assert digest == hashlib.sha256(path.read_bytes()).hexdigest(), name
    # every source post is in exactly one file (the source has no duplicate posts)
    assert sum(len(rows(p)) for p in FILES.values()) == len(rows(tldr_dev))


def test_identical_posts_are_merged_before_splitting():
    split_lines = runpy.run_path(str(DATA / "make_split.py"))["split_lines"]
    lines = [
        json.dumps({"id": f"p{i}", "post": f"post {i // 2 if i < 4 else i}"}) for i in range(300)
    ]
    lines[1] = json.dumps({"id": "p1", "post": "  post   0 "})  # p0's post up to whitespace
    split = split_lines(lines)
    kept = [json.loads(line)["id"] for part in split.values() for line in part]
    assert "p1" not in kept and "p3" not in kept and len(kept) == 298
    assert [len(split[n]) for n in ("heldout", "validation")] == [128, 128]
