"""Tests for alignment.losses: golden vectors from ALT/Quark plus hand-computed cases."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from alignment.losses import (
    KLDirection,
    entropy_from_logits,
    masked_mean,
    quark_loss,
    token_kl,
    token_logprobs,
)

# Shipped with the repository (see tests/golden/README.md), so these tests always run.
GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"
# Tolerances of tests/golden/README.md, "Tolerance": float32 rounding of peaked distributions
# reaches ~4e-5 per token, and KLs that are ~0 need an absolute floor.
SCALAR_RTOL, SCALAR_ATOL = 1e-5, 1e-6
TOKEN_RTOL, TOKEN_ATOL = 1e-5, 1e-4


def _golden_params() -> list[Any]:
    """One pytest param per golden case (id = case name); a missing file is an error, not a skip."""
    cases = json.loads((GOLDEN_DIR / "quark_loss.json").read_text())["cases"]
    assert cases, f"no cases in {GOLDEN_DIR / 'quark_loss.json'}"
    return [pytest.param(c, id=c["name"]) for c in cases]


def _inputs(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # The logits were written from float32 tensors; float32 gives ALT's inputs back bit for bit.
    policy = torch.tensor(case["policy_logits"], dtype=torch.float32)
    ref = torch.tensor(case["ref_logits"], dtype=torch.float32)
    return policy, ref, torch.tensor(case["labels"]), torch.tensor(case["mask"])


def _assert_scalar(got: float, expected: float, what: str) -> None:
    assert abs(got - expected) <= SCALAR_RTOL * abs(expected) + SCALAR_ATOL, (what, got, expected)


# ---- golden vectors ----
@pytest.mark.parametrize("case", _golden_params())
def test_golden_per_token(case: dict[str, Any]) -> None:
    policy, ref, labels, mask = _inputs(case)
    n = case["num_added_tokens"]
    got = {
        "nll_tok": -token_logprobs(policy, labels),
        "entropy_tok": entropy_from_logits(policy),
        "kl_ref_policy_tok": token_kl(policy, ref, "ref_policy", n),
        "kl_policy_ref_tok": token_kl(policy, ref, "policy_ref", n),
    }
    for field, values in got.items():
        expected = case["expected"][field]
        if expected is None:  # quark_labels_on_added_tokens: the reference KL raises
            continue
        for b, row in enumerate(expected):
            for t, want in enumerate(row):
                assert (want is None) == (mask[b, t].item() == 0)
                if want is not None:
                    have = values[b, t].item()
                    assert abs(have - want) <= TOKEN_RTOL * abs(want) + TOKEN_ATOL, (field, b, t)


@pytest.mark.parametrize("case", _golden_params())
def test_golden_losses(case: dict[str, Any]) -> None:
    policy, ref, labels, mask = _inputs(case)
    expected = case["expected"]
    loss, stats = quark_loss(
        policy,
        labels,
        mask,
        entropy_coef=case["entropy_coef"],
        num_added_tokens=case["num_added_tokens"],
    )
    _assert_scalar(loss.item(), expected["loss_noKL"], "loss_noKL")
    _assert_scalar(stats["loss"], expected["loss_noKL"], "stats loss_noKL")
    _assert_scalar(stats["nll"], expected["nll_mean"], "nll_mean")
    _assert_scalar(stats["entropy"], expected["entropy_mean"], "entropy_mean")
    assert "kl" not in stats and stats["tokens"] == float(sum(map(sum, case["mask"])))

    directions: list[tuple[KLDirection, str, str]] = [
        ("ref_policy", "loss_KL", "kl_ref_policy_mean"),
        ("policy_ref", "loss_KL_quark_direction", "kl_policy_ref_mean"),
    ]
    for direction, loss_key, kl_key in directions:
        if expected[loss_key] is None:  # quark_labels_on_added_tokens
            continue
        loss, stats = quark_loss(
            policy,
            labels,
            mask,
            entropy_coef=case["entropy_coef"],
            kl_coef=case["kl_coef"],
            ref_logits=ref,
            kl_direction=direction,
            num_added_tokens=case["num_added_tokens"],
        )
        _assert_scalar(loss.item(), expected[loss_key], loss_key)
        _assert_scalar(stats["kl"], expected[kl_key], kl_key)


# ---- masked_mean ----
def test_masked_mean_is_one_token_mean_not_mean_of_sequence_means() -> None:
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    # (1+1+1+1+5) / 5 = 1.8; the mean of per-sequence means would be (1 + 5) / 2 = 3.
    assert masked_mean(x, mask).item() == pytest.approx(1.8)


def test_masked_mean_ignores_inf_and_nan_padding() -> None:
    x = torch.tensor([[1.0, 2.0, math.inf], [3.0, math.nan, -math.inf]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = masked_mean(x, mask)
    assert out.item() == pytest.approx(2.0)
    out.backward()
    assert x.grad is not None and torch.equal(x.grad, mask.float() / 3)


def test_masked_mean_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        masked_mean(torch.zeros(2, 3), torch.ones(2, 1))


# ---- per-token quantities ----
def test_token_logprobs_matches_log_softmax_gather() -> None:
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[0, 6, 3], [2, 2, 5]])
    want = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, labels), want)


def test_entropy_of_uniform_logits_is_log_v() -> None:
    h = entropy_from_logits(torch.zeros(2, 3, 7))
    torch.testing.assert_close(h, torch.full((2, 3), math.log(7)))


def test_entropy_handles_minus_inf_and_large_offsets() -> None:
    logits = torch.tensor([[[0.0, 0.0, -math.inf], [500.0, 500.0, 0.0]]])
    torch.testing.assert_close(entropy_from_logits(logits), torch.full((1, 2), math.log(2)))


def test_token_kl_zero_for_equal_logits() -> None:
    logits = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(1))
    for direction in ("ref_policy", "policy_ref"):
        kl = token_kl(logits, logits.clone(), direction)
        torch.testing.assert_close(kl, torch.zeros(2, 4), atol=1e-6, rtol=0)


def test_token_kl_drops_added_columns_before_softmax() -> None:
    # Policy = ref + per-token constant on the base columns, plus 3 large added columns:
    # renormalising over the base tokens makes q == r exactly, so both KLs are 0.
    gen = torch.Generator().manual_seed(2)
    ref = torch.randn(2, 4, 6, generator=gen)
    added = 5.0 + torch.randn(2, 4, 3, generator=gen)
    policy = torch.cat([ref + 3.0, added], dim=-1)
    for direction in ("ref_policy", "policy_ref"):
        kl = token_kl(policy, ref, direction, num_added_tokens=3)
        torch.testing.assert_close(kl, torch.zeros(2, 4), atol=1e-6, rtol=0)


def test_token_kl_matches_torch_kl_div() -> None:
    gen = torch.Generator().manual_seed(3)
    policy, ref = torch.randn(3, 5, 10, generator=gen), torch.randn(3, 5, 8, generator=gen)
    logq, logr = policy[..., :8].log_softmax(-1), ref.log_softmax(-1)
    # F.kl_div(input, target) = sum target * (log target - input).
    ref_policy = F.kl_div(logq, logr, reduction="none", log_target=True).sum(-1)
    policy_ref = F.kl_div(logr, logq, reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(token_kl(policy, ref, "ref_policy", 2), ref_policy)
    torch.testing.assert_close(token_kl(policy, ref, "policy_ref", 2), policy_ref)
    assert (ref_policy - policy_ref).abs().max() > 1e-3  # the two directions really differ


def test_token_kl_validates_shapes_and_direction() -> None:
    policy, ref = torch.zeros(2, 3, 10), torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match=r"\(2, 3, 8\).*\(2, 3, 10\)"):
        token_kl(policy, ref, "ref_policy", num_added_tokens=1)
    with pytest.raises(ValueError, match="direction"):
        token_kl(policy, ref, "forward", num_added_tokens=2)  # type: ignore[arg-type]


# ---- quark_loss ----
def test_quark_loss_hand_computed_uniform() -> None:
    # Uniform over v = 4: NLL = H = log 4 on every token, so loss = (1 - alpha) * log 4.
    logits, labels = torch.zeros(2, 3, 4), torch.tensor([[0, 1, 2], [3, 0, -100]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # padding label -100 must not break the gather
    loss, stats = quark_loss(logits, labels, mask, entropy_coef=0.06)
    assert loss.item() == pytest.approx(0.94 * math.log(4), rel=1e-6)
    assert stats["tokens"] == 5.0 and stats["nll"] == pytest.approx(math.log(4), rel=1e-6)


def test_quark_loss_gradient_reaches_policy_only() -> None:
    gen = torch.Generator().manual_seed(4)
    policy = torch.randn(2, 3, 7, generator=gen, requires_grad=True)
    ref = torch.randn(2, 3, 5, generator=gen, requires_grad=True)
    labels, mask = torch.tensor([[1, 6, 0], [2, 0, 0]]), torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, stats = quark_loss(
        policy, labels, mask, entropy_coef=0.06, kl_coef=0.05, ref_logits=ref, num_added_tokens=2
    )
    loss.backward()
    assert ref.grad is None
    assert policy.grad is not None and torch.isfinite(policy.grad).all()
    assert policy.grad[mask.bool()].abs().sum() > 0
    assert policy.grad[~mask.bool()].abs().sum() == 0  # padding gets no gradient
    assert set(stats) == {"loss", "nll", "entropy", "kl", "tokens"}
    assert all(isinstance(v, float) for v in stats.values())


def test_quark_loss_kl_needs_ref_logits() -> None:
    logits, labels = torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long)
    mask = torch.ones(1, 2)
    with pytest.raises(ValueError, match="ref_logits"):
        quark_loss(logits, labels, mask, entropy_coef=0.06, kl_coef=0.05)
    with pytest.raises(ValueError, match="kl_coef"):
        quark_loss(logits, labels, mask, entropy_coef=0.06, kl_coef=-1.0, ref_logits=logits)


def test_quark_loss_empty_mask_raises() -> None:
    logits, labels = torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="no response token"):
        quark_loss(logits, labels, torch.zeros(1, 2), entropy_coef=0.06)
