"""The arithmetic that makes a multi-process run train and sample as intended."""

from __future__ import annotations

import pytest

from alignment.loop import rank_seed
from alignment.trainer import shard_loss_weight


def test_shard_weights_make_the_ddp_mean_the_batch_token_mean():
    # ranks with 30 and 10 tokens, token means 2.0 and 6.0: the batch mean is
    # (30 * 2 + 10 * 6) / 40 = 3.0; DDP averages (1.5 * 2.0 + 0.5 * 6.0) / 2 = 3.0
    weights = [shard_loss_weight(n, 40, 2) for n in (30, 10)]
    assert weights == [1.5, 0.5]
    assert sum(w * m for w, m in zip(weights, (2.0, 6.0), strict=True)) / 2 == pytest.approx(3.0)
    assert shard_loss_weight(0, 40, 2) == 0.0  # an empty shard adds nothing
    assert shard_loss_weight(17, 17, 1) == 1.0  # one process: the loss as it was


def test_rank_seeds_differ_and_one_process_keeps_the_seed():
    assert rank_seed(7, 0, 1) == 7
    seeds = {rank_seed(s, r, 4) for s in range(10) for r in range(4)}
    assert len(seeds) == 40
