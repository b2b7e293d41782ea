"""Tests for the GFlowGR trajectory sampler and reward model (pure tensors, no LM)."""

from __future__ import annotations

import math

import pytest
import torch

from trl_flower.gflowgr.reward import GFlowGRReward, interaction_levels
from trl_flower.gflowgr.sampler import TrajectorySampler, pad_histories

M = 20


def _batch():
    positives = torch.tensor([0, 5, 19])
    histories = pad_histories([[1, 2, 3], [6], []])
    return positives, histories


@pytest.mark.parametrize("strategy", ["logs", "random", "curriculum", "beam"])
def test_shape_positive_first_distinct_and_seeded(strategy):
    positives, histories = _batch()
    kw = {}
    if strategy == "curriculum":
        kw = {"scores": torch.randn(3, M, generator=torch.Generator().manual_seed(0)), "progress": 0.5}
    if strategy == "beam":
        kw = {"beam_items": torch.tensor([[0, 7, 8, 9], [4, 5, -1, -1], [19, 18, 17, 16]])}
    a = TrajectorySampler(M, 3, strategy, seed=1).sample(positives, histories, **kw)
    b = TrajectorySampler(M, 3, strategy, seed=1).sample(positives, histories, **kw)
    assert a.shape == (3, 4)
    assert torch.equal(a, b)
    assert torch.equal(a[:, 0], positives)
    for row in a:
        assert len(set(row.tolist())) == 4  # no repeats, positive never augmented


def test_random_avoids_history_and_positive():
    positives, histories = _batch()
    out = TrajectorySampler(M, 5, "random", seed=0).sample(positives, histories)
    for b in range(3):
        h = set(histories[b][histories[b] >= 0].tolist())
        assert not (set(out[b, 1:].tolist()) & (h | {int(positives[b])}))


def test_logs_prefers_history_then_tops_up():
    positives, histories = _batch()
    out = TrajectorySampler(M, 3, "logs", seed=0).sample(positives, histories)
    assert sorted(out[0, 1:].tolist()) == [1, 2, 3]
    assert 6 in out[1, 1:].tolist()  # the single history item, plus 2 unobserved
    assert out[1, 1].item() == 6 and not ({5, 6} & set(out[1, 2:].tolist()))


def test_beam_keeps_beam_order_and_skips_positive():
    positives, histories = _batch()
    beam = torch.tensor([[0, 7, 8, 9], [4, 5, -1, -1], [19, 18, 17, 16]])
    out = TrajectorySampler(M, 3, "beam", seed=0).sample(positives, histories, beam_items=beam)
    assert out[0, 1:].tolist() == [7, 8, 9]
    assert out[1, 1].item() == 4 and out[1, 2:].ne(5).all()
    assert out[2, 1:].tolist() == [18, 17, 16]


def test_curriculum_moves_from_easy_to_hard():
    # scores = item id: the hardest unobserved items have the largest ids
    positives, histories = torch.tensor([0]), pad_histories([[19]])
    scores = torch.arange(M, dtype=torch.float32)[None]
    s = TrajectorySampler(M, 2, "curriculum", seed=0)  # window W = 4
    easy = s.sample(positives, histories, scores=scores, progress=0.0)[0, 1:]
    hard = s.sample(positives, histories, scores=scores, progress=1.0)[0, 1:]
    assert set(easy.tolist()) <= {1, 2, 3, 4}  # the 4 lowest-scored unobserved items
    assert set(hard.tolist()) <= {15, 16, 17, 18}  # the 4 highest (19 is in the history, 0 is the positive)
    with pytest.raises(ValueError, match="scores"):
        s.sample(positives, histories)


def test_sampler_validation_and_n_zero():
    with pytest.raises(ValueError, match="strategy"):
        TrajectorySampler(M, 3, "mixture")
    out = TrajectorySampler(M, 0, "random").sample(torch.tensor([3]), pad_histories([[]]))
    assert out.tolist() == [[3]]


def test_interaction_levels():
    items = torch.tensor([[0, 1, 2], [5, 6, 7]])
    lv = interaction_levels(items, torch.tensor([0, 5]), pad_histories([[2], [7, 6]]))
    assert lv.tolist() == [[0, 2, 1], [0, 1, 1]]


CODES = torch.tensor([[0, 1, 2, 0], [0, 1, 3, 0], [0, 2, 3, 0], [4, 4, 4, 0], [0, 1, 2, 1]])


def test_reward_sum_of_parts_with_cm_scores():
    rm = GFlowGRReward(CODES, score_source="cm", epsilon=1e-3)
    items = torch.tensor([[0, 1, 2, 3, 4]])
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0, 2.0]])
    log_r, parts = rm(items, torch.tensor([0]), pad_histories([[2]]), scores=scores)
    assert parts["r_a"].tolist() == [[10.0, 0.0, 1.0, 0.0, 0.0]]
    assert parts["r_sim"].tolist() == [[3.0, 2.0, 1.0, 0.0, 3.0]]  # collision level excluded
    torch.testing.assert_close(parts["r_score"], torch.tensor([[1.0, math.exp(-1), math.exp(-2), math.exp(-3), 1.0]]))
    torch.testing.assert_close(log_r, torch.log(parts["r_a"] + parts["r_score"] + parts["r_sim"] + 1e-3))
    assert torch.isfinite(log_r).all()


def test_prefix_similarity_counts_only_the_shared_prefix():
    codes = torch.cat([CODES, torch.tensor([[5, 1, 2, 0]])])  # item 5: deep codes of item 0, other first code
    items, pos, hist = torch.tensor([[0, 1, 2, 3, 5]]), torch.tensor([0]), pad_histories([[]])
    _, position = GFlowGRReward(codes, score_source="none")(items, pos, hist)
    _, prefix = GFlowGRReward(codes, score_source="none", similarity="prefix")(items, pos, hist)
    assert position["r_sim"].tolist() == [[3.0, 2.0, 1.0, 0.0, 2.0]]
    assert prefix["r_sim"].tolist() == [[3.0, 2.0, 1.0, 0.0, 0.0]]  # the deep match without the prefix earns 0
    with pytest.raises(ValueError, match="similarity"):
        GFlowGRReward(CODES, similarity="cosine")


def test_reward_stays_positive_with_nothing():
    rm = GFlowGRReward(CODES, score_source="none", epsilon=1e-3)
    log_r, parts = rm(torch.tensor([[0, 3]]), torch.tensor([0]), pad_histories([[]]))
    assert parts["reward"][0, 1].item() == 0.0
    assert log_r[0, 1].item() == pytest.approx(math.log(1e-3))


def test_reward_model_score_source():
    rm = GFlowGRReward(CODES, score_source="model")
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    _, parts = rm(torch.tensor([[0, 1]]), torch.tensor([0]), pad_histories([[]]), traj_log_probs=lp)
    torch.testing.assert_close(parts["r_score"], torch.tensor([[1.0, math.exp(-1)]]))
    assert not parts["r_score"].requires_grad  # the model's own probability is a target, not a path for gradients


def test_weighted_fusion_starts_at_sum_and_is_learnable():
    items, pos, hist = torch.tensor([[0, 1, 3]]), torch.tensor([0]), pad_histories([[1]])
    summed, _ = GFlowGRReward(CODES, score_source="none")(items, pos, hist)
    rm = GFlowGRReward(CODES, score_source="none", fusion="weighted")
    weighted, _ = rm(items, pos, hist)
    torch.testing.assert_close(weighted, summed)
    weighted.sum().backward()
    assert rm.raw_weights.grad is not None and rm.raw_weights.grad.abs().sum() > 0


def test_reward_validation():
    with pytest.raises(ValueError, match=">= 0"):
        GFlowGRReward(CODES, reward_unobserved=-1.0)
    with pytest.raises(ValueError, match="epsilon"):
        GFlowGRReward(CODES, epsilon=0.0)
    with pytest.raises(ValueError, match="scores"):
        GFlowGRReward(CODES)(torch.tensor([[0]]), torch.tensor([0]), pad_histories([[]]))
