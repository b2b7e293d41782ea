"""Per-user flows (`trl_flower.user_flows`) and the distilled reward variant of `PrefixTreeRewardModel`.

Checked against plain float64 computations written here: log-space aggregation equals the plain sums (and does not
overflow), α = 1, β = 0 equals the `none` variant, process rewards along an item's path multiply to R_u(i)/Z_u,
flows are conserved at every node, top-n with n ≥ M equals the dense table and with n < M equals the dense table of
the floored preferences, and the top-n table's size does not grow with the catalogue.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trl_flower.rewards import PrefixTreeRewardModel
from trl_flower.tree import PrefixTree
from trl_flower.user_flows import (
    DistilledReward,
    TopNUserFlows,
    dense_user_flows,
    log_item_weights,
    top_n_preferences,
)

TERM = 2
# duplicates (items 0 and 3), a title that is a prefix of others ([5] of [5, 6] and [5, 6, 9]), a zero reward (item 5)
PATHS = [[5, 6, 2], [5, 2], [7, 2], [5, 6, 2], [7, 8, 9, 2], [5, 6, 9, 2], [7, 8, 2]]
R = np.array([3.0, 1.0, 4.0, 2.0, 5.0, 0.0, 1.0])
M = len(PATHS)
LOGITS = np.random.default_rng(0).normal(size=(4, M)) * 2.0  # four training rows


@pytest.fixture
def tree() -> PrefixTree:
    return PrefixTree.from_token_paths(PATHS, TERM, item_rewards=R)


def plain_user_rewards(alpha: float, beta: float, tau: float, eps: float = 0.0, logits=LOGITS) -> np.ndarray:
    """R_u(i) = (R(i) + ε)^α · softmax(logits_u / τ)_i^β in plain float64 (numpy's 0^0 = 1)."""
    z = logits / tau
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return (R + eps)[None, :] ** alpha * p**beta  # [B, M]


def all_paths_batch() -> torch.Tensor:
    L = max(map(len, PATHS))
    return torch.tensor([p + [0] * (L - len(p)) for p in PATHS])  # [M, L] right-padded


# ---------------------------------------------------------------------------------------------- tree, log space


def test_log_aggregate_equals_plain_sums_and_does_not_overflow(tree):
    values = np.random.default_rng(1).exponential(size=(3, M)) * (np.arange(M) % 3 > 0)  # zeros included
    plain = tree.aggregate_to_nodes(values)  # [3, N]
    with np.errstate(divide="ignore"):
        logged = tree.log_aggregate_to_nodes(np.log(values))
    np.testing.assert_allclose(np.exp(logged), plain, rtol=1e-12, atol=0)
    assert np.isneginf(logged[plain == 0]).all()
    one = tree.log_aggregate_to_nodes(torch.as_tensor(np.log(R + 1)))  # 1-D torch in, 1-D torch out
    assert isinstance(one, torch.Tensor) and one.shape == (tree.num_nodes,)
    big = tree.with_rewards(np.full(M, 1e308))
    assert np.isfinite(big.log_flow).all()
    assert big.log_flow[0] == pytest.approx(np.log(M) + np.log(1e308))
    # control: the plain sum of the same rewards does overflow
    with np.errstate(over="ignore"):
        assert np.isinf(big.aggregate_to_nodes(big.item_rewards)[0])


def test_huge_rewards_keep_their_process_rewards(tree):
    """Rewards of 1e308 used to overflow the root flow to inf, making every ratio 0 and every target −15."""
    rm = PrefixTreeRewardModel(tree, item_rewards=R * 1e307 + 1e306)
    small = PrefixTreeRewardModel(tree, item_rewards=R * 10 + 1)  # the same ratios at a normal scale
    a, b = rm.token_targets(all_paths_batch()), small.token_targets(all_paths_batch())
    assert a.valid.all()
    torch.testing.assert_close(a.log_reward, b.log_reward)
    torch.testing.assert_close(a.log_term_target, b.log_term_target)


# ---------------------------------------------------------------------------------------------- distilled variant


def distill_model(tree, alpha=1.0, beta=1.0, tau=1.0, eps=0.0, top_n=0, **kw) -> PrefixTreeRewardModel:
    spec = DistilledReward(alpha=alpha, beta=beta, temperature=tau, epsilon=eps, top_n=top_n)
    return PrefixTreeRewardModel(tree, variant="distill", preference_scores=LOGITS, distill=spec, **kw)


@pytest.mark.parametrize("title_log_term", ["official", "flow"])
def test_alpha_one_beta_zero_equals_none(tree, title_log_term):
    ids = torch.cat([all_paths_batch(), torch.tensor([[5, 9, 2, 0], [7, 8, 0, 0]])])  # + two invalid rows
    rows = torch.arange(ids.shape[0]) % LOGITS.shape[0]
    none = PrefixTreeRewardModel(tree, title_log_term=title_log_term)
    for top_n in (0, 3):  # dense, and top-n (β = 0: the floor changes nothing)
        distill = distill_model(tree, alpha=1.0, beta=0.0, top_n=top_n, title_log_term=title_log_term)
        a, b = none.token_targets(ids), distill.token_targets(ids, rows)
        for field in ("log_reward", "log_term_target", "valid", "lengths", "nodes", "item_ids"):
            torch.testing.assert_close(getattr(b, field), getattr(a, field), msg=field)
        ca = none.child_targets(a.nodes)
        cb = distill.child_targets(b.nodes, rows)
        for x, y in zip(cb, ca):
            torch.testing.assert_close(x, y)


@pytest.mark.parametrize("alpha,beta,tau,eps", [(0.0, 1.0, 1.0, 0.0), (0.5, 2.0, 0.7, 0.0), (1.0, 1.0, 2.0, 0.5)])
def test_path_process_rewards_multiply_to_user_share(tree, alpha, beta, tau, eps):
    """Σ_k ℓ_k + term = log R_u(y)/Z_u: sampling with the process rewards draws title y with probability R_u(y)/Z_u."""
    rm = distill_model(tree, alpha, beta, tau, eps)
    ru = plain_user_rewards(alpha, beta, tau, eps)  # [B, M]
    ids = all_paths_batch()
    for u in range(LOGITS.shape[0]):
        t = rm.token_targets(ids, torch.full((M,), u))
        log_share = t.log_reward.sum(1) + t.log_term_target.gather(1, t.lengths.unsqueeze(1)).squeeze(1)  # [M]
        # a title's reward sums its duplicate items (items 0 and 3 share [5, 6])
        title_reward = np.array([ru[u, [j for j in range(M) if PATHS[j] == PATHS[i]]].sum() for i in range(M)])
        with np.errstate(divide="ignore"):
            expected = np.log(title_reward / ru[u].sum())
        finite = title_reward > 0
        np.testing.assert_allclose(log_share.numpy()[finite], expected[finite], rtol=1e-10)
        assert not t.valid.numpy()[~finite].any()  # zero-reward titles (R = 0 with α > 0, ε = 0) are not targets


def test_user_flows_are_conserved(tree):
    rows = torch.arange(LOGITS.shape[0])
    for top_n in (0, 2):
        rm = distill_model(tree, alpha=0.5, beta=1.5, tau=0.8, top_n=top_n)
        flows = rm.distilled_flows(rows)
        nodes = torch.arange(tree.num_nodes).expand(len(rows), -1)  # [B, N]
        F = flows.log_flows(nodes).exp().numpy()  # [B, N]
        parent = tree.parent
        child_sum = np.zeros_like(F)
        np.add.at(child_sum, (slice(None), parent[1:]), F[:, 1:])
        inner = tree.num_children > 0
        np.testing.assert_allclose(child_sum[:, inner], F[:, inner], rtol=1e-12)


def test_top_n_covering_the_catalogue_equals_dense(tree):
    rows = torch.arange(LOGITS.shape[0])
    dense = distill_model(tree, alpha=0.5, beta=2.0, tau=0.5).distilled_flows(rows)
    for n in (M, M + 5):
        top = distill_model(tree, alpha=0.5, beta=2.0, tau=0.5, top_n=n).distilled_flows(rows)
        assert isinstance(top, TopNUserFlows)
        nodes = torch.arange(-1, tree.num_nodes).expand(len(rows), -1)  # node -1 included
        torch.testing.assert_close(top.log_flows(nodes), dense.log_flows(nodes), rtol=1e-12, atol=1e-12)


def test_top_n_equals_dense_flows_of_the_floored_preferences(tree):
    alpha, beta, tau, n = 1.0, 1.5, 1.3, 3
    z = LOGITS / tau
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    floored = np.empty_like(p)
    for u in range(p.shape[0]):  # plain: keep the n largest, give the rest their mean
        top = np.argsort(-p[u])[:n]
        rest = np.setdiff1d(np.arange(M), top)
        floored[u] = p[u]
        floored[u, rest] = p[u, rest].sum() / len(rest)
    with np.errstate(divide="ignore"):
        expected = tree.log_aggregate_to_nodes(np.log(R)[None] * alpha + beta * np.log(floored))  # [B, N]
    rm = distill_model(tree, alpha, beta, tau, top_n=n)
    flows = rm.distilled_flows(torch.arange(p.shape[0]))
    got = flows.log_flows(torch.arange(tree.num_nodes).expand(p.shape[0], -1)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # control: the floor changes the flows (the test would pass vacuously if top-n were dense)
    dense = distill_model(tree, alpha, beta, tau).distilled_flows(torch.arange(p.shape[0]))
    assert not np.allclose(dense.table.numpy(), expected)


def test_top_n_memory_does_not_grow_with_the_catalogue():
    """The per-row part of top-n flows lives on the ancestors of the kept items: ≤ B · n · (depth + 1) entries,
    whatever the number of items or nodes (the dense table would be B · num_nodes)."""
    rng = np.random.default_rng(2)
    B, n = 8, 5
    for num_items in (200, 5000):
        paths = [list(rng.integers(3, 40, size=rng.integers(1, 6))) + [TERM] for _ in range(num_items)]
        tree = PrefixTree.from_token_paths(paths, TERM, item_rewards=rng.integers(1, 50, size=num_items))
        logits = rng.normal(size=(B, num_items))
        rm = PrefixTreeRewardModel(tree, variant="distill", preference_scores=logits, distill=DistilledReward(top_n=n))
        flows = rm.distilled_flows(torch.arange(B))
        bound = B * n * (int(tree.depth.max()) + 1)
        assert max(flows.keys.numel(), flows.log_corrections.numel()) <= bound
        assert flows.base_log_flows.shape == (tree.num_nodes,)  # shared by all rows, computed once per model
    assert B * tree.num_nodes > 10 * bound  # the large catalogue: the dense table would be far bigger


def test_top_n_preferences_floor_keeps_the_mass():
    items, log_p, log_floor = top_n_preferences(LOGITS, temperature=1.0, n=2, chunk_rows=3)  # chunks of 3 and 1
    p = np.exp(LOGITS) / np.exp(LOGITS).sum(1, keepdims=True)
    np.testing.assert_array_equal(items.numpy(), np.argsort(-p, axis=1)[:, :2])
    total = np.exp(log_p.numpy()).sum(1) + np.exp(log_floor.numpy()) * (M - 2)
    np.testing.assert_allclose(total, 1.0, rtol=1e-12)
    _, _, none_left = top_n_preferences(LOGITS, temperature=1.0, n=M)
    assert torch.isneginf(none_left).all()


def test_log_item_weights_zero_power_is_one():
    w = log_item_weights(np.array([0.0, 2.0]), alpha=0.0)
    assert w.tolist() == [0.0, 0.0]
    assert log_item_weights(np.array([0.0, 2.0]), alpha=2.0).exp().tolist() == pytest.approx([0.0, 4.0])


def test_dense_user_flows_matches_plain(tree):
    ru = plain_user_rewards(0.3, 1.0, 1.0)
    with np.errstate(divide="ignore"):
        flows = dense_user_flows(tree, torch.as_tensor(np.log(ru)))
    np.testing.assert_allclose(flows.table.exp().numpy(), tree.aggregate_to_nodes(ru), rtol=1e-12)


def test_trl_protocol_of_the_distilled_variant(tree):
    rm = distill_model(tree, alpha=0.5, beta=1.0, tau=1.0)
    completions = [[5, 6, 2], [7, 2], [6, 2]]  # a title, a title, not a title
    out = rm(["p"] * 3, [""] * 3, completion_ids=completions, row_index=[1, 2, 0])
    ru = plain_user_rewards(0.5, 1.0, 1.0)
    assert out[0] == pytest.approx(np.log((ru[1, 0] + ru[1, 3]) / ru[1].sum()))
    assert out[1] == pytest.approx(np.log(ru[2, 2] / ru[2].sum()))
    assert out[2] == 0.0  # not a title: the model's invalid_reward
    raw = PrefixTreeRewardModel(
        tree, variant="distill", preference_scores=LOGITS, sequence_reward="raw", distill=DistilledReward(alpha=0.5)
    )
    assert raw(["p"], [""], completion_ids=[[7, 2]], row_index=[2])[0] == pytest.approx(ru[2, 2])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(variant="exact", distill=DistilledReward()), "only apply to variant='distill'"),
        (dict(variant="distill", sequence_reward="minmax"), "log_share"),
        (dict(variant="distill", score_normalization="mid"), "softmax"),
    ],
)
def test_distill_option_errors(tree, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrefixTreeRewardModel(tree, preference_scores=LOGITS, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(alpha=-1.0), "alpha must be"),
        (dict(beta=float("inf")), "beta must be"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_n=-1), "top_n"),
    ],
)
def test_distilled_reward_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistilledReward(**kwargs)
