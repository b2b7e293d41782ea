"""Tests of `trl_flower.rewards.PrefixTreeRewardModel`: hand-computed targets per variant, flow consistency of the
exact variant, reduction of every variant to `none` when s ≡ 1, invalid rows, the TRL reward protocol, and the
SubTB / full-distribution losses being zero when the policy equals the targets.

The tree used throughout (terminator 2, Z = 10)::

    item 0: [5, 6, 2]      R = 3      root ─5─ (F=5) ─6─ (F=5) ─⊤─ {0}        (F=3)
    item 1: [5, 6, 9, 2]   R = 2                                └─9─ (F=2) ─⊤─ {1}
    item 2: [7, 2]         R = 4           ─7─ (F=5) ─⊤─ {2, 3}  (F=5, duplicate title)
    item 3: [7, 2]         R = 1
"""

from __future__ import annotations

import doctest
import importlib.util
import math

import numpy as np
import pytest
import torch

import trl_flower.rewards
from trl_flower.rewards import PrefixTreeRewardModel, normalize_preferences
from trl_flower.tree import PrefixTree

TERM = 2
PATHS = [[5, 6, 2], [5, 6, 9, 2], [7, 2], [7, 2]]
R = np.array([3.0, 2.0, 4.0, 1.0])
Z = R.sum()
# auxiliary-model probabilities per training row, given as log-probabilities so that softmax(logits) = P
P = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
LOGITS = np.log(P)
# "mid": (p − mean) / (max − min) + 1 with mean 0.25 and max − min 0.3; "minmax": (p − min) / (max − min)
S_MID = (P - 0.25) / 0.3 + 1.0
S_MINMAX = (P - 0.1) / 0.3
# the batch: the three titles, right-padded with 0; rows of the auxiliary model per sample
BATCH = torch.tensor([[5, 6, 2, 0], [5, 6, 9, 2], [7, 2, 0, 0]])
ROWS = torch.tensor([0, 1, 1])
log = math.log

requires_losses = pytest.mark.skipif(
    importlib.util.find_spec("trl_flower.losses") is None, reason="trl_flower/losses.py is not written yet"
)


@pytest.fixture
def tree() -> PrefixTree:
    return PrefixTree.from_token_paths(PATHS, TERM, item_rewards=R)


def model(tree, variant="none", **kw) -> PrefixTreeRewardModel:
    scores = None if variant == "none" and "preference_scores" not in kw else kw.pop("preference_scores", LOGITS)
    return PrefixTreeRewardModel(tree, variant=variant, preference_scores=scores, **kw)


def node_score(s_row: np.ndarray, items: list[int]) -> float:
    """Reward-weighted mean of s over the items of one title (duplicates)."""
    return float((R[items] * s_row[items]).sum() / R[items].sum())


# ---------------------------------------------------------------------- hand-computed targets per variant

# ℓ_k and the termination target of each path under `none` (F(5) = 5, F(56) = 5, F(569) = 2, F(7) = 5)
ELL_NONE = [[log(5 / 10), log(5 / 5)], [log(5 / 10), log(5 / 5), log(2 / 5)], [log(5 / 10)]]
TERM_NONE = [log(3 / 5), log(2 / 2), log(5 / 5)]


def expected_tensors(ells, terms, nonterminal=-15.0):
    """[B, T] log_reward and [B, T+1] log_term_target laid out as the API promises (0 beyond t_b)."""
    T = max(len(e) for e in ells)
    log_reward = torch.zeros(len(ells), T, dtype=torch.float64)
    log_term = torch.zeros(len(ells), T + 1, dtype=torch.float64)
    for b, (e, t) in enumerate(zip(ells, terms)):
        log_reward[b, : len(e)] = torch.tensor(e, dtype=torch.float64)
        log_term[b, : len(e)] = nonterminal
        log_term[b, len(e)] = t
    return log_reward, log_term


def test_none_targets(tree):
    t = model(tree).token_targets(BATCH)
    log_reward, log_term = expected_tensors(ELL_NONE, TERM_NONE)
    torch.testing.assert_close(t.log_reward, log_reward)
    torch.testing.assert_close(t.log_term_target, log_term)
    assert t.lengths.tolist() == [2, 3, 1]
    assert t.valid.tolist() == [True, True, True] and t.complete.tolist() == [True, True, True]
    assert t.item_ids.tolist() == [0, 1, 2]  # the duplicate title's representative is its smallest id
    assert t.terminal_nodes.tolist() == tree.item_node[[0, 1, 2]].tolist()
    assert t.nodes.shape == (3, 4)
    assert t.nodes.tolist() == [
        tree.walk(BATCH[0:1, :2])[0].tolist() + [-1],
        tree.walk(BATCH[1:2, :3])[0].tolist(),
        tree.walk(BATCH[2:3, :1])[0].tolist() + [-1, -1],
    ]
    # Σ_k ℓ_k + term = log R(y) / Z (R of the duplicate title = 4 + 1)
    total = (t.log_reward.sum(1) + t.log_term_target.gather(1, t.lengths.view(-1, 1)).squeeze(1)).tolist()
    assert total == pytest.approx([log(3 / Z), log(2 / Z), log(5 / Z)])


def test_div_s_targets(tree):
    t = model(tree, "div_s").token_targets(BATCH, rows=ROWS)
    s = [S_MID[0, 0], S_MID[1, 1], node_score(S_MID[1], [2, 3])]  # s_b of each sample (row 0, 1, 1)
    assert t.scores.tolist() == pytest.approx(s)
    ells = [[e / s[b] for e in ELL_NONE[b]] for b in range(3)]
    terms = [TERM_NONE[b] / s[b] for b in range(3)]
    log_reward, log_term = expected_tensors(ells, terms)
    torch.testing.assert_close(t.log_reward, log_reward)
    torch.testing.assert_close(t.log_term_target, log_term)


def test_add_logs_targets(tree):
    t = model(tree, "add_logs").token_targets(BATCH, rows=ROWS)
    s = [S_MINMAX[0, 0], S_MINMAX[1, 1], node_score(S_MINMAX[1], [2, 3])]  # s[0] = 0: log(1e-20) ≈ −46
    assert s[0] == 0.0
    ells = [[e + log(s[b] + 1e-20) for e in ELL_NONE[b]] for b in range(3)]
    terms = [TERM_NONE[b] + log(s[b] + 1e-20) for b in range(3)]
    log_reward, log_term = expected_tensors(ells, terms)
    torch.testing.assert_close(t.log_reward, log_reward)
    torch.testing.assert_close(t.log_term_target, log_term)
    assert t.valid.all()  # finite even at s = 0


def test_exact_targets(tree):
    t = model(tree, "exact").token_targets(BATCH, rows=ROWS)
    ru = R * S_MID  # [2, 4] per-user item rewards R(i) s(u, i)
    zu = ru.sum(1)
    # row 0 (sample 0): F_u(5) = F_u(56) = ru[0,0] + ru[0,1]; terminal of item 0: ru[0,0]
    f5_0 = ru[0, 0] + ru[0, 1]
    f5_1 = ru[1, 0] + ru[1, 1]
    f7_1 = ru[1, 2] + ru[1, 3]
    ells = [[log(f5_0 / zu[0]), 0.0], [log(f5_1 / zu[1]), 0.0, log(ru[1, 1] / f5_1)], [log(f7_1 / zu[1])]]
    terms = [log(ru[0, 0] / f5_0), 0.0, 0.0]
    log_reward, log_term = expected_tensors(ells, terms)
    torch.testing.assert_close(t.log_reward, log_reward)
    torch.testing.assert_close(t.log_term_target, log_term)
    total = (t.log_reward.sum(1) + t.log_term_target.gather(1, t.lengths.view(-1, 1)).squeeze(1)).tolist()
    assert total == pytest.approx([log(ru[0, 0] / zu[0]), log(ru[1, 1] / zu[1]), log(f7_1 / zu[1])])


def test_exact_flows_conserved_per_user(tree):
    rng = np.random.default_rng(0)
    m = model(tree, "exact", preference_scores=rng.normal(size=(5, 4)))
    log_f = m.user_log_flows(torch.arange(5))  # [5, N]
    F = log_f.exp().numpy()
    child_sum = np.zeros_like(F)
    np.add.at(child_sum, (slice(None), tree.parent[1:]), F[:, 1:])
    inner = tree.num_children > 0
    np.testing.assert_allclose(F[:, inner], child_sum[:, inner], rtol=1e-12)  # F_u(n) = Σ_children F_u(c)
    s = m.item_scores(torch.arange(5), "mid").numpy()
    np.testing.assert_allclose(F[:, 0], (R * s).sum(1), rtol=1e-12)  # F_u(root) = Z_u
    # per-user process rewards over the children of every node sum to one
    nodes = torch.arange(tree.num_nodes).repeat(5, 1)  # [5, N]
    _, log_r, mask = m.child_targets(nodes, rows=torch.arange(5))
    sums = torch.where(mask, log_r.exp(), 0.0).sum(-1)  # [5, N]
    torch.testing.assert_close(sums[:, torch.as_tensor(inner)], torch.ones(5, int(inner.sum()), dtype=torch.float64))


@pytest.mark.parametrize("variant", ["div_s", "add_logs", "exact"])
def test_unit_scores_reduce_to_none(tree, variant):
    """With s ≡ 1 (a row with no preference: all logits equal) every variant equals `none`."""
    flat = np.zeros((2, 4))
    none, other = model(tree), model(tree, variant, preference_scores=flat)
    a, b = none.token_targets(BATCH), other.token_targets(BATCH, rows=ROWS)
    assert b.scores.tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(a.log_reward, b.log_reward)
    torch.testing.assert_close(a.log_term_target, b.log_term_target)
    ca = none.child_targets(a.nodes)
    cb = other.child_targets(b.nodes, rows=ROWS, terminal_nodes=b.terminal_nodes)
    for x, y in zip(ca, cb):
        torch.testing.assert_close(x, y)
    # and the personalised variants really differ with informative scores
    c = model(tree, variant).token_targets(BATCH, rows=ROWS)
    assert not torch.allclose(a.log_reward, c.log_reward)


def test_normalize_preferences_formulas():
    p = torch.as_tensor(P)
    torch.testing.assert_close(normalize_preferences(p, "mid"), torch.as_tensor(S_MID))
    torch.testing.assert_close(normalize_preferences(p, "minmax"), torch.as_tensor(S_MINMAX))
    assert normalize_preferences(torch.full((1, 3), 1 / 3, dtype=torch.float64), "mid").tolist() == [[1.0] * 3]
    with pytest.raises(ValueError, match="one of"):
        normalize_preferences(p, "zscore")


def test_memory_mapped_scores_match(tree, tmp_path):
    np.save(tmp_path / "logits.npy", LOGITS)
    mm = np.load(tmp_path / "logits.npy", mmap_mode="r")
    a = model(tree, "div_s").token_targets(BATCH, rows=ROWS)
    b = model(tree, "div_s", preference_scores=mm).token_targets(BATCH, rows=ROWS)
    torch.testing.assert_close(a.log_reward, b.log_reward)


# ---------------------------------------------------------------------- invalid and zero-reward rows


def test_invalid_and_zero_reward_rows():
    tree = PrefixTree.from_token_paths(PATHS, TERM, item_rewards=[3.0, 0.0, 4.0, 1.0])  # item 1 has R = 0
    ids = torch.tensor(
        [
            [5, 6, 9, 2, 0],  # complete but zero reward
            [6, 2, 0, 0, 0],  # first token not in the tree
            [5, 2, 0, 0, 0],  # "5" is a prefix, not a title
            [5, 6, 9, 9, 9],  # no terminator
            [7, 2, 2, 5, 6],  # valid; junk after the terminator is ignored
        ]
    )
    t = PrefixTreeRewardModel(tree).token_targets(ids)
    assert t.valid.tolist() == [False, False, False, False, True]
    assert t.complete.tolist() == [True, False, False, False, True]
    assert t.item_ids.tolist() == [1, -1, -1, -1, 2]
    assert t.lengths.tolist() == [3, 1, 1, 5, 1]
    assert torch.isfinite(t.log_reward).all() and torch.isfinite(t.log_term_target).all()
    # zero reward: ℓ finite up to the zero-flow token, −15 from there; every termination target −15
    # (Z = 8, F(5) = F(56) = 3, F(569) = 0)
    assert t.log_reward[0].tolist() == pytest.approx([log(3 / 8), log(3 / 3), -15.0, 0.0, 0.0])
    assert t.log_reward[1, 0] == -15.0 and t.log_reward[2, 0] == pytest.approx(log(3 / 8))
    assert t.log_reward[3].tolist() == pytest.approx([log(3 / 8), log(3 / 3), -15.0, -15.0, -15.0])
    for b, n in enumerate([3, 1, 1, 5]):
        assert t.log_term_target[b, : n + 1].tolist() == [-15.0] * (n + 1)
    assert t.log_term_target[4, :2].tolist() == [-15.0, 0.0]


def test_child_targets_div_s(tree):
    m = model(tree, "div_s")
    t = m.token_targets(BATCH, rows=ROWS)
    tok, log_r, mask = m.child_targets(t.nodes, rows=ROWS, terminal_nodes=t.terminal_nodes)
    assert tok.shape == log_r.shape == mask.shape == (3, 4, 2)
    # sample 1, state s_2 = [5, 6]: children ⊤ (F=3) and 9 (F=2) → softmax(log(3/5)/s, log(2/5)/s)
    s = S_MID[1, 1]
    a, b = math.exp(log(3 / 5) / s), math.exp(log(2 / 5) / s)
    assert tok[1, 2].tolist() == [2, 9]
    assert log_r[1, 2].tolist() == pytest.approx([log(a / (a + b)), log(b / (a + b))])
    # sample 2 ([7, ⊤], t_b = 1): s_1 has the single child ⊤ (log 1 = 0); padding states have no children, −inf
    assert tok[2, 1].tolist() == [2, -1] and log_r[2, 1].tolist() == [0.0, -math.inf]
    assert not mask[2, 2:].any() and torch.isinf(log_r[2, 2:]).all()
    with pytest.raises(ValueError, match="terminal_nodes"):
        m.child_targets(t.nodes, rows=ROWS)


def test_child_targets_zero_flow_children():
    tree = PrefixTree.from_token_paths(PATHS, TERM, item_rewards=[3.0, 0.0, 4.0, 1.0])
    m = PrefixTreeRewardModel(tree)
    node56 = tree.walk(torch.tensor([[5, 6]]))[0, -1]
    node569 = tree.advance(node56.view(1), torch.tensor([9]))
    tok, log_r, mask = m.child_targets(torch.stack([node56.view(1), node569]).view(1, 2))
    assert tok[0, 0].tolist() == [2, 9] and log_r[0, 0].tolist() == [0.0, -math.inf]
    assert mask[0, 1].tolist() == [True, False] and log_r[0, 1].tolist() == [-math.inf, -math.inf]
    assert not torch.isnan(log_r).any()


# ---------------------------------------------------------------------- construction errors


def test_construction_errors(tree):
    with pytest.raises(ValueError, match="needs|personalises"):
        PrefixTreeRewardModel(tree, variant="div_s")
    with pytest.raises(ValueError, match="num_items=4"):
        PrefixTreeRewardModel(tree, variant="div_s", preference_scores=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="variant"):
        PrefixTreeRewardModel(tree, variant="mul_s", preference_scores=LOGITS)
    with pytest.raises(ValueError, match="score_normalization='mid'"):
        PrefixTreeRewardModel(tree, variant="div_s", preference_scores=LOGITS, score_normalization="minmax")
    with pytest.raises(ValueError, match="invalid_reward"):
        PrefixTreeRewardModel(tree, sequence_reward="log_share")  # 0.0 would beat every valid log R/Z < 0
    with pytest.raises(ValueError, match="Z = 0"):
        PrefixTreeRewardModel(tree, item_rewards=np.zeros(4))
    with pytest.raises(ValueError, match="outside"):
        PrefixTreeRewardModel(tree, item_rewards={7: 1.0})
    with pytest.raises(ValueError, match="rows"):
        model(tree, "exact").token_targets(BATCH)
    with pytest.raises(ValueError, match=r"row indices must lie in \[0, 2\)"):
        model(tree, "div_s").token_targets(BATCH, rows=torch.tensor([0, 1, 2]))


def test_item_rewards_mapping(tree):
    m = PrefixTreeRewardModel(tree, item_rewards={0: 3.0, 2: 4.0})
    assert m.tree.item_rewards.tolist() == [3.0, 0.0, 4.0, 0.0]
    assert m.tree.parent is tree.parent and tree.item_rewards.tolist() == R.tolist()  # structure shared, tree intact


# ---------------------------------------------------------------------- TRL reward protocol


def test_trl_protocol_completion_ids(tree):
    m = PrefixTreeRewardModel(tree, invalid_reward=-1.0)
    assert m.__name__ == "prefix_tree_reward"
    ids = [[5, 6, 2], [5, 6, 9, 2, 0, 0], [7, 2], [7], [5, 2]]  # TRL cuts after EOS; padding is ignored anyway
    out = m(prompts=["p"] * 5, completions=[""] * 5, completion_ids=ids, trainer_state=None, log_metric=print)
    # minmax over the titles' rewards {3, 2, 5}: (R − 2) / (5 − 2); the last two are not titles
    assert out == pytest.approx([1 / 3, 0.0, 1.0, -1.0, -1.0])
    assert all(type(v) is float for v in out)
    raw = PrefixTreeRewardModel(tree, sequence_reward="raw")(["p"] * 3, [""] * 3, completion_ids=ids[:3])
    assert raw == [3.0, 2.0, 5.0]
    share = PrefixTreeRewardModel(tree, sequence_reward="log_share", invalid_reward=-30.0)
    assert share(["p"] * 4, [""] * 4, completion_ids=ids[:4]) == pytest.approx([log(0.3), log(0.2), log(0.5), -30.0])
    assert m([], [], completion_ids=[]) == []
    with pytest.raises(ValueError, match="prompts"):
        m(["p"], ["a", "b"])


def test_trl_protocol_text_and_chat_completions(tiny_titles, tiny_tokenizer):
    tree = PrefixTree.from_titles(tiny_titles, tiny_tokenizer, item_rewards=np.arange(1.0, 11.0))
    m = PrefixTreeRewardModel(tree, tokenizer=tiny_tokenizer, sequence_reward="raw", invalid_reward=-1.0)
    texts = ["Back to Life", "Back to Life Again", "Blue Train", "Blue Trai", "Rumours.<|im_end|>junk"]
    expected = [1.0, 2.0, 4.0 + 5.0, -1.0, 8.0]  # the duplicate "Blue Train" sums ids 3 and 4
    assert m(["p"] * 5, texts) == expected
    chat = [[{"role": "assistant", "content": t}] for t in texts]
    assert m(["p"] * 5, chat) == expected
    with pytest.raises(ValueError, match="tokenizer"):
        PrefixTreeRewardModel(tree)(["p"], ["Blue Train"])


def test_text_completions_cut_at_a_regular_token_terminator(tiny_tokenizer):
    """A terminator that is an ordinary token (the official "\n") can merge with the text before it ("Blue" is one
    BPE token); the text is cut at the terminator's string *before* tokenising, exactly like the tree's titles."""
    e = tiny_tokenizer.convert_tokens_to_ids("e")
    tree = PrefixTree.from_titles(["Blu", "Kind of Blu"], tiny_tokenizer, terminator_id=e)
    path_blu = tree.item_paths(torch.tensor([0]))[0][0].tolist()  # ["Blu", "e"]
    assert tiny_tokenizer("Blue", add_special_tokens=False)["input_ids"] != path_blu  # "Blue" is one token
    m = PrefixTreeRewardModel(tree, tokenizer=tiny_tokenizer, sequence_reward="raw", invalid_reward=-1.0)
    assert m(["p"] * 3, ["Blue", "Kind of Blue Train", "Kind of"]) == [1.0, 1.0, -1.0]


def test_trl_protocol_personalised(tree):
    m = PrefixTreeRewardModel(tree, preference_scores=LOGITS)
    ids = [[5, 6, 2], [7, 2], [6, 2]]
    rows = [1, 0, 0]
    out = m(["p"] * 3, [""] * 3, completion_ids=ids, row_index=rows, trainer_state=None)
    # minmax(R) · s_minmax(u, y); duplicate title (items 2, 3): reward-weighted mean of s
    expected = [(3 - 2) / 3 * S_MINMAX[1, 0], (5 - 2) / 3 * node_score(S_MINMAX[0], [2, 3]), 0.0]
    assert out == pytest.approx(expected)
    raw = PrefixTreeRewardModel(tree, preference_scores=LOGITS, sequence_reward="raw")
    out = raw(["p"] * 2, [""] * 2, completion_ids=ids[:2], row_index=rows[:2])
    assert out == pytest.approx([3 * S_MID[1, 0], R[2] * S_MID[0, 2] + R[3] * S_MID[0, 3]])
    share = PrefixTreeRewardModel(tree, preference_scores=LOGITS, sequence_reward="log_share", invalid_reward=-50)
    out = share(["p"] * 2, [""] * 2, completion_ids=ids[:2], row_index=rows[:2])
    zu = (R * S_MID).sum(1)
    assert out == pytest.approx([log(3 * S_MID[1, 0] / zu[1]), log((R[2:] * S_MID[0, 2:]).sum() / zu[0])])
    custom = PrefixTreeRewardModel(tree, preference_scores=LOGITS, row_column="user_row")
    assert custom(["p"], [""], completion_ids=ids[:1], user_row=[1]) == pytest.approx(expected[:1])
    with pytest.raises(ValueError, match="row_index"):
        m(["p"], [""], completion_ids=ids[:1])


def test_docstring_examples_run():
    result = doctest.testmod(trl_flower.rewards, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 4 and result.failed == 0


# ---------------------------------------------------------------------- the losses at balance


@requires_losses
@pytest.mark.parametrize("variant", ["none", "div_s", "add_logs", "exact"])
def test_subtb_loss_zero_when_policy_equals_targets(tree, variant):
    from trl_flower.losses import flower_subtb_loss

    m = model(tree, variant)
    t = m.token_targets(BATCH, rows=ROWS)
    T = t.log_reward.shape[1]
    if variant == "none":
        # the policy built independently from the tree: π(y_{k+1}|s_k) = r(y_{k+1}|s_k), π(⊤|s_t) = R/F(s_t) and
        # π(⊤|s_k) = e^{−15} before the end of the title (the official termination target)
        log_pf = tree.log_process_reward(t.nodes[:, :T].clamp(min=0), BATCH[:, :T])  # [B, T]
        log_pf = torch.where(torch.arange(T) < t.lengths.view(-1, 1), log_pf, 0.0)
        end = t.nodes.gather(1, t.lengths.view(-1, 1)).squeeze(1)  # [B] s_t
        log_pterm = torch.full((3, T + 1), -15.0, dtype=torch.float64)
        log_stop = tree.log_process_reward(end, torch.full_like(end, TERM))  # [B] log R(y)/F(s_t)
        log_pterm.scatter_(1, t.lengths.view(-1, 1), log_stop.view(-1, 1))
    else:
        log_pf, log_pterm = t.log_reward.clone(), t.log_term_target.clone()
    loss = flower_subtb_loss(log_pf, log_pterm, t.log_reward, t.log_term_target, t.lengths)
    assert loss.item() == pytest.approx(0.0, abs=1e-20)
    # and it is not trivially zero: a policy off the targets gives a positive loss
    bumped = log_pf.clone()
    bumped[0, 0] += 0.1
    assert flower_subtb_loss(bumped, log_pterm, t.log_reward, t.log_term_target, t.lengths).item() > 1e-4


@requires_losses
@pytest.mark.parametrize("variant", ["none", "div_s", "exact"])
def test_full_distribution_loss_zero_at_targets(tree, variant):
    from trl_flower.losses import full_distribution_loss

    m = model(tree, variant)
    t = m.token_targets(BATCH, rows=ROWS)
    _, log_r, mask = m.child_targets(t.nodes, rows=ROWS, terminal_nodes=t.terminal_nodes)
    state_mask = t.nodes >= 0
    assert full_distribution_loss(log_r, log_r, mask, state_mask).item() == pytest.approx(0.0, abs=1e-12)
    uniform = torch.where(mask, -torch.log(mask.sum(-1, keepdim=True).clamp(min=1).double()), -math.inf)
    assert full_distribution_loss(uniform, log_r, mask, state_mask).item() > 1e-3


def test_title_log_term_flow_uses_own_termination_reward_at_intermediate_titles():
    """Path [5, 6, ⊤] passes the complete title [5] (R=1, F([5]) = 1 + 3): "flow" targets log(1/4) there."""
    tree = PrefixTree.from_token_paths([[5, 2], [5, 6, 2], [7, 2]], terminator_id=2, item_rewards=[1.0, 3.0, 4.0])
    ids = torch.tensor([[5, 6, 2]])
    official = PrefixTreeRewardModel(tree).token_targets(ids)
    flow = PrefixTreeRewardModel(tree, title_log_term="flow").token_targets(ids)
    # s_0 = root is not a title: both keep −15; s_1 = [5] is a title; s_2 = [5, 6] is the sampled end: log 3/3 = 0
    assert official.log_term_target[0].tolist() == pytest.approx([-15.0, -15.0, 0.0])
    assert flow.log_term_target[0].tolist() == pytest.approx([-15.0, math.log(1 / 4), 0.0])
    assert torch.equal(flow.log_reward, official.log_reward)
    with pytest.raises(ValueError, match="title_log_term"):
        PrefixTreeRewardModel(tree, title_log_term="exact")
