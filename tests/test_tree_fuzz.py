"""Seeded fuzz test of `PrefixTree` and `PrefixTreeRewardModel` on random catalogues (issue 22).

Each seed draws a catalogue of random titles (ASCII, accents, CJK, emoji and spaces, tokenised byte-level by the
tiny BPE of conftest.py), with titles that are prefixes of others and exact duplicates, and random item rewards
spanning six orders of magnitude with about a third of them zero. On every catalogue the invariants of the flows hold:

* conservation: F(s) = Σ_children F(c) at every inner node, F(terminal) = Σ R(i) of the items ending there (duplicates
  merge), F(root) = Z = Σ_i R(i), and the log-space flows equal a plain float64 sum;
* the process rewards r(a|s) = F(s·a)/F(s) sum to 1 over the children of every node with positive flow;
* sampling with them draws R/Z: along every item path Σ_k ℓ_k + term = log R(y)/Z exactly (the reward model's
  targets), zero-reward items are unreachable, and ancestral sampling with the process rewards gives empirical
  frequencies within 5 standard errors of R/Z.

A plain seeded loop instead of hypothesis (not a dependency): 25 catalogues, a few seconds in all.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trl_flower.rewards import PrefixTreeRewardModel
from trl_flower.tree import PrefixTree

ALPHABET = list("abcxyz   -'.") + ["é", "ß", "Ω", "中", "文", "😀", "ñ"]
SEEDS = range(25)
SAMPLED_SEEDS = (0, 1, 2)  # the Monte-Carlo check runs on a few catalogues (it is the slowest part)


def random_catalogue(rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """Titles with prefixes and duplicates, and rewards with zeros (at least one positive)."""
    titles: list[str] = []
    for _ in range(int(rng.integers(4, 16))):
        kind = rng.random()
        if titles and kind < 0.2:
            titles.append(titles[int(rng.integers(len(titles)))])  # a duplicate title
        elif titles and kind < 0.4:
            base = titles[int(rng.integers(len(titles)))]
            cut = base[: int(rng.integers(1, len(base) + 1))]
            titles.append(cut if cut.strip() else base)  # a prefix of another title
        else:
            title = "".join(rng.choice(ALPHABET, size=int(rng.integers(1, 9))))
            titles.append(title if title.strip() else "q" + title)
    rewards = np.where(rng.random(len(titles)) < 0.35, 0.0, 10.0 ** rng.uniform(-3, 3, len(titles)))
    if not (rewards > 0).any():
        rewards[int(rng.integers(len(titles)))] = 1.0
    return titles, rewards


@pytest.fixture(scope="module")
def catalogues(tiny_tokenizer):
    out = []
    for seed in SEEDS:
        titles, rewards = random_catalogue(np.random.default_rng(seed))
        out.append((seed, titles, rewards, PrefixTree.from_titles(titles, tiny_tokenizer, item_rewards=rewards)))
    return out


def test_catalogues_have_the_awkward_cases(catalogues):
    """The generator does produce duplicates, prefix titles, non-ASCII titles and zero rewards."""
    duplicates = sum(len(set(t)) < len(t) for _, t, _, _ in catalogues)
    prefixes = sum(any(a != b and b.startswith(a) for a in t for b in t) for _, t, _, _ in catalogues)
    unicode_titles = sum(any(not s.isascii() for s in t) for _, t, _, _ in catalogues)
    zeros = sum(bool((r == 0).any()) for _, _, r, _ in catalogues)
    assert min(duplicates, prefixes, unicode_titles, zeros) >= 5, (duplicates, prefixes, unicode_titles, zeros)


def test_flows_are_conserved(catalogues):
    for seed, titles, rewards, tree in catalogues:
        flow = np.exp(tree.log_flow)  # [N]
        assert np.isclose(flow[0], rewards.sum(), rtol=1e-12), seed
        below = np.zeros(tree.num_nodes)
        np.add.at(below, tree.parent[1:], flow[1:])  # Σ over children (termination included)
        inner = tree.num_children > 0
        np.testing.assert_allclose(flow[inner], below[inner], rtol=1e-12, err_msg=f"seed {seed}")
        ending = np.zeros(tree.num_nodes)
        np.add.at(ending, tree.item_node, rewards)  # duplicate titles merge into one terminal node
        np.testing.assert_allclose(flow[tree.is_terminal], ending[tree.is_terminal], rtol=1e-12)
        np.testing.assert_allclose(flow, tree.aggregate_to_nodes(rewards), rtol=1e-12, atol=0)
        assert tree.is_terminal.sum() == len({tuple(p) for p in tree_paths(tree)}), seed


def test_process_rewards_sum_to_one_at_every_node(catalogues):
    for seed, _, _, tree in catalogues:
        nodes = torch.from_numpy(np.flatnonzero((tree.num_children > 0) & np.isfinite(tree.log_flow)))  # [R]
        tokens, _, mask = tree.children(nodes)  # [R, K]
        log_r = tree.log_process_reward(nodes.unsqueeze(1).expand_as(tokens), tokens)  # [R, K]
        total = torch.logsumexp(torch.where(mask, log_r, float("-inf")), dim=1).exp()  # [R]
        torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12, msg=f"seed {seed}")
        zero_flow = torch.from_numpy(np.flatnonzero(~np.isfinite(tree.log_flow)))
        if zero_flow.numel():  # below a zero-flow node there is no distribution: -inf, never NaN
            tok, _, child_mask = tree.children(zero_flow)
            lr = tree.log_process_reward(zero_flow.unsqueeze(1).expand_as(tok), tok)
            assert torch.isneginf(lr[child_mask]).all(), seed


def test_reward_model_targets_multiply_to_r_over_z(catalogues):
    """Σ_k ℓ_k + term = log R(y)/Z on every item path: the process rewards sample item y with probability R(y)/Z."""
    for seed, _, rewards, tree in catalogues:
        paths, _ = tree.item_paths(torch.arange(tree.num_items), pad_id=tree.terminator_id)  # [M, L]
        targets = PrefixTreeRewardModel(tree).token_targets(paths)
        at_node = np.zeros(tree.num_nodes)
        np.add.at(at_node, tree.item_node, rewards)
        title_reward = at_node[tree.item_node]  # [M] R of the title: duplicates share their terminal node's reward
        positive = title_reward > 0  # a zero-reward duplicate of a rewarded title is still reachable
        assert torch.equal(targets.valid, torch.from_numpy(positive)) and bool(targets.complete.all()), seed
        expected = np.log(title_reward[positive] / rewards.sum())
        log_p = targets.log_reward.sum(1) + targets.log_term_target.gather(1, targets.lengths.unsqueeze(1)).squeeze(1)
        np.testing.assert_allclose(log_p.numpy()[positive], expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", SAMPLED_SEEDS)
def test_ancestral_sampling_with_the_process_rewards_draws_r_over_z(catalogues, seed):
    _, _, rewards, tree = catalogues[seed]
    n = 20_000
    generator = torch.Generator().manual_seed(seed)
    every = torch.arange(tree.num_nodes)
    tokens, children, mask = tree.children(every)  # [N, K] the children of every node, looked up once
    log_r = tree.log_process_reward(every.unsqueeze(1).expand_as(tokens), tokens)  # [N, K]
    probs = torch.where(mask, log_r, float("-inf")).exp()  # [N, K] r(a|s), 0 off the tree and below zero flow
    node = torch.zeros(n, dtype=torch.long)  # [n] all at the root
    for _ in range(int(tree.depth.max())):
        active = ~torch.from_numpy(tree.is_terminal)[node]  # [n]
        if not bool(active.any()):
            break
        pick = torch.multinomial(probs[node[active]], 1, generator=generator).squeeze(1)  # [A]
        node[active] = children[node[active], pick]
    assert bool(torch.from_numpy(tree.is_terminal)[node].all())
    counts = np.bincount(node.numpy(), minlength=tree.num_nodes)[tree.is_terminal]  # per terminal node
    mass = np.zeros(tree.num_nodes)
    np.add.at(mass, tree.item_node, rewards)
    p = mass[tree.is_terminal] / rewards.sum()
    assert (counts[p == 0] == 0).all()  # zero-reward titles are never drawn
    stderr = np.sqrt(p * (1 - p) / n)
    assert (np.abs(counts / n - p) <= 5 * stderr + 1e-4).all(), (counts / n, p)


def tree_paths(tree: PrefixTree) -> list[list[int]]:
    paths, lengths = tree.item_paths(torch.arange(tree.num_items))
    return [p[:k] for p, k in zip(paths.tolist(), lengths.tolist())]
