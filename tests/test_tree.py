"""Tests of `trl_flower.tree.PrefixTree`: structure, flows (Eq. 8), batched queries, persistence, errors.

Every query is checked against a brute-force dict trie built in plain Python from the same token paths, and the
process rewards are checked statistically: sampling token by token with r(a|s) = F(s·a)/F(s) as the policy must
reproduce item frequencies proportional to R (Eq. 3).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from trl_flower.tree import PrefixTree, title_token_paths

TERM = 2  # terminator of the synthetic trees


# ---------------------------------------------------------------------- helpers


def random_paths(rng: np.random.Generator, num_items: int, vocab: int = 6, max_len: int = 5) -> list[list[int]]:
    """Random token paths over a tiny vocabulary (many shared prefixes), ending in TERM.

    A quarter of the items are made strict prefixes of another item, so some titles end *and* continue, and a few
    paths are repeated (duplicate titles).
    """
    tokens = [t for t in range(vocab) if t != TERM]
    paths = []
    for _ in range(num_items):
        n = int(rng.integers(1, max_len + 1))
        paths.append([int(t) for t in rng.choice(tokens, size=n)])
    for i in range(0, num_items // 4):  # item i becomes a prefix of a later item
        j = int(rng.integers(num_items // 4, num_items))
        if len(paths[j]) > 1:
            paths[i] = paths[j][: int(rng.integers(1, len(paths[j])))]
    paths[-1] = list(paths[-2])  # a duplicate
    return [p + [TERM] for p in paths]


def brute_force(paths: list[list[int]], rewards: np.ndarray):
    """Dict trie: prefix tuple -> set of child tokens, and prefix tuple -> flow."""
    children: dict[tuple, set] = defaultdict(set)
    flow: dict[tuple, float] = defaultdict(float)
    for path, r in zip(paths, rewards):
        for k in range(len(path) + 1):
            flow[tuple(path[:k])] += r
            if k < len(path):
                children[tuple(path[:k])].add(path[k])
    return children, flow


def node_prefixes(tree: PrefixTree) -> list[tuple]:
    """Token prefix of every node, reconstructed by climbing the parent array (plain Python)."""
    prefixes = []
    for n in range(tree.num_nodes):
        toks = []
        while n > 0:
            toks.append(int(tree.token[n]))
            n = int(tree.parent[n])
        prefixes.append(tuple(reversed(toks)))
    return prefixes


@pytest.fixture(params=[0, 1, 2])
def random_tree(request):
    rng = np.random.default_rng(request.param)
    paths = random_paths(rng, 60)
    rewards = rng.integers(0, 5, size=len(paths)).astype(float)  # includes zero rewards
    rewards[0] = 3.0  # a prefix item with positive reward
    return paths, rewards, PrefixTree.from_token_paths(paths, TERM, item_rewards=rewards)


# ---------------------------------------------------------------------- structure and flows


def test_structure_matches_brute_force(random_tree):
    paths, rewards, tree = random_tree
    children, flow = brute_force(paths, rewards)
    prefixes = node_prefixes(tree)
    assert set(prefixes) == set(flow)  # one node per distinct prefix, no more
    assert len(prefixes) == len(set(prefixes)) == tree.num_nodes
    assert np.all(tree.parent[1:] < np.arange(1, tree.num_nodes))
    for n, pre in enumerate(prefixes):
        assert tree.num_children[n] == len(children.get(pre, ()))
        assert tree.depth[n] == len(pre)
    for i, path in enumerate(paths):
        assert prefixes[tree.item_node[i]] == tuple(path)
        assert tree.item_length[i] == len(path)
    # some titles end and continue (a node with ⊤ and another child)
    ends_and_continues = [pre for pre, ch in children.items() if TERM in ch and len(ch) > 1]
    assert ends_and_continues


def test_flow_conservation_at_every_node(random_tree):
    paths, rewards, tree = random_tree
    F = np.exp(tree.log_flow)  # [N]
    child_sum = np.zeros(tree.num_nodes)
    np.add.at(child_sum, tree.parent[1:], F[1:])
    inner = tree.num_children > 0
    np.testing.assert_allclose(F[inner], child_sum[inner], rtol=1e-12)  # F(n) = Σ_children F(c)
    assert F[0] == pytest.approx(rewards.sum(), rel=1e-12)  # F(root) = Z
    # terminal flow = sum of the rewards of the items ending there (duplicates merge)
    for node in np.flatnonzero(tree.is_terminal):
        assert F[node] == pytest.approx(rewards[tree.items_of_node(node)].sum(), abs=1e-12)
    # and against the brute-force prefix sums
    _, flow = brute_force(paths, rewards)
    expected = np.array([flow[pre] for pre in node_prefixes(tree)])
    np.testing.assert_allclose(F, expected, rtol=1e-12)


def test_process_rewards_sum_to_one(random_tree):
    _, _, tree = random_tree
    nodes = torch.arange(tree.num_nodes)
    tok, _, mask = tree.children(nodes)
    log_r = tree.log_process_reward(nodes.unsqueeze(1).expand_as(tok).clone(), tok)  # [N, K]
    total = torch.where(mask, log_r.exp(), 0.0).sum(1)  # [N]
    positive = torch.as_tensor(np.isfinite(tree.log_flow) & (tree.num_children > 0))
    torch.testing.assert_close(total[positive], torch.ones(int(positive.sum()), dtype=torch.float64))
    assert torch.all(total[~positive] == 0)  # leaves and zero-flow nodes: no distribution, no NaN
    assert not torch.isnan(log_r).any()


# ---------------------------------------------------------------------- the titles fixture


def test_titles_fixture_cases(tiny_titles, tiny_tokenizer):
    rewards = np.arange(1, len(tiny_titles) + 1, dtype=float)
    tree = PrefixTree.from_titles(tiny_titles, tiny_tokenizer, item_rewards=rewards)
    eos = tiny_tokenizer.eos_token_id
    assert tree.terminator_id == eos
    enc = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in tiny_titles]

    # prefix title: "Back to Life" (0) ends where "Back to Life Again" (1) continues
    node = tree.walk(torch.tensor([enc[0][:-1]]))[0, -1]
    assert set(tree.allowed_tokens(node.view(1))[0]) == {eos, enc[1][len(enc[0]) - 1]}
    assert tree.item_node[0] != tree.item_node[1]
    assert math.exp(tree.log_flow[node]) == pytest.approx(rewards[0] + rewards[1])

    # duplicate "Blue Train" (3, 4): one terminal node, both ids kept, flows add up
    assert tree.item_node[3] == tree.item_node[4]
    np.testing.assert_array_equal(tree.items_of_node(int(tree.item_node[3])), [3, 4])
    assert int(tree.terminal_item(torch.tensor([int(tree.item_node[4])]))) == 3
    assert math.exp(tree.log_flow[tree.item_node[3]]) == pytest.approx(rewards[3] + rewards[4])
    assert int(tree.is_terminal.sum()) == len(tiny_titles) - 1

    # punctuation endings keep their own token before the terminator and round-trip
    paths, lengths = tree.item_paths(torch.arange(len(tiny_titles)))
    for i, title in enumerate(tiny_titles):
        assert paths[i, : lengths[i]].tolist() == enc[i]
        assert tiny_tokenizer.decode(paths[i, : lengths[i] - 1].tolist()) == title
    assert tiny_tokenizer.decode(enc[7][-2:-1]) == "."  # "Rumours." ends on "." then ⊤


def test_from_titles_equals_token_paths(tiny_titles, tiny_tokenizer):
    flat, offsets, term = title_token_paths(tiny_titles, tiny_tokenizer, batch_size=3)  # several batches
    enc = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] + [term] for t in tiny_titles]
    assert flat.tolist() == [t for p in enc for t in p]
    a = PrefixTree.from_titles(tiny_titles, tiny_tokenizer)
    b = PrefixTree.from_token_paths(enc, term)
    c = PrefixTree.from_flat(flat, offsets, term)
    for other in (b, c):
        for name in ("parent", "token", "depth", "first_child", "num_children", "item_node", "log_flow"):
            np.testing.assert_array_equal(getattr(a, name), getattr(other, name))


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", ["", "   ", "\t\n"])
def test_empty_title_error_names_the_item(tiny_tokenizer, bad):
    with pytest.raises(ValueError, match=r"item 2 .*empty or whitespace"):
        PrefixTree.from_titles(["Blue Train", "Kind of Blue", bad], tiny_tokenizer)


def test_tokenizer_and_terminator_errors(tiny_tokenizer):
    class NoEos:
        eos_token_id = None

        def __len__(self):
            return 10

    with pytest.raises(ValueError, match="no eos_token_id"):
        PrefixTree.from_titles(["a"], NoEos())
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        PrefixTree.from_titles(["Blue Train"], tiny_tokenizer, terminator_id=len(tiny_tokenizer))
    # a terminator that the title itself tokenises to: "." inside "Rumours."
    dot = tiny_tokenizer("Rumours.", add_special_tokens=False)["input_ids"][-1]
    with pytest.raises(ValueError, match=r"item 1 \('Rumours\.'\) contains the terminator"):
        PrefixTree.from_titles(["Blue Train", "Rumours."], tiny_tokenizer, terminator_id=dot)


def test_path_errors():
    with pytest.raises(ValueError, match=r"item 1 \('b'\) contains the terminator 2 before its end"):
        PrefixTree.from_token_paths([[5, 2], [5, 2, 6, 2]], TERM, item_names=["a", "b"])
    with pytest.raises(ValueError, match="item 1 does not end with the terminator 2"):
        PrefixTree.from_token_paths([[5, 2], [5, 6]], TERM)
    with pytest.raises(ValueError, match="item 0 does not end"):
        PrefixTree.from_token_paths([[5]], TERM)
    with pytest.raises(ValueError, match="item 1 has an empty token path"):
        PrefixTree.from_token_paths([[5, 2], [2]], TERM)
    with pytest.raises(ValueError, match="item 0 has an empty token path"):
        PrefixTree.from_token_paths([[], [5, 2]], TERM)
    with pytest.raises(ValueError, match="zero items"):
        PrefixTree.from_token_paths([], TERM)
    with pytest.raises(ValueError, match="item 1 has -1.0"):
        PrefixTree.from_token_paths([[5, 2], [6, 2]], TERM, item_rewards=[1.0, -1.0])
    with pytest.raises(ValueError, match="one value per item"):
        PrefixTree.from_token_paths([[5, 2], [6, 2]], TERM, item_rewards=[1.0])


# ---------------------------------------------------------------------- zero rewards


def test_zero_reward_items():
    paths = [[5, 6, 2], [5, 2], [7, 2], [7, 8, 2]]
    tree = PrefixTree.from_token_paths(paths, TERM, item_rewards=[3, 0, 0, 0])
    n5, n7 = tree.advance(torch.tensor([0, 0]), torch.tensor([5, 7])).tolist()
    # item 1 has R = 0: its terminal has −inf flow; the whole 7-branch has zero flow
    assert tree.log_flow[tree.item_node[1]] == -np.inf
    assert tree.log_flow[n7] == -np.inf and np.isfinite(tree.log_flow[n5])
    full = tree.allowed_mask(torch.tensor([0, n5]), vocab_size=10)
    pos = tree.allowed_mask(torch.tensor([0, n5]), vocab_size=10, positive_flow_only=True)
    assert full[0].nonzero().flatten().tolist() == [5, 7] and pos[0].nonzero().flatten().tolist() == [5]
    assert full[1].nonzero().flatten().tolist() == [2, 6] and pos[1].nonzero().flatten().tolist() == [6]
    log_r = tree.log_process_reward(torch.tensor([n5, n5, n7]), torch.tensor([6, TERM, 8]))
    assert log_r.tolist() == [0.0, -math.inf, -math.inf]  # below a zero-flow node: −inf, not NaN

    smooth = tree.with_rewards(np.array([3, 0, 0, 0]) + 0.5)
    assert smooth.parent is tree.parent and smooth.first_child is tree.first_child  # structure shared
    assert np.isfinite(smooth.log_flow).all()
    assert tree.log_flow[n7] == -np.inf  # the original is untouched
    assert smooth.log_flows(torch.tensor([0])).item() == pytest.approx(math.log(5.0))
    assert tree.log_flows(torch.tensor([0])).item() == pytest.approx(math.log(3.0))  # separate device caches


# ---------------------------------------------------------------------- batched queries vs brute force


def test_queries_against_dict_trie(random_tree):
    paths, rewards, tree = random_tree
    children, flow = brute_force(paths, rewards)
    rng = np.random.default_rng(7)
    V = 8
    # random token rows: half are prefixes of real paths with random continuations, half fully random
    rows = []
    for r in range(80):
        if r % 2 == 0:
            p = paths[int(rng.integers(len(paths)))]
            row = p[: int(rng.integers(0, len(p) + 1))]
        else:
            row = []
        row = row + [int(t) for t in rng.integers(0, V, size=6 - len(row))] if len(row) < 6 else row[:6]
        rows.append(row)
    tokens = torch.tensor(rows)  # [R, 6]
    walked = tree.walk(tokens)  # [R, 7]
    prefixes = node_prefixes(tree)
    for r, row in enumerate(rows):
        for k in range(len(row) + 1):
            pre = tuple(row[:k])
            node = int(walked[r, k])
            if pre in flow:  # the set of all prefixes of all paths
                assert node >= 0 and prefixes[node] == pre
            else:
                assert node == -1
    # advance, one step, batched over every (node, token) pair
    nodes = torch.arange(tree.num_nodes).repeat_interleave(V)  # [N*V]
    toks = torch.arange(V).repeat(tree.num_nodes)  # [N*V]
    nxt = tree.advance(nodes, toks)
    for n, t, c in zip(nodes.tolist(), toks.tolist(), nxt.tolist()):
        ok = t in children.get(prefixes[n], ())
        assert (c >= 0) == ok and (not ok or prefixes[c] == prefixes[n] + (t,))
    assert tree.advance(torch.tensor([-1, 0, 0]), torch.tensor([5, -1, 10**6])).tolist() == [-1, -1, -1]
    # children, allowed_tokens and allowed_mask of every node (plus the padding id -1)
    query = torch.cat([torch.arange(tree.num_nodes), torch.tensor([-1])])
    tok, child, mask = tree.children(query)
    allowed = tree.allowed_mask(query, vocab_size=V)  # [N+1, V]
    for n in range(tree.num_nodes + 1):
        expected = sorted(children.get(prefixes[n], ())) if n < tree.num_nodes else []
        assert tok[n][mask[n]].tolist() == expected  # sorted by token
        assert tree.allowed_tokens(query[n : n + 1]) == [expected]
        assert allowed[n].nonzero().flatten().tolist() == expected
        assert all(prefixes[c] == prefixes[n] + (t,) for c, t in zip(child[n][mask[n]].tolist(), expected))
        assert (tok[n][~mask[n]] == -1).all() and (child[n][~mask[n]] == -1).all()


def test_item_paths_round_trip(random_tree):
    paths, _, tree = random_tree
    ids = torch.tensor([5, 0, len(paths) - 1, 3, 5])
    out, lengths = tree.item_paths(ids, pad_id=99)
    for b, i in enumerate(ids.tolist()):
        assert out[b, : lengths[b]].tolist() == paths[i]
        assert (out[b, lengths[b] :] == 99).all()
    # walking the read-back paths lands on each item's terminal node
    walked = tree.walk(torch.where(out == 99, -1, out))
    assert walked.gather(1, lengths.view(-1, 1)).flatten().tolist() == tree.item_node[ids.numpy()].tolist()


def test_aggregate_to_nodes_batched(random_tree):
    paths, _, tree = random_tree
    values = torch.rand(4, tree.num_items, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    batched = tree.aggregate_to_nodes(values)  # [4, N]
    assert batched.shape == (4, tree.num_nodes)
    prefixes = node_prefixes(tree)
    for b in range(4):
        _, flow = brute_force(paths, values[b].numpy())
        np.testing.assert_allclose(batched[b].numpy(), [flow[p] for p in prefixes], rtol=1e-12)
        np.testing.assert_allclose(tree.aggregate_to_nodes(values[b].numpy()), batched[b].numpy(), rtol=1e-12)
    assert isinstance(tree.aggregate_to_nodes(values[0].numpy()), np.ndarray)


def test_save_load_round_trip(random_tree, tmp_path):
    _, _, tree = random_tree
    tree.save(tmp_path / "tree.npz")
    loaded = PrefixTree.load(tmp_path / "tree.npz")
    assert loaded.terminator_id == tree.terminator_id and repr(loaded) == repr(tree)
    for name in (
        "parent",
        "token",
        "depth",
        "first_child",
        "num_children",
        "item_node",
        "item_length",
        "item_rewards",
        "log_flow",
        "terminal_items",
        "terminal_ptr",
        "is_terminal",
    ):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(tree, name))
    q = torch.arange(tree.num_nodes)
    assert torch.equal(loaded.allowed_mask(q, 8), tree.allowed_mask(q, 8))


# ---------------------------------------------------------------------- the statistical test


def _sample_items(tree: PrefixTree, n: int, seed: int, uniform: bool = False) -> np.ndarray:
    """Sample n paths token by token with policy r(a|s) = F(s·a)/F(s) (or uniform over children); item counts."""
    g = torch.Generator().manual_seed(seed)
    nodes = torch.zeros(n, dtype=torch.long)  # [n] all start at the root
    done = torch.zeros(n, dtype=torch.bool)
    while not done.all():
        live = nodes[~done]  # [A]
        tok, child, mask = tree.children(live)  # [A, K]
        if uniform:
            probs = mask.double()
        else:
            probs = torch.where(mask, tree.log_process_reward(live.unsqueeze(1).expand_as(tok).clone(), tok).exp(), 0.0)
        pick = torch.multinomial(probs, 1, generator=g).squeeze(1)  # [A]
        nodes[~done] = child.gather(1, pick.unsqueeze(1)).squeeze(1)
        done = torch.as_tensor(tree.is_terminal)[nodes]
    return np.bincount(nodes.numpy(), minlength=tree.num_nodes)


def _chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper 0.9999 quantile of χ²(df), Wilson–Hilferty approximation (no scipy needed)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_sampling_process_rewards_reproduces_reward_proportions(random_tree):
    _, _, tree = random_tree
    n = 10_000
    counts = _sample_items(tree, n, seed=0)  # [N] visits per terminal node
    R = np.exp(tree.log_flow)  # F(terminal) = R(y)
    terminals = np.flatnonzero(tree.is_terminal & (R > 0))
    expected = n * R[terminals] / R[0]
    assert counts[tree.is_terminal & ~(R > 0)].sum() == 0  # zero-reward titles are never sampled
    chi2 = float(((counts[terminals] - expected) ** 2 / expected).sum())
    assert chi2 < _chi2_critical(len(terminals) - 1), chi2
    # the test has power: a uniform-over-children policy is clearly rejected on the same tree
    uniform = _sample_items(tree, n, seed=0, uniform=True)
    chi2_uniform = float(((uniform[terminals] - expected) ** 2 / expected).sum())
    assert chi2_uniform > 10 * _chi2_critical(len(terminals) - 1), chi2_uniform


def test_from_titles_adds_no_special_tokens(tiny_tokenizer):
    class WithBos:
        """Wraps the tiny tokenizer and prepends a BOS id when asked for special tokens (like Llama's)."""

        eos_token_id = tiny_tokenizer.eos_token_id

        def __len__(self):
            return len(tiny_tokenizer)

        def __call__(self, texts, add_special_tokens=True):
            ids = tiny_tokenizer(texts, add_special_tokens=False)["input_ids"]
            return {"input_ids": [[1] + x if add_special_tokens else x for x in ids]}

    tree = PrefixTree.from_titles(["Blue Train", "Kind of Blue"], WithBos())
    paths, lengths = tree.item_paths(torch.tensor([0, 1]))
    assert paths[0, : lengths[0]].tolist() == tiny_tokenizer("Blue Train")["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert 1 not in tree.token.tolist()
