"""Tests for `trl_flower.losses`: references written plainly, hand-computed paths, the zero-at-balance contract,
equivalences between SubTB / DB / TB, padding invariance, a tabular policy trained to the tree flows, and SFT vs HF."""

from __future__ import annotations

import ast
import doctest
import math
from pathlib import Path

import pytest
import torch

import trl_flower.losses as losses_module
from trl_flower.losses import (
    combine_losses,
    detailed_balance_loss,
    flow_log_probs,
    flower_subtb_loss,
    flower_tb_loss,
    full_distribution_loss,
    sft_loss,
    token_log_probs,
    trajectory_balance_loss,
    tree_log_mass,
    tree_normalized_flow_log_probs,
)

F64 = torch.float64
NAMES = ("log_pf", "log_pterm", "log_reward", "log_term_target")


def random_flow_inputs(lengths, T, dtype=F64, seed=0, requires_grad=False):
    """Random log-probs / targets of the [B, T] / [B, T+1] contract (padding holds random values too)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    inputs = {
        "log_pf": -torch.rand(B, T, generator=g, dtype=F64) * 3,
        "log_pterm": -torch.rand(B, T + 1, generator=g, dtype=F64) * 5,
        "log_reward": -torch.rand(B, T, generator=g, dtype=F64) * 3,
        "log_term_target": -torch.rand(B, T + 1, generator=g, dtype=F64) * 5,
    }
    inputs = {k: v.to(dtype).requires_grad_(requires_grad) for k, v in inputs.items()}
    inputs["lengths"] = torch.tensor(lengths, dtype=torch.long)
    return inputs


def reference_subtb(log_pf, log_pterm, log_reward, log_term_target, lengths, subtb_lambda=1.0, reduction="mean"):
    """The Res(i, j) formula of the contract, with plain Python loops over samples and segments."""
    total_num, total_den, per_sample = 0.0, 0.0, []
    for b in range(len(lengths)):
        t = int(lengths[b])
        num, den = 0.0, 0.0
        for i in range(t):
            for j in range(i + 1, t + 1):
                res = 0.0
                for k in range(i, j):
                    res = res + log_pf[b, k] - log_reward[b, k]
                res = res + (log_pterm[b, j] - log_term_target[b, j]) - (log_pterm[b, i] - log_term_target[b, i])
                w = subtb_lambda ** (j - i - 1)
                num = num + w * res**2
                den = den + w
        per_sample.append(num / den if den > 0 else torch.zeros((), dtype=F64))
        total_num, total_den = total_num + num, total_den + den
    if reduction == "none":
        return torch.stack([torch.as_tensor(x, dtype=F64) for x in per_sample])
    return total_num / total_den


def grads(loss, inputs):
    return torch.autograd.grad(loss, [inputs[n] for n in NAMES], allow_unused=False)


# --------------------------------------------------------------------------------------------------------------------
# Vectorised SubTB against the plain reference
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("subtb_lambda", [1.0, 0.9])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_subtb_matches_plain_reference_value_and_grad(subtb_lambda, reduction):
    T = 6
    inputs = random_flow_inputs([0, 1, 3, T, 2, T, 5], T, requires_grad=True)
    got = flower_subtb_loss(**inputs, subtb_lambda=subtb_lambda, reduction=reduction)
    want = reference_subtb(**inputs, subtb_lambda=subtb_lambda, reduction=reduction)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Gradients of the sums too: the vectorised masks must route gradients exactly like the loops.
    for g_got, g_want in zip(grads(got.sum(), inputs), grads(want.sum(), inputs)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    if reduction == "none":
        assert got[0].item() == 0.0  # length-0 sample: no segments


def test_subtb_float32_close_to_float64_reference_and_keeps_dtype():
    T = 5
    inputs32 = random_flow_inputs([5, 2, 0, 4], T, dtype=torch.float32, seed=3)
    inputs64 = random_flow_inputs([5, 2, 0, 4], T, dtype=F64, seed=3)
    got = flower_subtb_loss(**inputs32, subtb_lambda=0.9)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_subtb(**inputs64, subtb_lambda=0.9), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Brute force on hand-made paths (values worked out in the comments)
# --------------------------------------------------------------------------------------------------------------------

# Path A (t = 2): log_pf = [-1, -2], log_reward = [-1.5, -1]  -> δ = [0.5, -1]
#                 log_pterm = [-3, -4, -0.5], log_term_target = [-3, -3, -1] -> g = [0, -1, 0.5]
#                 C = [0, 0.5, -0.5], P = C + g = [0, -0.5, 0]
#                 Res(0,1) = -0.5, Res(0,2) = 0, Res(1,2) = 0.5
#                 λ = 1:   (0.25 + 0 + 0.25) / 3 = 1/6
#                 λ = 0.5: weights 1, 0.5, 1 -> (0.25 + 0 + 0.25) / 2.5 = 0.2
#                 DB: (0.5² + 1² + 0.5²) / 3 = 0.5;  flower TB: Σδ + g_2 = -0.5 + 0.5 = 0 -> 0
PATH_A = dict(log_pf=[-1.0, -2.0], log_pterm=[-3.0, -4.0, -0.5], log_reward=[-1.5, -1.0], log_term=[-3.0, -3.0, -1.0])
# Path B (t = 1): δ = [2], g = [1, 0] -> Res(0,1) = 2 + 0 - 1 = 1 -> SubTB 1; DB (2² + 0²)/2 = 2; TB (2 + 0)² = 4
PATH_B = dict(log_pf=[-1.0], log_pterm=[-1.0, -2.0], log_reward=[-3.0], log_term=[-2.0, -2.0])
# Path C (t = 0): only g_0 = -1 -> no segment (SubTB 0); DB = g_0² = 1; TB = g_0² = 1
PATH_C = dict(log_pf=[], log_pterm=[-1.0], log_reward=[], log_term=[0.0])
# Path D (t = 3): δ = [1, 1, 1], g = 0 -> Res(i, j) = j - i
#                 λ = 1: (1 + 1 + 1 + 4 + 4 + 9) / 6 = 20 / 6 = 10/3
#                 λ = 0.5: (3·1 + 2·0.5·4 + 0.25·9) / (3 + 2·0.5 + 0.25) = 9.25 / 4.25 = 37/17
#                 DB: (1 + 1 + 1 + 0) / 4 = 0.75; TB: 3² = 9
PATH_D = dict(log_pf=[-1.0, -1.0, -1.0], log_pterm=[-2.0] * 4, log_reward=[-2.0, -2.0, -2.0], log_term=[-2.0] * 4)


def batch_of(*paths, pad=float("nan")):
    """Stack hand-made paths into the [B, T] / [B, T+1] contract, padding with `pad`."""
    T = max(len(p["log_pf"]) for p in paths)

    def row(values, width):
        return list(values) + [pad] * (width - len(values))

    return {
        "log_pf": torch.tensor([row(p["log_pf"], T) for p in paths], dtype=F64),
        "log_pterm": torch.tensor([row(p["log_pterm"], T + 1) for p in paths], dtype=F64),
        "log_reward": torch.tensor([row(p["log_reward"], T) for p in paths], dtype=F64),
        "log_term_target": torch.tensor([row(p["log_term"], T + 1) for p in paths], dtype=F64),
        "lengths": torch.tensor([len(p["log_pf"]) for p in paths]),
    }


@pytest.mark.parametrize(
    "paths, subtb_lambda, subtb, db, tb",
    [
        ([PATH_A], 1.0, 1 / 6, 0.5, 0.0),
        ([PATH_A], 0.5, 0.2, 0.5, 0.0),
        ([PATH_B], 1.0, 1.0, 2.0, 4.0),
        ([PATH_D], 1.0, 10 / 3, 0.75, 9.0),
        ([PATH_D], 0.5, 37 / 17, 0.75, 9.0),
        # Pooled: SubTB (0.25 + 0 + 0.25 + 1) / (3 + 1 + 0) = 0.375; DB (1.5 + 4 + 1) / (3 + 2 + 1) = 6.5/6;
        # TB (0 + 4 + 1) / 3 = 5/3
        ([PATH_A, PATH_B, PATH_C], 1.0, 0.375, 6.5 / 6, 5 / 3),
    ],
)
def test_hand_computed_paths(paths, subtb_lambda, subtb, db, tb):
    batch = batch_of(*paths)  # NaN padding: must not leak anywhere
    assert flower_subtb_loss(**batch, subtb_lambda=subtb_lambda).item() == pytest.approx(subtb, abs=1e-12)
    assert detailed_balance_loss(**batch).item() == pytest.approx(db, abs=1e-12)
    assert flower_tb_loss(**batch).item() == pytest.approx(tb, abs=1e-12)


def test_hand_computed_paths_reduction_none():
    batch = batch_of(PATH_A, PATH_B, PATH_C, PATH_D)
    per_sample = flower_subtb_loss(**batch, reduction="none")
    torch.testing.assert_close(per_sample, torch.tensor([1 / 6, 1.0, 0.0, 10 / 3], dtype=F64))


def test_no_valid_segment_gives_connected_zero():
    batch = batch_of(PATH_C, PATH_C)
    batch["log_pf"] = torch.zeros(2, 0, dtype=F64, requires_grad=True)
    batch["log_pterm"].requires_grad_(True)
    loss = flower_subtb_loss(**batch)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(batch["log_pterm"].grad, torch.zeros_like(batch["log_pterm"]))


# --------------------------------------------------------------------------------------------------------------------
# Contract: zero (with zero gradient) at balance, non-negative elsewhere
# --------------------------------------------------------------------------------------------------------------------


def balanced_inputs(lengths, T, seed=0):
    """log_pf = log_reward and log_pterm = log_term_target (as separate leaves that require grad)."""
    base = random_flow_inputs(lengths, T, seed=seed)
    inputs = {
        "log_pf": base["log_reward"].clone(),
        "log_reward": base["log_reward"].clone(),
        "log_pterm": base["log_term_target"].clone(),
        "log_term_target": base["log_term_target"].clone(),
    }
    inputs = {k: v.requires_grad_(True) for k, v in inputs.items()}
    inputs["lengths"] = base["lengths"]
    return inputs


@pytest.mark.parametrize(
    "loss_fn",
    [
        flower_subtb_loss,
        lambda **kw: flower_subtb_loss(**kw, subtb_lambda=0.7),
        lambda **kw: flower_subtb_loss(**kw, reduction="none").sum(),
        detailed_balance_loss,
        flower_tb_loss,
    ],
    ids=["subtb", "subtb_lambda0.7", "subtb_none", "db", "flower_tb"],
)
def test_zero_loss_and_zero_grad_at_balance(loss_fn):
    inputs = balanced_inputs([0, 2, 4, 4, 1], T=4)
    loss = loss_fn(**inputs)
    assert loss.item() == 0.0
    for g in grads(loss, inputs):
        assert torch.count_nonzero(g) == 0
    # One perturbed token makes it strictly positive (so the zero above is not vacuous).
    with torch.no_grad():
        inputs["log_pf"][1, 0] += 0.3
    assert loss_fn(**inputs).item() > 0.0


def test_trajectory_balance_zero_at_balance_with_learned_log_z():
    log_pf_sum = torch.tensor([-2.0, -5.0, -1.0], dtype=F64, requires_grad=True)
    log_z = torch.tensor(1.5, dtype=F64, requires_grad=True)
    log_reward = (log_pf_sum + 1.5).detach()
    loss = trajectory_balance_loss(log_pf_sum, log_reward, log_z)
    assert loss.item() == 0.0
    g_pf, g_z = torch.autograd.grad(loss, [log_pf_sum, log_z])
    assert torch.count_nonzero(g_pf) == 0 and g_z.item() == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_non_negative_on_random_inputs(seed):
    inputs = random_flow_inputs([0, 1, 5, 3, 5], T=5, seed=seed)
    assert flower_subtb_loss(**inputs).item() > 0.0
    assert (flower_subtb_loss(**inputs, reduction="none")[1:] > 0).all()
    assert detailed_balance_loss(**inputs).item() > 0.0
    assert flower_tb_loss(**inputs).item() >= 0.0
    child = random_children(seed)
    assert full_distribution_loss(child["log_pi"], child["log_r"], child["child_mask"], child["state_mask"]).item() > 0


# --------------------------------------------------------------------------------------------------------------------
# Full-distribution (KL) variant
# --------------------------------------------------------------------------------------------------------------------


def random_children(seed, B=3, S=4, K=4, V=12):
    """Random full-vocabulary logits, distinct children per state (some with zero flow), normalised rewards."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V, generator=g, dtype=F64)
    child_ids = torch.argsort(torch.rand(B, S, V, generator=g), dim=-1)[..., :K]  # distinct ids per state
    n_children = torch.randint(1, K + 1, (B, S), generator=g)
    child_mask = torch.arange(K)[None, None, :] < n_children[..., None]
    state_mask = torch.rand(B, S, generator=g) < 0.8
    state_mask[0, 0] = True
    raw = torch.randn(B, S, K, generator=g, dtype=F64)
    raw[..., 1] = float("-inf")  # second child of every state has zero flow (only matters when it exists)
    raw = torch.where(child_mask, raw, float("-inf"))
    log_r = torch.log_softmax(raw, dim=-1)
    log_r = torch.where(child_mask, log_r, float("nan"))  # padding children: arbitrary
    return {
        "logits": logits,
        "child_ids": child_ids,
        "log_pi": token_log_probs(logits, child_ids),
        "log_r": log_r,
        "child_mask": child_mask,
        "state_mask": state_mask,
    }


def reference_full_distribution(log_pi, log_r, child_mask, state_mask):
    kls = []
    for b in range(log_pi.shape[0]):
        for s in range(log_pi.shape[1]):
            if not state_mask[b, s]:
                continue
            kl = 0.0
            for c in range(log_pi.shape[2]):
                if child_mask[b, s, c] and log_r[b, s, c] > float("-inf"):
                    kl += math.exp(log_r[b, s, c]) * (log_r[b, s, c] - log_pi[b, s, c])
            kls.append(kl)
    return float(sum(kls) / len(kls))


def test_full_distribution_hand_values():
    # state 1: r = (0.5, 0.5), π = (0.25, 0.5) -> 0.5 ln 2;  state 2: r = (1, 0), π = (0.5, 0.1) -> ln 2
    # state 3 is masked out (NaN inside). Mean over 2 valid states = 0.75 ln 2.
    log = math.log
    log_pi = torch.tensor([[[log(0.25), log(0.5)], [log(0.5), log(0.1)], [float("nan")] * 2]], dtype=F64)
    log_r = torch.tensor([[[log(0.5), log(0.5)], [0.0, float("-inf")], [float("nan")] * 2]], dtype=F64)
    child_mask = torch.tensor([[[True, True], [True, True], [True, True]]])
    state_mask = torch.tensor([[True, True, False]])
    loss = full_distribution_loss(log_pi, log_r, child_mask, state_mask)
    assert loss.item() == pytest.approx(0.75 * math.log(2), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_full_distribution_matches_reference_and_has_finite_grads(seed):
    child = random_children(seed)
    logits = child["logits"].clone().requires_grad_(True)
    log_pi = token_log_probs(logits, child["child_ids"])
    loss = full_distribution_loss(log_pi, child["log_r"], child["child_mask"], child["state_mask"])
    want = reference_full_distribution(log_pi.detach(), child["log_r"], child["child_mask"], child["state_mask"])
    assert loss.item() == pytest.approx(want, abs=1e-12)
    (g,) = torch.autograd.grad(loss, [logits])
    assert torch.isfinite(g).all() and torch.count_nonzero(g) > 0


def test_full_distribution_zero_loss_and_zero_logit_grad_at_balance():
    # π = r on the children (zero-flow child included: logit -inf), every other token gets logit -inf.
    child = random_children(7)
    B, S, V = child["logits"].shape
    r = torch.where(child["child_mask"], child["log_r"], float("-inf"))  # [B, S, K]
    logits = torch.full((B, S, V), float("-inf"), dtype=F64).scatter(-1, child["child_ids"], r)
    logits.requires_grad_(True)
    log_pi = token_log_probs(logits, child["child_ids"])
    loss = full_distribution_loss(log_pi, child["log_r"], child["child_mask"], child["state_mask"])
    assert loss.item() == pytest.approx(0.0, abs=1e-14)
    (g,) = torch.autograd.grad(loss, [logits])
    assert not torch.isnan(g).any()
    torch.testing.assert_close(g, torch.zeros_like(g), atol=1e-14, rtol=0)
    # Moving mass to a non-child token (or between children) makes it positive.
    with torch.no_grad():
        logits[0, 0, child["child_ids"][0, 0, 0]] += 0.5
    assert (
        full_distribution_loss(
            token_log_probs(logits, child["child_ids"]), child["log_r"], child["child_mask"], child["state_mask"]
        ).item()
        > 1e-4
    )


def test_full_distribution_no_valid_state_gives_connected_zero():
    log_pi = torch.zeros(1, 2, 3, requires_grad=True)
    loss = full_distribution_loss(
        log_pi, torch.zeros(1, 2, 3), torch.ones(1, 2, 3, dtype=torch.bool), torch.zeros(1, 2, dtype=torch.bool)
    )
    assert loss.item() == 0.0 and loss.grad_fn is not None


# --------------------------------------------------------------------------------------------------------------------
# Equivalences between SubTB, DB and TB
# --------------------------------------------------------------------------------------------------------------------


def test_subtb_small_lambda_tends_to_length_one_segments():
    """λ → 0 keeps only the segments (i, i+1): SubTB → Σ Res(i, i+1)² / Σ_b t_b (pooled).

    If moreover every termination term is balanced (g_k = log_pterm[k] − log_term_target[k] = 0 for all k ≤ t_b),
    Res(i, i+1) = δ_i and the DB loss is the same Σ δ² over Σ_b (t_b + 1) transitions (the extra transition per
    sample is the termination, with residual g_{t_b} = 0), so SubTB · Σ t_b = DB · Σ (t_b + 1).
    """
    T = 5
    inputs = random_flow_inputs([0, 3, 5, 1, 4], T, seed=11)
    got = flower_subtb_loss(**inputs, subtb_lambda=1e-9)
    num, den = 0.0, 0
    for b, t in enumerate(inputs["lengths"].tolist()):
        for i in range(t):
            g_i = inputs["log_pterm"][b, i] - inputs["log_term_target"][b, i]
            g_j = inputs["log_pterm"][b, i + 1] - inputs["log_term_target"][b, i + 1]
            num, den = num + (inputs["log_pf"][b, i] - inputs["log_reward"][b, i] + g_j - g_i) ** 2, den + 1
    assert got.item() == pytest.approx((num / den).item(), rel=1e-7)
    # λ = 0 exactly is allowed and gives the limit.
    assert flower_subtb_loss(**inputs, subtb_lambda=0.0).item() == pytest.approx((num / den).item(), rel=1e-12)

    inputs["log_pterm"] = inputs["log_term_target"].clone()
    sum_t = inputs["lengths"].sum().item()
    subtb = flower_subtb_loss(**inputs, subtb_lambda=1e-9).item()
    db = detailed_balance_loss(**inputs).item()
    assert subtb * sum_t == pytest.approx(db * (sum_t + len(inputs["lengths"])), rel=1e-7)


def test_subtb_large_lambda_tends_to_tb_on_equal_lengths():
    """λ → ∞ with equal lengths L keeps only the full segment (0, L): Res(0, L) = TB residual − g_0.

    With g_0 = log_pterm[0] − log_term_target[0] = 0 (the root's termination is on target) this is the flower TB
    residual Σ δ + g_L, so SubTB → flower_tb_loss (next-longest segments weigh 1/λ relative).
    """
    L = 4
    inputs = random_flow_inputs([L] * 6, L, seed=5)
    inputs["log_pterm"][:, 0] = inputs["log_term_target"][:, 0]
    subtb = flower_subtb_loss(**inputs, subtb_lambda=1e9).item()
    assert subtb == pytest.approx(flower_tb_loss(**inputs).item(), rel=1e-7)
    # ... and it is really a limit: at λ = 1 the two differ.
    assert abs(flower_subtb_loss(**inputs).item() - flower_tb_loss(**inputs).item()) > 1e-3


def test_one_token_titles_subtb_db_tb_relations():
    """One-token titles (t_b = 1): δ = log_pf[0] − log_reward[0], g_k = log_pterm[k] − log_term_target[k].

    * SubTB has the single segment (0, 1): Res = δ + g_1 − g_0, whatever λ.
    * flower TB: (δ + g_1)², so SubTB = TB when g_0 = 0.
    * DB: two transitions per sample, (δ² + g_1²) / 2 averaged, so by (a + b)² ≤ 2(a² + b²): TB ≤ 4 · DB, with
      equality iff δ = g_1 for every sample.
    """
    inputs = random_flow_inputs([1] * 8, T=1, seed=2)
    d = inputs["log_pf"][:, 0] - inputs["log_reward"][:, 0]
    g = inputs["log_pterm"] - inputs["log_term_target"]  # [B, 2]
    expected_subtb = ((d + g[:, 1] - g[:, 0]) ** 2).mean().item()
    for lam in (1.0, 0.3):
        assert flower_subtb_loss(**inputs, subtb_lambda=lam).item() == pytest.approx(expected_subtb, rel=1e-12)
    tb, db = flower_tb_loss(**inputs).item(), detailed_balance_loss(**inputs).item()
    assert tb == pytest.approx(((d + g[:, 1]) ** 2).mean().item(), rel=1e-12)
    assert db == pytest.approx(((d**2 + g[:, 1] ** 2) / 2).mean().item(), rel=1e-12)
    assert tb < 4 * db

    inputs["log_pterm"][:, 0] = inputs["log_term_target"][:, 0]  # g_0 = 0
    assert flower_subtb_loss(**inputs).item() == pytest.approx(flower_tb_loss(**inputs).item(), rel=1e-12)
    inputs["log_pterm"][:, 1] = inputs["log_term_target"][:, 1] + d  # g_1 = δ
    assert flower_tb_loss(**inputs).item() == pytest.approx(4 * detailed_balance_loss(**inputs).item(), rel=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# Padding invariance
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_fn",
    [
        flower_subtb_loss,
        lambda **kw: flower_subtb_loss(**kw, subtb_lambda=0.5, reduction="none").sum(),
        detailed_balance_loss,
        flower_tb_loss,
    ],
    ids=["subtb", "subtb_none", "db", "flower_tb"],
)
@pytest.mark.parametrize("pad", [float("nan"), float("inf"), float("-inf"), 1e6])
def test_padding_does_not_change_loss_or_grad(loss_fn, pad):
    T = 5
    clean = random_flow_inputs([0, 2, 5, 3], T, seed=9, requires_grad=True)
    dirty = {k: v.detach().clone() for k, v in clean.items()}
    k_title = torch.arange(T)[None, :] >= clean["lengths"][:, None]  # [B, T] padded title slots
    k_state = torch.arange(T + 1)[None, :] > clean["lengths"][:, None]  # [B, T+1] padded states
    for name in NAMES:
        dirty[name][k_title if dirty[name].shape[1] == T else k_state] = pad
        dirty[name].requires_grad_(True)
    loss_clean, loss_dirty = loss_fn(**clean), loss_fn(**dirty)
    torch.testing.assert_close(loss_dirty, loss_clean, rtol=0, atol=0)
    for name, g_clean, g_dirty in zip(NAMES, grads(loss_clean, clean), grads(loss_dirty, dirty)):
        torch.testing.assert_close(g_dirty, g_clean, rtol=0, atol=0)
        pad_mask = k_title if g_dirty.shape[1] == T else k_state
        assert torch.count_nonzero(g_dirty[pad_mask]) == 0, name


def test_full_distribution_padding_does_not_change_loss_or_grad():
    child = random_children(4)
    invalid = ~(child["child_mask"] & child["state_mask"][..., None])
    log_pi = child["log_pi"].clone().requires_grad_(True)
    dirty_pi = torch.where(invalid, float("nan"), child["log_pi"]).requires_grad_(True)
    dirty_r = torch.where(invalid, float("inf"), child["log_r"])
    loss = full_distribution_loss(log_pi, child["log_r"], child["child_mask"], child["state_mask"])
    loss_dirty = full_distribution_loss(dirty_pi, dirty_r, child["child_mask"], child["state_mask"])
    assert loss_dirty.item() == loss.item()
    (g,), (g_dirty,) = torch.autograd.grad(loss, [log_pi]), torch.autograd.grad(loss_dirty, [dirty_pi])
    torch.testing.assert_close(g_dirty, g, rtol=0, atol=0)
    assert torch.count_nonzero(g_dirty[invalid]) == 0


# --------------------------------------------------------------------------------------------------------------------
# TB with a known or learned log Z
# --------------------------------------------------------------------------------------------------------------------

# A hand-made prefix tree over tokens ⊤=0, A=1, B=2, C=3, D=4, E=5 (titles that end at a node are marked with ⊤):
#   titles and counts R: "A" 1, "A B" 3, "A C" 2, "D" 4, "D B E" 2 -> Z = 12
#   flows F: root 12 | A 6 | AB 3 | AC 2 | D 6 | DB 2 | DBE 2   (F(s) = Σ R of titles with prefix s)
TERM, V = 0, 6
TITLES = {(1,): 1, (1, 2): 3, (1, 3): 2, (4,): 4, (4, 2, 5): 2}
FLOWS = {(): 12, (1,): 6, (1, 2): 3, (1, 3): 2, (4,): 6, (4, 2): 2, (4, 2, 5): 2}
NODES = sorted(FLOWS, key=lambda p: (len(p), p))  # node index = position in this list


def tree_batch(term_targets="consistent"):
    """One trajectory per title with process rewards log F(s_{k+1})/F(s_k) and termination targets log ρ(s_k).

    "consistent": log ρ(s) = log R(s)/F(s) at every complete title s (also when it is a prefix of the sampled
    title) and −15 at other prefixes. "official": −15 at every k < t_b, log R/F(s_t) at k = t_b (reference §1.5).
    """
    titles = list(TITLES)
    B, T = len(titles), max(map(len, titles))
    title_ids = torch.full((B, T), -1)
    state_nodes = torch.zeros(B, T + 1, dtype=torch.long)
    log_reward = torch.zeros(B, T, dtype=F64)
    log_term_target = torch.full((B, T + 1), -15.0, dtype=F64)
    for b, y in enumerate(titles):
        for k in range(len(y) + 1):
            s = y[:k]
            state_nodes[b, k] = NODES.index(s)
            if k < len(y):
                title_ids[b, k] = y[k]
                log_reward[b, k] = math.log(FLOWS[y[: k + 1]] / FLOWS[s])
            if s in TITLES and (k == len(y) or term_targets == "consistent"):
                log_term_target[b, k] = math.log(TITLES[s] / FLOWS[s])
    lengths = torch.tensor([len(y) for y in titles])
    return title_ids, state_nodes, log_reward, log_term_target, lengths


def test_flower_tb_equals_generic_tb_with_known_log_z():
    """Process rewards telescope: Σ_k log r + log R/F(s_t) = log R − log Z, so flower TB = TB with log Z = log 12."""
    title_ids, _, log_reward, log_term_target, lengths = tree_batch("official")
    inputs = random_flow_inputs(lengths.tolist(), title_ids.shape[1], seed=1)
    inputs.update(log_reward=log_reward, log_term_target=log_term_target)
    mask = torch.arange(title_ids.shape[1])[None] < lengths[:, None]
    log_pf_sum = (inputs["log_pf"] * mask).sum(1) + inputs["log_pterm"].gather(1, lengths[:, None]).squeeze(1)
    log_r = torch.tensor([math.log(c) for c in TITLES.values()], dtype=F64)
    generic = trajectory_balance_loss(log_pf_sum, log_r, log_z=math.log(12))
    assert flower_tb_loss(**inputs).item() == pytest.approx(generic.item(), rel=1e-12)
    assert generic.item() > 0


@pytest.mark.parametrize("per_prompt", [False, True])
def test_trajectory_balance_learned_log_z_gradient(per_prompt):
    log_pf_sum = torch.tensor([-2.0, -5.0, -1.0, -3.5], dtype=F64)
    log_r = torch.tensor([0.0, 1.0, -1.0, 2.0], dtype=F64)
    log_z = torch.zeros(4 if per_prompt else (), dtype=F64, requires_grad=True)
    loss = trajectory_balance_loss(log_pf_sum, log_r, log_z)
    (g,) = torch.autograd.grad(loss, [log_z])
    res = log_pf_sum - log_r  # residual at log Z = 0
    torch.testing.assert_close(g, 2 * res / 4 if per_prompt else 2 * res.mean())
    # The optimum of a shared log Z is mean(log R − log P_F).
    best = (log_r - log_pf_sum).mean()
    assert (
        trajectory_balance_loss(log_pf_sum, log_r, best + 0.1).item()
        > trajectory_balance_loss(log_pf_sum, log_r, best).item()
    )


# --------------------------------------------------------------------------------------------------------------------
# A tabular policy trained with SubTB reaches the tree's flow ratios
# --------------------------------------------------------------------------------------------------------------------


def tree_targets():
    """[N, V] target policy: F(child)/F(node) for children, R(node)/F(node) for ⊤ at complete titles, else 0."""
    target = torch.zeros(len(NODES), V, dtype=F64)
    for n, node in enumerate(NODES):
        for p, flow in FLOWS.items():
            if len(p) == len(node) + 1 and p[:-1] == node:
                target[n, p[-1]] = flow / FLOWS[node]
        if node in TITLES:
            target[n, TERM] = TITLES[node] / FLOWS[node]
    return target


def train_tabular_policy(term_targets, trie_masked=True, steps=400):
    """Adam on flower_subtb_loss over one trajectory per title; returns (π [N, V], final loss).

    The policy is a table of logits, one row per node. `trie_masked` restricts each row to the tree's actions
    (children and ⊤), as a policy normalised over the constrained sampler's choices; otherwise it is a softmax
    over the whole vocabulary, as the LLM's `log_pf` / `log_pterm` are.
    """
    title_ids, state_nodes, log_reward, log_term_target, lengths = tree_batch(term_targets)
    allowed = tree_targets() > 0  # [N, V]
    allowed[:, TERM] = True  # ⊤ is an action everywhere (its target is e^-15 at non-titles)
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(len(NODES), V, dtype=F64))  # [N, V]
    opt = torch.optim.Adam([table], lr=0.1)

    def policy_logits():
        return torch.where(allowed, table, float("-inf")) if trie_masked else table  # [N, V]

    for _ in range(steps):
        log_pf, log_pterm = flow_log_probs(policy_logits()[state_nodes], title_ids, TERM)  # [B, T], [B, T+1]
        loss = flower_subtb_loss(log_pf, log_pterm, log_reward, log_term_target, lengths)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.softmax(policy_logits().detach(), dim=-1), loss.item()


def test_tabular_policy_learns_process_rewards():
    pi, loss = train_tabular_policy("consistent")
    assert loss < 1e-12
    target = tree_targets()
    edges = target > 0
    torch.testing.assert_close(pi[edges], target[edges], atol=1e-3, rtol=0)
    # Non-title prefixes terminate with probability ≈ e^-15 (their target).
    assert pi[NODES.index(()), TERM].item() < 1e-5 and pi[NODES.index((4, 2)), TERM].item() < 1e-5


def test_tabular_full_vocabulary_policy_reaches_zero_loss_without_the_flow_ratios():
    """SubTB with termination terms only sees log π of tree actions. Zero loss means, on every edge s → s',
    π(s'|s) = H(s')/H(s) with H(s) = F(s) ρ(s) / π(⊤|s); normalisation gives H(s) (1 − o(s)) = F(s) ρ(s) + Σ H(s'),
    where o(s) is the mass on tokens outside the tree. With a full-vocabulary softmax o(s) is free, so the loss
    reaches 0 with π(s'|s) ≠ F(s')/F(s); only o ≡ 0 (trie-masked above) pins the flow ratios."""
    pi, loss = train_tabular_policy("consistent", trie_masked=False)
    assert loss < 1e-8  # ~1e-12 here and still falling, while π stays away from the flow ratios
    target = tree_targets()
    edges = target > 0
    assert (pi[edges] - target[edges]).abs().max().item() > 1e-2
    leak = 1 - torch.where(edges | (torch.arange(V) == TERM), pi, 0.0).sum(-1)  # [N] mass outside the tree
    assert leak.max().item() > 1e-3


def test_tabular_policy_with_official_targets_cannot_fit_a_title_that_is_a_prefix():
    """The official −15 target at every k < t_b conflicts at "A" and "D" (titles that are also prefixes of longer
    titles): for "A", trajectory "A" wants log π(⊤|A) − log(1/6) equal to the root's term while "A B" wants
    log π(⊤|A) + 15 equal to it, an irreducible gap of 15 + log(1/6) ≈ 13.2 nats."""
    pi, loss = train_tabular_policy("official")
    assert loss > 1.0
    assert pi[NODES.index((1,)), TERM].item() < 0.01  # target 1/6: the prefix trajectories win
    # An edge away from the conflict is still learned: π(E | D B) = 1.
    assert pi[NODES.index((4, 2)), 5].item() == pytest.approx(1.0, abs=1e-3)


def tree_normalized_inputs(logits, title_ids, state_nodes, log_term_target):
    """(log_pf, log_pterm) of a full-vocabulary table policy, renormalised over the tree's children (⊤ at titles)."""
    children = (tree_targets() > 0)[state_nodes]  # [B, T+1, V]: the tree's actions at each state
    log_pf, log_pterm = flow_log_probs(logits, title_ids, TERM)
    log_mass = tree_log_mass(torch.log_softmax(logits, dim=-1), children)  # children given as masked full rows
    return tree_normalized_flow_log_probs(log_pf, log_pterm, log_term_target, log_mass, children[..., TERM])


def test_tabular_full_vocabulary_policy_on_tree_support_reaches_the_flow_ratios():
    """With π renormalised over the tree's children, zero SubTB pins π_tree(c|s) = F(c)/F(s) (what constrained
    decoding uses) although the full-vocabulary policy keeps mass off the tree, which the loss does not see."""
    title_ids, state_nodes, log_reward, log_term_target, lengths = tree_batch("consistent")
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(len(NODES), V, dtype=F64))  # [N, V], no mask
    opt = torch.optim.Adam([table], lr=0.1)
    for _ in range(400):
        log_pf, log_pterm = tree_normalized_inputs(table[state_nodes], title_ids, state_nodes, log_term_target)
        loss = flower_subtb_loss(log_pf, log_pterm, log_reward, log_term_target, lengths)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-10
    target = tree_targets()
    actions = target > 0
    pi_tree = torch.softmax(torch.where(actions, table.detach(), float("-inf")), dim=-1)
    torch.testing.assert_close(pi_tree[actions], target[actions], atol=1e-4, rtol=0)
    leak = 1 - torch.where(actions, torch.softmax(table.detach(), dim=-1), 0.0).sum(-1)
    assert leak[actions.any(-1)].min().item() > 1e-2  # off-tree mass stays where it was: the loss ignores it


def test_tree_support_ignores_off_tree_logits_and_non_title_termination():
    title_ids, state_nodes, log_reward, log_term_target, lengths = tree_batch("official")
    shape = (len(title_ids), title_ids.shape[1] + 1, V)
    logits = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    off_tree = ~(tree_targets() > 0)[state_nodes]  # [B, T+1, V]
    shifted = logits + 5.0 * off_tree * torch.rand(logits.shape, dtype=F64, generator=torch.Generator().manual_seed(4))
    a = flower_subtb_loss(
        *tree_normalized_inputs(logits, title_ids, state_nodes, log_term_target), log_reward, log_term_target, lengths
    )
    b = flower_subtb_loss(
        *tree_normalized_inputs(shifted, title_ids, state_nodes, log_term_target), log_reward, log_term_target, lengths
    )
    torch.testing.assert_close(a, b)  # moving mass among off-tree tokens (⊤ at non-titles included) changes nothing
    plain = [
        flower_subtb_loss(*flow_log_probs(x, title_ids, TERM), log_reward, log_term_target, lengths)
        for x in (logits, shifted)
    ]
    assert abs(plain[0].item() - plain[1].item()) > 1e-3  # the official full-vocabulary loss does see it
    _, log_pterm = tree_normalized_inputs(logits, title_ids, state_nodes, log_term_target)
    is_title = (tree_targets() > 0)[state_nodes][..., TERM]
    torch.testing.assert_close(log_pterm[~is_title], log_term_target[~is_title])  # g_k = 0 where ⊤ is not a child


def test_tree_log_mass_hand_value_and_padding_states():
    log_probs = torch.log(torch.tensor([[[0.1, 0.2, 0.3], [0.5, 0.25, 0.25]]], dtype=F64)).requires_grad_()
    mask = torch.tensor([[[True, False, True], [False, False, False]]])
    mass = tree_log_mass(log_probs, mask)
    torch.testing.assert_close(mass, torch.tensor([[math.log(0.4), 0.0]], dtype=F64))
    mass.sum().backward()  # a state without children has a finite (zero) gradient
    assert torch.isfinite(log_probs.grad).all()


# --------------------------------------------------------------------------------------------------------------------
# Helpers, SFT, mixing, validation, module hygiene
# --------------------------------------------------------------------------------------------------------------------


def test_flow_log_probs_matches_log_softmax_indexing():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=g, dtype=F64)
    title_ids = torch.tensor([[3, 1, 6], [2, -100, -100]])
    log_pf, log_pterm = flow_log_probs(logits, title_ids, terminator_id=5)
    ref = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(log_pterm, ref[..., 5])
    torch.testing.assert_close(log_pf[0], ref[0, torch.arange(3), title_ids[0]])
    assert log_pf[1, 0].item() == pytest.approx(ref[1, 0, 2].item())
    assert torch.isfinite(log_pf).all()  # negative padding ids give finite (masked later) values


def test_sft_loss_equals_transformers_model_loss(tiny_tokenizer):
    from trl_flower.tiny import build_model

    model = build_model(tiny_tokenizer)
    prompts = ["The user has enjoyed the following items before: Blue Train", "Recommend the next item."]
    targets = [" Kind of Blue\n", " Rumours.\n"]
    rows = [tiny_tokenizer(p)["input_ids"] + tiny_tokenizer(t)["input_ids"] for p, t in zip(prompts, targets)]
    n_prompt = [len(tiny_tokenizer(p)["input_ids"]) for p in prompts]
    L = max(map(len, rows))
    pad = tiny_tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows])  # left padding
    attention_mask = (input_ids != pad).long()
    labels = input_ids.clone()
    for b, r in enumerate(rows):
        labels[b, : L - len(r) + n_prompt[b]] = -100  # padding and prompt
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    ours = sft_loss(out.logits, labels)
    torch.testing.assert_close(ours, out.loss, rtol=1e-6, atol=1e-6)
    assert ours.item() > 0
    assert sft_loss(out.logits, torch.full_like(labels, -100)).item() == 0.0


def test_combine_losses_value_and_validation():
    assert combine_losses(torch.tensor(2.0), torch.tensor(10.0), lam=0.005).item() == pytest.approx(2.04)
    assert combine_losses(torch.tensor(2.0), torch.tensor(10.0), lam=0.0).item() == 2.0
    assert combine_losses(torch.tensor(2.0), torch.tensor(10.0), lam=1.0).item() == 10.0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="lam"):
            combine_losses(torch.tensor(2.0), torch.tensor(10.0), lam=bad)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(lengths=torch.tensor([1, 4])), r"\[0, T\]"),
        (dict(lengths=torch.tensor([1, -1])), r"\[0, T\]"),
        (dict(lengths=torch.tensor([1.0, 2.0])), "integer"),
        (dict(log_pterm=torch.zeros(2, 3)), "log_pterm"),
        (dict(log_reward=torch.zeros(2, 4)), "log_reward"),
        (dict(log_pf=torch.zeros(2, 3, 1)), "log_pf"),
    ],
)
def test_invalid_inputs_raise(change, match):
    inputs = random_flow_inputs([1, 3], T=3)
    inputs.update(change)
    for fn in (flower_subtb_loss, detailed_balance_loss, flower_tb_loss):
        with pytest.raises(ValueError, match=match):
            fn(**inputs)


def test_invalid_options_raise():
    inputs = random_flow_inputs([1, 3], T=3)
    with pytest.raises(ValueError, match="subtb_lambda"):
        flower_subtb_loss(**inputs, subtb_lambda=-0.5)
    with pytest.raises(ValueError, match="reduction"):
        flower_subtb_loss(**inputs, reduction="sum")
    with pytest.raises(ValueError, match="log_z"):
        trajectory_balance_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2))


def test_losses_module_imports_only_torch():
    tree = ast.parse(Path(losses_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "torch"}, imported


def test_docstring_examples_run():
    result = doctest.testmod(losses_module)
    assert result.attempted >= 5 and result.failed == 0


def test_docs_page_example_runs():
    page = Path(__file__).resolve().parents[1] / "docs" / "losses.md"
    result = doctest.testfile(str(page), module_relative=False)
    assert result.attempted >= 10 and result.failed == 0
